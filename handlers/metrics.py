"""TorchServe's side of the metrics: the core's events go into TorchServe's metric cache, which emits
them to the frontend. The metrics are declared in metrics.yaml next to this module."""

from pathlib import Path

import yaml
from ts.metrics.metric_cache_abstract import MetricCacheAbstract
from ts.metrics.metric_type_enum import MetricTypes

from handlers.core.metrics import MetricEvent

DECLARATIONS = Path(__file__).with_name("metrics.yaml")


def declared_metrics() -> list[tuple[str, dict]]:
    """(metric type, specification) for every metric metrics.yaml declares."""
    declared = yaml.safe_load(DECLARATIONS.read_text())["model_metrics"]
    return [(type_name, specification) for type_name, specifications in declared.items() for specification in specifications]


class TorchServeMetrics:
    def __init__(self, cache: MetricCacheAbstract):
        self.metrics = {
            specification["name"]: cache.add_metric_to_cache(
                specification["name"], specification["unit"], specification["dimensions"], MetricTypes(type_name)
            )
            for type_name, specification in declared_metrics()
        }

    def record(self, events: list[MetricEvent], request_id: str) -> None:
        for event in events:
            self.metrics[event.name].add_or_update(event.value, list(event.labels), request_id)

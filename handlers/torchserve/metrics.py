"""TorchServe's side of the metrics: the core's events go into TorchServe's metric cache, which emits
them to the frontend."""

from ts.metrics.metric_cache_abstract import MetricCacheAbstract
from ts.metrics.metric_type_enum import MetricTypes

from handlers.core.metrics import MetricEvent, declared_metrics


class TorchServeMetrics:
    def __init__(self, cache: MetricCacheAbstract):
        self.metrics = {
            declaration.name: cache.add_metric_to_cache(
                declaration.name, declaration.unit, list(declaration.dimensions), MetricTypes(declaration.kind)
            )
            for declaration in declared_metrics()
        }

    def record(self, events: list[MetricEvent], request_id: str) -> None:
        for event in events:
            self.metrics[event.name].add_or_update(event.value, list(event.labels), request_id)

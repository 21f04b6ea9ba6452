"""Ray's side of the metrics: the core's events as Ray counters, with the names and dimensions that
handlers/core/metrics.yaml declares for both engines."""

import logging

from ray.serve.metrics import Counter

from handlers.core.metrics import MetricEvent, declared_metrics

logger = logging.getLogger(__name__)


class RayMetrics:
    def __init__(self):
        declared = declared_metrics()
        self.dimensions = {declaration.name: declaration.dimensions for declaration in declared}
        self.counters = {name: Counter(name, tag_keys=dimensions) for name, dimensions in self.dimensions.items()}

    def record(self, events: list[MetricEvent]) -> None:
        try:
            for event in events:
                self.counters[event.name].inc(event.value, tags=dict(zip(self.dimensions[event.name], event.labels)))
        except Exception:  # noqa: BLE001 - a metric is never worth an answer
            logger.exception("recording metrics failed")

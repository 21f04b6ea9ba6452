"""The handler's Prometheus metrics, declared in metrics.yaml next to this module."""

from pathlib import Path

import yaml
from ts.metrics.metric_cache_abstract import MetricCacheAbstract
from ts.metrics.metric_type_enum import MetricTypes

from handlers.errors import RequestError
from handlers.request import GenerationRequest

DECLARATIONS = Path(__file__).with_name("metrics.yaml")


class GenerationMetrics:
    """Records each answered request in TorchServe's metric cache, which emits it to the frontend."""

    def __init__(self, cache: MetricCacheAbstract, model_name: str):
        self.model_name = model_name
        self.metrics = {}
        declared = yaml.safe_load(DECLARATIONS.read_text())["model_metrics"]
        for type_name, specifications in declared.items():
            for specification in specifications:
                self.metrics[specification["name"]] = cache.add_metric_to_cache(
                    specification["name"], specification["unit"], specification["dimensions"], MetricTypes(type_name)
                )

    def record_images(self, request: GenerationRequest, image_count: int, seconds: float, request_id: str) -> None:
        labels = [self.model_name, request.task]
        self._add("diffusion_images_generated", image_count, labels, request_id)
        self._add("diffusion_pixels_generated", image_count * request.width * request.height, labels, request_id)
        self._add("diffusion_requests", 1, labels, request_id)
        self._add("diffusion_denoising_steps", request.denoising_steps, labels, request_id)
        self._add("diffusion_generation_seconds", round(seconds, 6), labels, request_id)

    def record_error(self, error: RequestError, request_id: str) -> None:
        self._add("diffusion_errors", 1, [self.model_name, error.kind], request_id)

    def _add(self, name: str, value: float, labels: list[str], request_id: str) -> None:
        self.metrics[name].add_or_update(value, labels, request_id)

"""The metrics each answer makes, as plain events. Each engine's adapter records them in its own
metric system; handlers/metrics.yaml declares them (names, units, dimensions)."""

from dataclasses import dataclass

from handlers.core.errors import RequestError
from handlers.core.request import GenerationRequest


@dataclass(frozen=True)
class MetricEvent:
    name: str
    value: float
    labels: tuple[str, ...]  # in the order of the metric's declared dimensions


def answer_events(request: GenerationRequest, image_count: int, seconds: float, model_name: str) -> list[MetricEvent]:
    labels = (model_name, request.task)
    return [
        MetricEvent("diffusion_images_generated", image_count, labels),
        MetricEvent("diffusion_pixels_generated", image_count * request.width * request.height, labels),
        MetricEvent("diffusion_requests", 1, labels),
        MetricEvent("diffusion_denoising_steps", request.denoising_steps, labels),
        MetricEvent("diffusion_generation_seconds", round(seconds, 6), labels),
    ]


def error_events(error: RequestError, model_name: str) -> list[MetricEvent]:
    return [MetricEvent("diffusion_errors", 1, (model_name, error.kind))]

"""The metrics each answer makes, as plain events, and their declarations (metrics.yaml beside this
module: names, units, dimensions). Each engine's adapter records the events in its own metric system."""

from dataclasses import dataclass
from pathlib import Path

import yaml

from handlers.core.errors import RequestError

DECLARATIONS = Path(__file__).with_name("metrics.yaml")


@dataclass(frozen=True)
class MetricEvent:
    name: str
    value: float
    labels: tuple[str, ...]  # in the order of the metric's declared dimensions


@dataclass(frozen=True)
class MetricDeclaration:
    name: str
    kind: str  # TorchServe's metric type: counter, gauge or histogram
    unit: str
    dimensions: tuple[str, ...]


def declared_metrics() -> list[MetricDeclaration]:
    """Every metric metrics.yaml declares."""
    declared = yaml.safe_load(DECLARATIONS.read_text())["model_metrics"]
    return [
        MetricDeclaration(spec["name"], kind, spec["unit"], tuple(spec["dimensions"]))
        for kind, specs in declared.items()
        for spec in specs
    ]


def answer_events(request, image_count: int, seconds: float, model_name: str) -> list[MetricEvent]:
    """A generated request's events; request is the GenerationRequest that was answered."""
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

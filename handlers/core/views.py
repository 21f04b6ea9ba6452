"""Pipeline views: one pipeline per task x ControlNet x sampler, all sharing the loaded weights."""

import diffusers
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)

from handlers.core.errors import RequestError
from handlers.core.execution_device import pin_execution_device, pinned_device
from handlers.core.samplers import SAMPLERS

SCHEDULERS = {name: (getattr(diffusers, sampler.class_name), sampler.settings) for name, sampler in SAMPLERS.items()}
AUTO_PIPELINES = {
    "txt2img": AutoPipelineForText2Image,
    "img2img": AutoPipelineForImage2Image,
    "inpaint": AutoPipelineForInpainting,
}


def compatible_schedulers(pipeline: DiffusionPipeline) -> list[str]:
    """Names whose sampler fits the model's training: flow-matching models (FLUX, SD3) take none of these."""
    own = type(pipeline.scheduler)
    compatible = set(getattr(pipeline.scheduler, "compatibles", [])) | {own}
    return [name for name, (scheduler_class, _) in SCHEDULERS.items() if scheduler_class in compatible]


class PipelineViews:
    """One pipeline per (task, ControlNet, sampler), made with from_pipe so all share the loaded weights.

    The base pipeline is never changed, so one request's choices never leak into another's.
    """

    def __init__(self, pipeline: DiffusionPipeline, controlnets: dict | None = None):
        self.base = pipeline
        self.controlnets = controlnets or {}
        self.schedulers = compatible_schedulers(pipeline)
        # Bounded: 3 tasks x (1 + ControlNets) x (1 + samplers).
        self.views: dict[tuple, DiffusionPipeline] = {}

    def pipeline_for(self, task: str, controlnet: str | None = None, scheduler: str | None = None) -> DiffusionPipeline:
        if (task, controlnet, scheduler) == ("txt2img", None, None):
            return self.base
        key = (task, controlnet, scheduler)
        if key not in self.views:
            self.views[key] = self._make_view(task, controlnet, scheduler)
        return self.views[key]

    def _make_view(self, task: str, controlnet: str | None, scheduler: str | None) -> DiffusionPipeline:
        components = {}
        if scheduler is not None:
            if scheduler not in self.schedulers:
                raise RequestError(
                    f"scheduler {scheduler!r} does not fit this model's {type(self.base.scheduler).__name__}",
                    field="scheduler",
                    allowed=self.schedulers,
                )
            scheduler_class, overrides = SCHEDULERS[scheduler]
            components["scheduler"] = scheduler_class.from_config(self.base.scheduler.config, **overrides)
        if controlnet is not None:
            components["controlnet"] = self.controlnets[controlnet]
        try:
            view = AUTO_PIPELINES[task].from_pipe(self.base, **components)
        except ValueError:
            if task == "txt2img" and controlnet is None:  # a pipeline AutoPipeline does not know
                view = type(self.base).from_pipe(self.base, **components)
            else:
                raise RequestError(
                    f"this model ({type(self.base).__name__}) does not support task {task}"
                    + (" with a ControlNet" if controlnet else ""),
                    field="task",
                ) from None
        view.set_progress_bar_config(disable=True)
        device = pinned_device(self.base)
        if device is not None and pinned_device(view) is None:  # it shares the base's modules, so their place
            pin_execution_device(view, device)
        return view

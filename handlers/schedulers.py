"""Samplers by name, each built from the loaded pipeline's own scheduler config."""

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}


class SchedulerCache:
    """One pipeline view per scheduler name, sharing the loaded weights; the base pipeline is never changed."""

    def __init__(self, pipeline: DiffusionPipeline):
        self.base = pipeline
        self.views: dict[str, DiffusionPipeline] = {}  # bounded by len(SCHEDULERS)

    def pipeline_for(self, name: str | None) -> DiffusionPipeline:
        if name is None:
            return self.base
        if name not in self.views:
            scheduler_class, overrides = SCHEDULERS[name]
            scheduler = scheduler_class.from_config(self.base.scheduler.config, **overrides)
            view = type(self.base).from_pipe(self.base, scheduler=scheduler)
            view.set_progress_bar_config(disable=True)
            self.views[name] = view
        return self.views[name]

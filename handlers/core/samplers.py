"""Samplers by name: each one's diffusers scheduler class, by its name, its settings, and how many
denoiser evaluations it makes per step. Names only, so that validating a request or a model-config needs
no diffusers import (Ray's HTTP ingress imports this); handlers/core/views.py resolves the classes."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampler:
    class_name: str
    settings: dict = field(default_factory=dict)
    # A second-order sampler evaluates the denoiser twice per step but the last: 2N-1 evaluations for N steps.
    order: int = 1

    def evaluations(self, steps: int) -> int:
        return self.order * steps - (self.order - 1) if steps else 0


SAMPLERS = {
    "ddim": Sampler("DDIMScheduler"),
    "pndm": Sampler("PNDMScheduler"),
    "lms": Sampler("LMSDiscreteScheduler"),
    "euler": Sampler("EulerDiscreteScheduler"),
    "euler_a": Sampler("EulerAncestralDiscreteScheduler"),
    "heun": Sampler("HeunDiscreteScheduler", order=2),
    "dpmpp_2m": Sampler("DPMSolverMultistepScheduler"),
    "dpmpp_2m_karras": Sampler("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": Sampler("UniPCMultistepScheduler"),
    "ddpm": Sampler("DDPMScheduler"),
}

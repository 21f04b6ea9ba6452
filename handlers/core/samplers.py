"""Samplers by name: each one's diffusers scheduler class, by its name, and its settings. Names only, so
that validating a request or a model-config needs no diffusers import (Ray's HTTP ingress imports this);
handlers/core/views.py resolves the classes."""

SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}

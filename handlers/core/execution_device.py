"""A pipeline placed whole on one device answers its execution device without a search."""

import functools

import torch
from diffusers import DiffusionPipeline


@functools.cache
def _pinned_class(pipeline_class: type, device: torch.device) -> type:
    # Same name and module: diffusers' AutoPipeline maps and save_pretrained go by the class name.
    return type(pipeline_class.__name__, (pipeline_class,), {
        "__module__": pipeline_class.__module__,
        "__qualname__": pipeline_class.__qualname__,
        "_execution_device": property(lambda self: device),
        "_pinned_device": device,
    })


def pin_execution_device(pipeline: DiffusionPipeline, device: torch.device) -> None:
    """Answer the pipeline's execution device without looking for offload hooks.

    diffusers looks for them on every call, walking every module of every component: about 3 ms on
    the 10 MB digits model and more on larger ones, per call. Only an offloaded pipeline has such
    hooks, so for one placed whole on its device the answer never changes.
    """
    pipeline.__class__ = _pinned_class(pipeline.__class__, device)


def pinned_device(pipeline: DiffusionPipeline) -> torch.device | None:
    return getattr(type(pipeline), "_pinned_device", None)


def own_class(pipeline: DiffusionPipeline) -> type:
    """The pipeline's class as diffusers made it, pinned or not."""
    pipeline_class = type(pipeline)
    return pipeline_class.__mro__[1] if pinned_device(pipeline) is not None else pipeline_class

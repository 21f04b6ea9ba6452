"""Load a diffusers pipeline and run batches of generation requests on it."""

import logging
from itertools import groupby
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL.Image import Image

from handlers.errors import GenerationFailed, OutOfMemory, RequestError
from handlers.request import GenerationRequest

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def select_device(gpu_id: int | None) -> torch.device:
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # CPU kernels for float16 are slow or missing, so half precision is a CUDA-only default.
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_pipeline(
    source: str | Path, device: torch.device, dtype: torch.dtype, allow_pickle_weights: bool = False
) -> DiffusionPipeline:
    """Load from a local directory or a hub id, safetensors only unless pickle is allowed."""
    pipeline = DiffusionPipeline.from_pretrained(
        source, dtype=dtype, use_safetensors=None if allow_pickle_weights else True
    )
    pipeline.set_progress_bar_config(disable=True)  # tqdm bars would flood the worker log
    return pipeline.to(device)


def generation_key(request: GenerationRequest) -> tuple:
    """Requests with equal keys can share one pipeline call."""
    return (request.height, request.width, request.num_inference_steps, request.guidance_scale)


def generate(
    pipeline: DiffusionPipeline, requests: list[GenerationRequest]
) -> list[list[Image] | RequestError]:
    """Run compatible requests together; return each request's images in request order."""
    results: list[list[Image] | RequestError] = [None] * len(requests)  # type: ignore[list-item]
    order = sorted(range(len(requests)), key=lambda index: generation_key(requests[index]))
    for _, group in groupby(order, key=lambda index: generation_key(requests[index])):
        indices = list(group)
        outcome = run_group(pipeline, [requests[index] for index in indices])
        for position, index in enumerate(indices):
            results[index] = outcome if isinstance(outcome, RequestError) else [outcome[position]]
    return results


def run_group(pipeline: DiffusionPipeline, group: list[GenerationRequest]) -> list[Image] | RequestError:
    first = group[0]
    # One generator per image, each seeded by its own request, so a request's pixels do not
    # depend on its neighbours. CPU generators give the same noise on every device.
    generators = [torch.Generator("cpu").manual_seed(request.seed) for request in group]
    try:
        return pipeline(
            prompt=[request.prompt for request in group],
            height=first.height,
            width=first.width,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            generator=generators,
        ).images
    except (torch.OutOfMemoryError, MemoryError):
        logger.exception("out of memory generating %d images", len(group))
        return OutOfMemory()
    except Exception as error:  # noqa: BLE001 - one failing group must not fail the others
        logger.exception("generation failed")
        return GenerationFailed(f"generation failed: {type(error).__name__}: {error}")

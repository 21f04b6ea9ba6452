"""Load a diffusers pipeline and run batches of generation requests on it."""

import logging
from itertools import groupby
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL.Image import Image

from handlers.errors import GenerationFailed, OutOfMemory, RequestError
from handlers.request import GenerationRequest
from handlers.schedulers import SchedulerCache

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


def resolve_batching(name: str, device: torch.device) -> bool:
    """Whether compatible requests share one pipeline call.

    Kernels are not batch-invariant (oneDNN convolutions, thread chunking), so a shared call can move
    a pixel by one grey level against the same request run alone. CPUs gain little from sharing at
    real image sizes, so there the default keeps pixels independent of batch neighbours.
    """
    if name == "auto":
        return device.type == "cuda"
    return name == "combined"


def load_pipeline(
    source: str | Path, device: torch.device, dtype: torch.dtype, allow_pickle_weights: bool = False
) -> DiffusionPipeline:
    """Load from a local directory or a hub id, safetensors only unless pickle is allowed."""
    pipeline = DiffusionPipeline.from_pretrained(
        source, dtype=dtype, use_safetensors=None if allow_pickle_weights else True
    )
    pipeline.set_progress_bar_config(disable=True)  # tqdm bars would flood the worker log
    return pipeline.to(device)


def batch_key(request: GenerationRequest) -> tuple:
    """Requests with equal keys can share one pipeline call."""
    return (request.height, request.width, request.num_inference_steps, request.guidance_scale, request.scheduler or "")


class ImageGenerator:
    """Runs requests on one loaded pipeline, in groups that can share a pipeline call."""

    def __init__(self, pipeline: DiffusionPipeline, combine_requests: bool):
        self.schedulers = SchedulerCache(pipeline)
        self.combine_requests = combine_requests

    def generate(self, requests: list[GenerationRequest]) -> list[list[Image] | RequestError]:
        """Each request's images (or error), in request order; image i was seeded with request.image_seeds[i]."""
        results: list[list[Image] | RequestError | None] = [None] * len(requests)
        for indices in self.groups(requests):
            group = [requests[index] for index in indices]
            outcome = self.run_group(group)
            if isinstance(outcome, RequestError):
                for index in indices:
                    results[index] = outcome
                continue
            images = iter(outcome)
            for index, request in zip(indices, group):
                results[index] = [next(images) for _ in range(request.image_count)]
        return results

    def groups(self, requests: list[GenerationRequest]) -> list[list[int]]:
        if not self.combine_requests:
            return [[index] for index in range(len(requests))]
        order = sorted(range(len(requests)), key=lambda index: batch_key(requests[index]))
        return [list(group) for _, group in groupby(order, key=lambda index: batch_key(requests[index]))]

    def run_group(self, group: list[GenerationRequest]) -> list[Image] | RequestError:
        first = group[0]
        prompts, negative_prompts, generators = [], [], []
        for request in group:
            for prompt in request.prompts:
                prompts += [prompt] * request.num_images_per_prompt
                negative_prompts += [request.negative_prompt or ""] * request.num_images_per_prompt
            # One generator per image, seeded from its request, so the noise never depends on
            # neighbours. CPU generators give the same noise on every device.
            generators += [torch.Generator("cpu").manual_seed(seed) for seed in request.image_seeds]
        if first.guidance_scale == 0:
            # Guidance uncond + w * (cond - uncond) at w = 0 is the unconditional prediction, but
            # diffusers treats every w <= 1 as conditional; sample from the negative prompt instead.
            prompts, negative_prompts = negative_prompts, []
        # Only pass negative prompts when asked: some pipelines (FLUX) take none.
        extra = {"negative_prompt": negative_prompts} if any(negative_prompts) else {}
        try:
            return self.schedulers.pipeline_for(first.scheduler)(
                prompt=prompts,
                height=first.height,
                width=first.width,
                num_inference_steps=first.num_inference_steps,
                guidance_scale=first.guidance_scale,
                generator=generators,
                **extra,
            ).images
        except (torch.OutOfMemoryError, MemoryError):
            logger.exception("out of memory generating %d images", len(prompts))
            return OutOfMemory()
        except Exception as error:  # noqa: BLE001 - one failing group must not fail the others
            logger.exception("generation failed")
            return GenerationFailed(f"generation failed: {type(error).__name__}: {error}")

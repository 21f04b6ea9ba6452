"""Run batches of generation requests on one loaded pipeline."""

import gc
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from itertools import groupby

import torch
from diffusers import DiffusionPipeline
from PIL.Image import Image

from handlers.core.answers import Generation
from handlers.core.errors import GenerationFailed, OutOfMemory, RequestError
from handlers.core.schema import GenerationRequest
from handlers.core.views import PipelineViews

logger = logging.getLogger(__name__)

# Arguments that not every pipeline takes; img2img gets its size from the image, and a pipeline
# without step callbacks still generates, only without progress lines.
OPTIONAL_ARGUMENTS = {"height", "width", "callback_on_step_end"}

# A CUDA allocation failure, or a CPU one.
OUT_OF_MEMORY = (torch.OutOfMemoryError, MemoryError)

# Called after every denoising step of a group: (the group's requests, step, total steps, seconds so far).
StepListener = Callable[[list[GenerationRequest], int, int, float], None]


@dataclass
class ImageJob:
    """One image to make: what its request asks for, with its own seed."""

    prompt: str
    negative_prompt: str
    seed: int
    image: Image | None
    mask_image: Image | None
    control_image: Image | None


def pictures_of(output) -> list[tuple[Image, bool | None]]:
    """Each image with the safety checker's flag (None: no checker ran)."""
    # Only SD 1.x/2.x-style outputs carry the field, and it is None when the pipeline has no checker.
    flags = getattr(output, "nsfw_content_detected", None) or [None] * len(output.images)
    return [(image, bool(flag) if flag is not None else None) for image, flag in zip(output.images, flags)]


def image_jobs(group: list[GenerationRequest]) -> list[ImageJob]:
    jobs = []
    for request in group:
        seeds = iter(request.image_seeds)
        for prompt in request.prompts:
            for _ in range(request.num_images_per_prompt):
                jobs.append(
                    ImageJob(
                        prompt,
                        request.negative_prompt or "",
                        next(seeds),
                        request.image,
                        request.mask_image,
                        request.control_image,
                    )
                )
    return jobs


class ImageGenerator:
    """Runs requests in groups that can share a pipeline call, on views that share the loaded weights."""

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        combine_requests: bool,
        controlnets: dict | None = None,
        has_loras: bool = False,
        refiner: DiffusionPipeline | None = None,
        refiner_switch: float = 0.8,
    ):
        self.pipeline = pipeline
        self.views = PipelineViews(pipeline, controlnets)
        self.combine_requests = combine_requests
        self.has_loras = has_loras
        self.refiner = refiner
        self.refiner_switch = refiner_switch

    def generate(
        self, requests: list[GenerationRequest], on_step: StepListener | None = None
    ) -> list[Generation | RequestError]:
        """Each request's images (or error), in request order."""
        results: list[Generation | RequestError | None] = [None] * len(requests)
        for indices in self.groups(requests):
            group_results = self.run_isolated([requests[index] for index in indices], on_step)
            for index, result in zip(indices, group_results):
                results[index] = result
        return results

    def run_isolated(
        self, group: list[GenerationRequest], on_step: StepListener | None = None
    ) -> list[Generation | RequestError]:
        """The group's results, request by request.

        A shared call that fails for a reason other than memory runs again one request at a time, so
        the request that broke it is the only one to get the error.
        """
        start = time.perf_counter()
        pictures = self.run_group(group, on_step)
        seconds = time.perf_counter() - start
        if isinstance(pictures, GenerationFailed) and len(group) > 1:
            logger.warning("a shared call of %d requests failed; running them one at a time", len(group))
            return [result for request in group for result in self.run_isolated([request], on_step)]
        if isinstance(pictures, RequestError):
            return [pictures] * len(group)
        pictures = iter(pictures)
        results = []
        for request in group:
            images, flags = zip(*[next(pictures) for _ in range(request.image_count)])
            checked = all(flag is not None for flag in flags)
            results.append(Generation(list(images), seconds, list(flags) if checked else None))
        return results

    def groups(self, requests: list[GenerationRequest]) -> list[list[int]]:
        if not self.combine_requests:
            return [[index] for index in range(len(requests))]
        keys = [request.batch_key() for request in requests]
        order = sorted(range(len(requests)), key=keys.__getitem__)
        return [list(group) for _, group in groupby(order, key=keys.__getitem__)]

    def run_group(self, group: list[GenerationRequest], on_step: StepListener | None = None) -> list[tuple[Image, bool | None]] | RequestError:
        first = group[0]
        jobs = image_jobs(group)
        if first.denoising_steps < 1:
            # Strength this low leaves no denoising step: the input image is the answer.
            return [(job.image, None) for job in jobs]
        try:
            pipeline = self.views.pipeline_for(first.task, first.controlnet, first.scheduler)
            self._activate_loras(first.lora_weights)
            refine = self.refines(first)
            # With a refiner, the base and refiner steps split one schedule of num_inference_steps.
            progress = Progress(group, on_step, first.num_inference_steps if refine else None) if on_step else None
            return self._run_jobs(pipeline, first, jobs, progress)
        except RequestError as error:
            return error
        except OUT_OF_MEMORY:
            logger.exception("out of memory generating one image")
            return OutOfMemory()
        except Exception as error:  # noqa: BLE001 - whatever a library raises, it stays with this group
            logger.exception("generation failed")
            return GenerationFailed(
                f"generation failed ({type(error).__name__}); the worker log has the details"
            )

    def _run_jobs(self, pipeline, request, jobs: list[ImageJob], progress) -> list[tuple[Image, bool | None]]:
        """Run the jobs in one call; out of memory, retry in halves before giving up.

        Every image has its own seeded generator, so a split batch gives the same images.
        """
        try:
            return self._call(pipeline, request, jobs, progress)
        except OUT_OF_MEMORY:
            if len(jobs) == 1:
                raise
            logger.warning("out of memory with %d images in one call; retrying in halves", len(jobs))
        # Out of the except block: its traceback held the failed call's frames, and with them its tensors.
        release_memory()
        middle = len(jobs) // 2
        return self._run_jobs(pipeline, request, jobs[:middle], progress) + self._run_jobs(
            pipeline, request, jobs[middle:], progress
        )

    def _call(self, pipeline, request: GenerationRequest, jobs: list[ImageJob], progress) -> list[tuple[Image, bool | None]]:
        prompts = [job.prompt for job in jobs]
        negative_prompts = [job.negative_prompt for job in jobs]
        # CPU generators give the same noise on every device.
        generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
        arguments = {
            "prompt": prompts,
            "height": request.height,
            "width": request.width,
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "generator": generators,
        }
        if any(negative_prompts):  # only when asked: some pipelines (FLUX) take none
            arguments["negative_prompt"] = negative_prompts
        if request.task != "txt2img":
            arguments["image"] = [job.image for job in jobs]
            arguments["strength"] = request.effective_strength
        if request.task == "inpaint":
            arguments["mask_image"] = [job.mask_image for job in jobs]
        if request.controlnet is not None:
            # ControlNet txt2img pipelines take the conditioning image as `image`.
            arguments["control_image" if request.task != "txt2img" else "image"] = [job.control_image for job in jobs]
            arguments["controlnet_conditioning_scale"] = request.controlnet_conditioning_scale
        if progress:
            progress.begin_call()
            arguments["callback_on_step_end"] = progress.step
        arguments = without_unsupported(pipeline, arguments)
        if self.refines(request):
            return self._refine(pipeline, arguments, progress)
        return pictures_of(pipeline(**arguments))

    def refines(self, request: GenerationRequest) -> bool:
        return self.refiner is not None and request.use_refiner and request.task == "txt2img" and not request.controlnet

    def _refine(self, pipeline, arguments: dict, progress) -> list[tuple[Image, bool | None]]:
        """SDXL's ensemble of experts: the base denoises the high-noise part, the refiner finishes in latents."""
        latents = pipeline(**arguments, denoising_end=self.refiner_switch, output_type="latent").images
        if progress:
            progress.begin_stage()
        refiner_arguments = without_unsupported(self.refiner, arguments)
        return pictures_of(self.refiner(**refiner_arguments, image=latents, denoising_start=self.refiner_switch))

    def _activate_loras(self, weights: dict[str, float]) -> None:
        """Switch adapters on the shared modules; the base weights stay loaded and untouched."""
        if not self.has_loras:
            return
        if weights:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters(list(weights), adapter_weights=list(weights.values()))
        else:
            self.pipeline.disable_lora()



class Progress:
    """Numbers the denoising steps of a group's pipeline call, across the base and refiner stages."""

    def __init__(self, group: list[GenerationRequest], listener: StepListener, total: int | None = None):
        self.group, self.listener, self.total = group, listener, total
        self.offset = self.done = 0
        self.start = time.perf_counter()

    def begin_call(self) -> None:
        """A new pipeline call; after an out-of-memory retry the count starts again."""
        self.offset = self.done = 0

    def begin_stage(self) -> None:
        self.offset = self.done

    def step(self, pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        self.done = self.offset + step + 1
        total = self.total or self.offset + pipeline.num_timesteps
        self.listener(self.group, self.done, total, time.perf_counter() - self.start)
        return callback_kwargs


def release_memory() -> None:
    """Free what the failed call left: cycles first, then the CUDA cache they held."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def without_unsupported(pipeline: DiffusionPipeline, arguments: dict) -> dict:
    accepted = call_parameters(type(pipeline))
    return {name: value for name, value in arguments.items() if name in accepted or name not in OPTIONAL_ARGUMENTS}


@cache
def call_parameters(pipeline_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(pipeline_class.__call__).parameters)

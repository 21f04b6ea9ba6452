"""Step-level batching: requests join a running set at the next denoising step and leave after their last.

Each run keeps what the pipeline would keep for it alone: its latents, its own scheduler (so its own
timesteps and sampler state), its guidance and its seeded generators. One iteration makes one denoiser
call per group of runs that share a latent shape, with a per-sample timestep tensor; guidance and the
scheduler's step are applied to each run's own slice. So a run gives the image the pipeline gives it
alone, up to the denoiser's kernels not being batch-invariant (docs/step-batching.md measures it).
"""

import copy
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from itertools import groupby

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from handlers.core.answers import Generation
from handlers.core.errors import GenerationFailed, OutOfMemory, RequestError
from handlers.core.execution_device import own_class
from handlers.core.generation import OUT_OF_MEMORY, ImageGenerator, image_jobs, release_memory
from handlers.core.schema import GenerationRequest

logger = logging.getLogger(__name__)

# Called after each step of a run: (its key, steps done, its total, seconds since it joined).
RunListener = Callable[[Hashable, int, int, float], None]
Result = Generation | RequestError


@dataclass(eq=False)
class Run:
    """One request in the running set, with everything its own pipeline call would hold."""

    key: Hashable
    request: GenerationRequest
    sampler: StableDiffusionPipeline  # the request's view, with a scheduler of its own
    embeddings: torch.Tensor  # [negative; prompt] when guided
    latents: torch.Tensor
    timesteps: torch.Tensor
    guided: bool
    step_arguments: dict
    generators: list[torch.Generator]
    done: int = 0
    joined: float = field(default_factory=time.perf_counter)

    @property
    def total(self) -> int:
        return len(self.timesteps)

    @property
    def shape(self) -> tuple:
        """Runs with equal shapes share a denoiser call."""
        return tuple(self.latents.shape[1:]), self.latents.dtype


class StepBatcher:
    """Starts, steps and finishes runs of Stable Diffusion 1.x/2.x views (txt2img and img2img).

    Other pipelines keep their whole-call loop: their denoisers take other inputs (SDXL's added
    conditions, FLUX's packed latents), and inpainting blends a mask into every step.
    """

    def __init__(self, generator: ImageGenerator):
        self.generator = generator
        self.unet = generator.pipeline.unet if own_class(generator.pipeline) is StableDiffusionPipeline else None

    def can_step(self, request: GenerationRequest) -> bool:
        """Whether the request can join a running set; the others run whole, as in a static batch."""
        return (
            self.unet is not None
            and self.unet.config.time_cond_proj_dim is None  # LCM's guidance embedding would need its own input
            and request.task in ("txt2img", "img2img")
            and request.controlnet is None
            and not self.generator.has_loras  # adapters are switched on the shared modules, for every run at once
            and not self.generator.refines(request)
            and request.denoising_steps >= 1
        )

    @torch.no_grad()
    def start(self, key: Hashable, request: GenerationRequest) -> Run:
        """Encode the prompts and draw the starting latents, as the pipeline does before its loop."""
        view = self.generator.views.pipeline_for(request.task, None, request.scheduler)
        sampler = copy.copy(view)
        # Set past the pipeline's __setattr__, which would rewrite the shared config.
        object.__setattr__(sampler, "scheduler", type(view.scheduler).from_config(view.scheduler.config))
        device = sampler._execution_device
        jobs = image_jobs([request])
        count = len(jobs)
        guided = request.guidance_scale > 1
        negatives = [job.negative_prompt for job in jobs]
        prompt, negative = sampler.encode_prompt(
            [job.prompt for job in jobs], device, 1, guided, negatives if any(negatives) else None
        )
        embeddings = torch.cat([negative, prompt]) if guided else prompt
        generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
        timesteps, steps = retrieve_timesteps(sampler.scheduler, request.num_inference_steps, device)
        if isinstance(view, StableDiffusionImg2ImgPipeline):
            image = sampler.image_processor.preprocess([job.image for job in jobs])
            timesteps, steps = sampler.get_timesteps(steps, request.effective_strength, device)
            latents = sampler.prepare_latents(
                image, timesteps[:1].repeat(count), count, 1, embeddings.dtype, device, generators
            )
        else:
            channels = self.unet.config.in_channels
            latents = sampler.prepare_latents(
                count, channels, request.height, request.width, embeddings.dtype, device, generators
            )
        step_arguments = sampler.prepare_extra_step_kwargs(generators, 0.0)
        return Run(key, request, sampler, embeddings, latents, timesteps, guided, step_arguments, generators)

    @torch.no_grad()
    def step(self, runs: list[Run]) -> dict[Hashable, RequestError]:
        """One denoising step for every run, in one denoiser call per shape; the runs that failed, with their errors."""
        failures = {}
        for _, group in groupby(sorted(runs, key=lambda run: str(run.shape)), key=lambda run: str(run.shape)):
            failures |= self._step_group(list(group))
        return failures

    def _step_group(self, group: list[Run]) -> dict[Hashable, RequestError]:
        try:
            predictions = self._predict(group)
        except OUT_OF_MEMORY:
            if len(group) == 1:
                logger.exception("out of memory stepping request %s alone", group[0].key)
                return {group[0].key: OutOfMemory()}
            logger.warning("out of memory stepping %d requests in one call; stepping them in halves", len(group))
            predictions = None
        except Exception:  # noqa: BLE001 - whatever the denoiser raises, the run that caused it is found below
            if len(group) == 1:
                logger.exception("the denoiser failed for request %s", group[0].key)
                return {group[0].key: failed("the denoiser failed")}
            logger.warning("a shared denoiser call of %d requests failed; stepping them one at a time", len(group))
            return {key: error for run in group for key, error in self._step_group([run]).items()}
        if predictions is None:
            # Out of the except block: its traceback held the failed call's tensors.
            release_memory()
            middle = len(group) // 2
            return self._step_group(group[:middle]) | self._step_group(group[middle:])
        failures = {}
        for run, prediction in zip(group, predictions):
            try:
                self._advance(run, prediction)
            except Exception as error:  # noqa: BLE001 - one run's scheduler failing stays with that run
                logger.exception("stepping request %s failed", run.key)
                failures[run.key] = failed(f"its sampler failed ({type(error).__name__})")
        return failures

    def _predict(self, group: list[Run]) -> list[torch.Tensor]:
        """Each run's noise prediction, from one denoiser call over the group."""
        inputs, embeddings, timesteps = [], [], []
        for run in group:
            timestep = run.timesteps[run.done]
            latents = torch.cat([run.latents] * 2) if run.guided else run.latents
            latents = run.sampler.scheduler.scale_model_input(latents, timestep)
            inputs.append(latents)
            embeddings.append(run.embeddings)
            timesteps.append(timestep.float().expand(latents.shape[0]))
        noise = self.unet(
            torch.cat(inputs), torch.cat(timesteps), encoder_hidden_states=torch.cat(embeddings), return_dict=False
        )[0]
        return list(noise.split([len(latents) for latents in inputs]))

    def _advance(self, run: Run, prediction: torch.Tensor) -> None:
        if run.guided:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + run.request.guidance_scale * (conditional - unconditional)
        timestep = run.timesteps[run.done]
        latents = run.sampler.scheduler.step(prediction, timestep, run.latents, **run.step_arguments, return_dict=False)[0]
        if not torch.isfinite(latents).all():
            raise FloatingPointError("the latents are no longer finite")
        run.latents = latents
        run.done += 1

    @torch.no_grad()
    def finish(self, run: Run) -> Generation:
        """Decode, check and convert the run's images, as the pipeline does after its loop."""
        sampler = run.sampler
        scaled = run.latents / sampler.vae.config.scaling_factor
        image = sampler.vae.decode(scaled, return_dict=False, generator=run.generators)[0]
        image, nsfw = sampler.run_safety_checker(image, run.latents.device, run.embeddings.dtype)
        normalise = [True] * len(image) if nsfw is None else [not flag for flag in nsfw]
        images = sampler.image_processor.postprocess(image, output_type="pil", do_denormalize=normalise)
        flags = [bool(flag) for flag in nsfw] if nsfw is not None else None
        return Generation(images, time.perf_counter() - run.joined, flags)


def failed(what: str) -> GenerationFailed:
    return GenerationFailed(f"generation failed: {what}; the worker log has the details")


class RunningSet:
    """The requests a worker is generating, stepped together; each engine feeds it and drains it.

    capacity bounds how many requests run at once: the engine's batch size, so a running set never holds
    more work than a static batch may. Requests that cannot step (see StepBatcher.can_step) run whole
    when they join, as a batch of one.
    """

    def __init__(self, generator: ImageGenerator, capacity: int, on_step: RunListener | None = None):
        self.generator, self.capacity, self.on_step = generator, capacity, on_step
        self.batcher = StepBatcher(generator)
        self.runs: dict[Hashable, Run] = {}

    def __len__(self) -> int:
        return len(self.runs)

    @property
    def free(self) -> int:
        return max(self.capacity - len(self.runs), 0)

    def join(self, key: Hashable, request: GenerationRequest | RequestError) -> Result | None:
        """Start the request, or answer it at once: None while it runs, else its result."""
        if isinstance(request, RequestError):
            return request
        if not self.batcher.can_step(request):
            progress = None
            if self.on_step:
                progress = lambda group, step, total, elapsed: self.on_step(key, step, total, elapsed)  # noqa: E731
            [result] = self.generator.generate([request], progress)
            return result
        try:
            self.runs[key] = self.batcher.start(key, request)
        except RequestError as error:
            return error
        except OUT_OF_MEMORY:
            logger.exception("out of memory starting request %s", key)
            return OutOfMemory()
        except Exception as error:  # noqa: BLE001 - whatever a library raises, it stays with this request
            logger.exception("starting request %s failed", key)
            return failed(f"its start failed ({type(error).__name__})")
        return None

    def drop(self, key: Hashable) -> None:
        """Forget a request whose client went away; it makes no more steps."""
        self.runs.pop(key, None)

    def iterate(self) -> dict[Hashable, Result]:
        """One step for every running request; those that finished or failed leave, with their results."""
        if not self.runs:
            return {}
        failures = self.batcher.step(list(self.runs.values()))
        results: dict[Hashable, Result] = {}
        for key, run in list(self.runs.items()):
            if key in failures:
                results[key] = failures[key]
            elif self.on_step:
                self.on_step(key, run.done, run.total, time.perf_counter() - run.joined)
            if key not in failures and run.done == run.total:
                results[key] = self._finish(run)
        for key in results:
            del self.runs[key]
        return results

    def _finish(self, run: Run) -> Result:
        try:
            return self.batcher.finish(run)
        except OUT_OF_MEMORY:
            logger.exception("out of memory decoding request %s", run.key)
            return OutOfMemory()
        except Exception as error:  # noqa: BLE001 - a failed decode stays with its request
            logger.exception("decoding request %s failed", run.key)
            return failed(f"its decode failed ({type(error).__name__})")

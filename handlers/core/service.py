"""One model, served: what a TorchServe worker or a Ray Serve replica holds, and what every request
goes through, with no server in it. Each engine's adapter turns its own requests into fields and
this service's answers into its own responses."""

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from handlers.core.answers import Answer, Encoder, Generation, answer_size_bound, generated_answer
from handlers.core.archive import locate_pipeline
from handlers.core.config import HandlerConfig, model_description
from handlers.core.errors import InternalError, RequestError
from handlers.core.generation import ImageGenerator, StepListener
from handlers.core.limits import SizeBound, check_defaults_fit
from handlers.core.pipelines import (
    apply_memory_options,
    compile_counts,
    compile_denoiser,
    load_controlnets,
    load_loras,
    load_pipeline,
    resolve_batching,
    resolve_dtype,
    resolve_reference,
    select_device,
    ships_safety_checker,
)
from handlers.core.request import Adapters, parse_request
from handlers.core.schema import GenerationRequest
from handlers.core.stepping import RunListener, RunningSet
from handlers.core.weights import read_manifest, referenced_pipeline

logger = logging.getLogger(__name__)


class DiffusionService:
    """The pipeline and its views, loaded once, and each request's way through them: read, generate, encode."""

    def __init__(
        self, model_dir: Path, config: HandlerConfig, gpu_id: int | None = None, size_bound: SizeBound | None = None,
        model_name: str = "",
    ):
        self.config, self.model_name = config, model_name
        self.defaults, self.limits = config.generation_defaults, config.limits
        self.size_bound = size_bound or answer_size_bound
        # Before any weights load: defaults that every request would be refused for stop the model now.
        check_defaults_fit(self.defaults, self.limits, self.size_bound)
        self.device = select_device(gpu_id)
        unpack_dir = Path(config.unpack_dir) if config.unpack_dir else None
        pipeline_dir = locate_pipeline(model_dir, unpack_dir, config.max_unpacked_bytes)
        manifest = read_manifest(pipeline_dir)
        # An archive that references its weights loads them where they lie; its adapters are in the archive.
        load_dir = pipeline_dir if manifest is None else referenced_pipeline(pipeline_dir, manifest, config)
        dtype = resolve_dtype(config.torch_dtype, self.device)
        combine = resolve_batching(config.batching, self.device)
        allow_pickle = config.allow_pickle_weights
        logger.info("loading %s on %s as %s (combined batches: %s, %d CPU threads)", load_dir, self.device, dtype,
                    combine, torch.get_num_threads())
        without = {} if config.safety_checker or not ships_safety_checker(pipeline_dir) else {"safety_checker": None}
        self.pipeline = load_pipeline(load_dir, dtype, allow_pickle, config.variant, **without)
        # Work counts denoiser evaluations: a request that names no sampler gets the pipeline's own.
        self.own_sampler_order = getattr(self.pipeline.scheduler, "order", 1)
        check_defaults_fit(self.defaults, self.limits, self.size_bound, self.own_sampler_order)
        load_loras(self.pipeline, config.loras, pipeline_dir, allow_pickle)
        controlnets = load_controlnets(config.controlnets, pipeline_dir, dtype, allow_pickle)
        refiner = None
        if config.refiner:
            # The refiner shares the base's second text encoder and VAE rather than loading copies.
            refiner = load_pipeline(
                resolve_reference(config.refiner, pipeline_dir, "refiner"),
                dtype,
                allow_pickle,
                text_encoder_2=self.pipeline.text_encoder_2,
                vae=self.pipeline.vae,
            )
        for pipeline in (self.pipeline, refiner):
            if pipeline is not None:
                apply_memory_options(pipeline, config, self.device)
        for controlnet in controlnets.values():
            controlnet.to(self.device)
        self.adapters = Adapters(loras=tuple(config.loras), controlnets=tuple(controlnets))
        self.generator = ImageGenerator(
            self.pipeline, combine, controlnets, bool(config.loras), refiner, config.refiner_switch
        )
        if config.torch_compile:
            compile_denoiser(self.pipeline, config)
        if config.warm_up or config.torch_compile:
            self.warm_up()
        # The model's half a million Python objects live as long as the worker: out of the collector's reach,
        # a request's own allocations no longer make every full collection walk them. A JSON body of a
        # million empty lists took 1.3 s to parse beside a loaded pipeline, and 0.2 s after this.
        gc.collect()
        gc.freeze()

    def warm_up(self) -> None:
        """One short generation at the default size, so compilation (and CUDA's first-call set-up) happens
        here, not in the first request.

        Inductor's on-disk caches make it cheap for every worker after the first: their graphs and
        kernels load instead of compiling. A cache that does not match (another torch, another
        device) is a miss, and the graph compiles as if there were none.
        """
        start = time.perf_counter()
        before = compile_counts()
        request = GenerationRequest(**{**self.defaults.model_dump(), "prompt": "warm-up", "num_inference_steps": 1})
        [result] = self.generator.generate([request])
        if isinstance(result, RequestError):
            raise RuntimeError(f"warm-up generation failed: {result.message}")
        compiled, loaded = (after - earlier for after, earlier in zip(compile_counts(), before))
        logger.info(
            "warm-up generation took %.1f s: %d graphs compiled, %d loaded from inductor's cache",
            time.perf_counter() - start, compiled, loaded,
        )

    def describe(self) -> dict:
        """The model's request schema, defaults, limits and adapters (handlers/core/config.py)."""
        return model_description(self.config)

    def read(self, read_fields: Callable[[], dict], accept: str | None, request_id: str) -> GenerationRequest | RequestError:
        """One request, validated; read_fields gets its fields from the engine's own request. Whatever
        goes wrong stays with this request."""
        try:
            return parse_request(read_fields(), self.defaults, self.limits, self.size_bound, accept, self.adapters,
                                 self.own_sampler_order)
        except RequestError as error:
            return error
        except Exception:  # noqa: BLE001 - whatever a library raises for this request stays with this request
            logger.exception("reading request %s failed", request_id)
            return InternalError("the server failed to read this request; the worker log has the details")

    def generate(
        self, requests: list[GenerationRequest | RequestError], on_step: StepListener | None = None
    ) -> list[Generation | RequestError]:
        """Each request's images or error, in order; requests refused already keep their error."""
        valid = [request for request in requests if not isinstance(request, RequestError)]
        logger.info("batch of %d requests, %d valid", len(requests), len(valid))
        generated = iter(self.generator.generate(valid, on_step))
        return [request if isinstance(request, RequestError) else next(generated) for request in requests]

    def running_set(self, capacity: int, on_step: RunListener | None = None) -> RunningSet:
        """A running set for step-level batching (batching: step), of at most capacity requests."""
        return RunningSet(self.generator, capacity, on_step)

    def answer(
        self, request: GenerationRequest | RequestError, result: Generation | RequestError, request_id: str,
        encode: Encoder | None = None,
    ) -> Answer:
        """The answer to one request: its images encoded (encode replaces the plain HTTP encoding where an
        engine wraps answers its own way), or its error."""
        if isinstance(result, RequestError):
            return Answer.refusal(result, self.model_name)
        try:
            return generated_answer(request, result, self.model_name, encode)
        except Exception:  # noqa: BLE001 - one answer that fails to encode must not fail its batch-mates
            logger.exception("encoding the answer to request %s failed", request_id)
            error = InternalError("the server failed to encode the images; the worker log has the details")
            return Answer.refusal(error, self.model_name)

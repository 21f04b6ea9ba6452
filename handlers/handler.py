"""TorchServe entry point: thin glue between request parsing, the pipeline and the encoders."""

import logging
import time
from http import HTTPStatus
from pathlib import Path

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

from handlers.archive import locate_pipeline
from handlers.codecs import JSON, NDJSON, answer_size_bound, encode_response, progress_line, stream_result
from handlers.config import load_handler_config
from handlers.errors import InternalError, PayloadTooLarge, RequestError
from handlers.generation import ImageGenerator
from handlers.metrics import GenerationMetrics
from handlers.pipelines import (
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
from handlers.request import (
    Adapters,
    GenerationRequest,
    check_defaults_fit,
    is_v2_inputs,
    merge_v2_inputs,
    parse_request,
)

logger = logging.getLogger(__name__)


class DiffusersHandler(BaseHandler):
    """Serves any diffusers text-to-image pipeline; one response per request, in order."""

    def initialize(self, context):
        properties = context.system_properties
        self.config = load_handler_config(context.model_yaml_config)
        self.defaults, self.limits = self.config.generation_defaults, self.config.limits
        # Before any weights load: defaults that every request would be refused for stop the model now.
        check_defaults_fit(self.defaults, self.limits, self.config.service_envelope)
        self.device = select_device(properties.get("gpu_id"))
        unpack_dir = Path(self.config.unpack_dir) if self.config.unpack_dir else None
        pipeline_dir = locate_pipeline(Path(properties["model_dir"]), unpack_dir, self.config.max_unpacked_bytes)
        dtype = resolve_dtype(self.config.torch_dtype, self.device)
        combine = resolve_batching(self.config.batching, self.device)
        allow_pickle = self.config.allow_pickle_weights
        logger.info("loading %s on %s as %s (combined batches: %s)", pipeline_dir, self.device, dtype, combine)
        without = {} if self.config.safety_checker or not ships_safety_checker(pipeline_dir) else {"safety_checker": None}
        self.pipeline = load_pipeline(pipeline_dir, dtype, allow_pickle, self.config.variant, **without)
        load_loras(self.pipeline, self.config.loras, pipeline_dir, allow_pickle)
        controlnets = load_controlnets(self.config.controlnets, pipeline_dir, dtype, allow_pickle)
        refiner = None
        if self.config.refiner:
            # The refiner shares the base's second text encoder and VAE rather than loading copies.
            refiner = load_pipeline(
                resolve_reference(self.config.refiner, pipeline_dir, "refiner"),
                dtype,
                allow_pickle,
                text_encoder_2=self.pipeline.text_encoder_2,
                vae=self.pipeline.vae,
            )
        for pipeline in (self.pipeline, refiner):
            if pipeline is not None:
                apply_memory_options(pipeline, self.config, self.device)
        for controlnet in controlnets.values():
            controlnet.to(self.device)
        self.adapters = Adapters(loras=tuple(self.config.loras), controlnets=tuple(controlnets))
        self.generator = ImageGenerator(
            self.pipeline, combine, controlnets, bool(self.config.loras), refiner, self.config.refiner_switch
        )
        if self.config.torch_compile:
            compile_denoiser(self.pipeline, self.config)
        if self.config.warm_up or self.config.torch_compile:
            self.warm_up()
        self.metrics = GenerationMetrics(context.metrics, context.model_name)
        # The envelope JSON-encodes whatever the handler returns: answers must be JSON values, not bytes.
        self.enveloped = self.config.service_envelope != "none"
        self.initialized = True

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
        [outcome] = self.generator.generate([request])
        if isinstance(outcome, RequestError):
            raise RuntimeError(f"warm-up generation failed: {outcome.message}")
        compiled, loaded = (after - earlier for after, earlier in zip(compile_counts(), before))
        logger.info(
            "warm-up generation took %.1f s: %d graphs compiled, %d loaded from inductor's cache",
            time.perf_counter() - start, compiled, loaded,
        )

    def preprocess(self, data):
        if self.enveloped and not data:
            return [
                RequestError(
                    'the KServe envelope found nothing to generate: send {"instances": [...]} (v1) '
                    'or {"inputs": [...]} (v2), whichever service_envelope the server runs',
                    field="body",
                )
            ]
        if self.config.service_envelope == "kservev2" and is_v2_inputs(data):
            data = [merge_v2_inputs(data)]  # the kservev2 envelope splits one request into its inputs
        if self.enveloped and len(data) > self.limits.max_images_per_request:
            return [self._too_many_instances(f"{len(data)} instances")]
        requests = [self._parse(index, row) for index, row in enumerate(data)]
        if self.enveloped:
            return self._within_envelope_totals(requests)
        return requests

    def _within_envelope_totals(self, requests: list) -> list:
        """The instances of one KServe request share one answer: the caps hold for all of them together."""
        valid = [request for request in requests if not isinstance(request, RequestError)]
        images = sum(request.image_count for request in valid)
        if images > self.limits.max_images_per_request:
            return [self._too_many_instances(f"{images} images")]
        answer_bytes = sum(answer_size_bound(request, self.config.service_envelope) for request in valid)
        if answer_bytes > self.limits.max_response_bytes:
            return [
                PayloadTooLarge(
                    f"the instances' answers could take {answer_bytes} bytes together, over the server's limit of "
                    f"{self.limits.max_response_bytes}: send fewer instances, or ask for png, jpeg or webp",
                    field="instances",
                    allowed={"max_response_bytes": self.limits.max_response_bytes},
                )
            ]
        return requests

    def _too_many_instances(self, asked: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the envelope asks for {asked}; one HTTP request may ask for at most "
            f"{self.limits.max_images_per_request} images in all",
            field="instances",
            allowed={"max_images_per_request": self.limits.max_images_per_request},
        )

    def _parse(self, index: int, row) -> GenerationRequest | RequestError:
        try:
            request = parse_request(
                row,
                self.defaults,
                self.limits,
                body_type=(self._header(index, "body") or {}).get("content-type"),
                accept=self._header(index, "Accept"),
                adapters=self.adapters,
                envelope=self.config.service_envelope,
            )
        except RequestError as error:
            return error
        except Exception:  # noqa: BLE001 - whatever a library raises for this row stays with this row
            logger.exception("reading request %s failed", self._request_id(index))
            return InternalError("the server failed to read this request; the worker log has the details")
        if self.enveloped and request.stream:
            return RequestError("stream is not available through a KServe envelope", field="stream")
        return request

    def inference(self, data, *args, **kwargs):
        valid = [request for request in data if not isinstance(request, RequestError)]
        logger.info("batch of %d requests, %d valid", len(data), len(valid))
        streaming = {id(request): index for index, request in enumerate(data) if getattr(request, "stream", False)}
        on_step = self._stream_progress(streaming) if streaming else None
        generated = iter(self.generator.generate(valid, on_step))
        outcomes = []
        for request in data:
            if isinstance(request, RequestError):
                outcomes.append(request)
                continue
            result = next(generated)
            outcomes.append(result if isinstance(result, RequestError) else (request, result))
        return outcomes

    def postprocess(self, data):
        encoded = [self._encode(index, outcome) for index, outcome in enumerate(data)]
        self._record_metrics(encoded)
        if self.enveloped:
            return self._enveloped_responses(encoded)
        responses = []
        for index, outcome in enumerate(encoded):
            if isinstance(outcome, RequestError):
                self.context.set_response_status(outcome.status, HTTPStatus(outcome.status).phrase, index)
                self.context.set_response_content_type(index, JSON)
                responses.append(outcome.to_json())
                continue
            request, generated, (body, content_type) = outcome
            self.context.set_response_content_type(index, content_type)
            self.context.set_response_header(index, "X-Seed", str(request.seed))
            if generated.nsfw_flags is not None:  # one flag per image, in order: the only word a raw image can carry
                flags = ",".join(str(flag).lower() for flag in generated.nsfw_flags)
                self.context.set_response_header(index, "X-NSFW-Content-Detected", flags)
            responses.append(body)
        return responses

    def _encode(self, index: int, outcome):
        """(request, generated, (body, content type)), or the request's error."""
        if isinstance(outcome, RequestError):
            return outcome
        request, generated = outcome
        try:
            if request.stream:
                encoded = stream_result(request, generated.images, generated.nsfw_flags)
            else:
                encoded = encode_response(
                    request, generated.images, enveloped=self.enveloped, nsfw_flags=generated.nsfw_flags
                )
        except Exception:  # noqa: BLE001 - one answer that fails to encode must not fail its batch-mates
            logger.exception("encoding the answer to request %s failed", self._request_id(index))
            return InternalError("the server failed to encode the images; the worker log has the details")
        return request, generated, encoded

    def _stream_progress(self, streaming: dict[int, int]):
        """Send each streaming request of a group one JSON line per step, as a TorchServe intermediate response."""

        def on_step(group, step, total, elapsed):
            for request in group:
                index = streaming.get(id(request))
                if index is None:
                    continue
                try:
                    self.context.set_response_content_type(index, NDJSON)
                    send_intermediate_predict_response(
                        {index: progress_line(step, total, elapsed)},
                        {index: self.context.request_ids[index]},
                        "Intermediate Prediction success",
                        200,
                        self.context,
                    )
                except Exception:  # noqa: BLE001 - a lost progress line must not cost the images
                    logger.exception("progress for request %s not sent; no more lines for it", self._request_id(index))
                    del streaming[id(request)]

        return on_step

    def _record_metrics(self, data) -> None:
        for index, outcome in enumerate(data):
            request_id = self._request_id(index)
            try:
                if isinstance(outcome, RequestError):
                    self.metrics.record_error(outcome, request_id)
                else:
                    request, generated, _ = outcome
                    self.metrics.record_images(request, len(generated.images), generated.seconds, request_id)
            except Exception:  # noqa: BLE001 - a metric is never worth an answer
                logger.exception("recording metrics for request %s failed", request_id)

    def _request_id(self, index: int) -> str:
        return (getattr(self.context, "request_ids", None) or {}).get(index, f"#{index}")

    def _enveloped_responses(self, data):
        """Inside a KServe envelope all instances share one HTTP response, so errors travel as values."""
        responses = [outcome.to_dict() if isinstance(outcome, RequestError) else outcome[2][0] for outcome in data]
        errors = [outcome for outcome in data if isinstance(outcome, RequestError)]
        if errors and len(errors) == len(data):
            self.context.set_response_status(errors[0].status, HTTPStatus(errors[0].status).phrase, 0)
        return responses

    def _header(self, index: int, name: str):
        """A request header by case-insensitive name; none inside an envelope, where rows are not requests."""
        if self.enveloped:
            return None
        headers = self.context.get_all_request_header(index)
        return next((value for key, value in headers.items() if key.lower() == name.lower()), None)


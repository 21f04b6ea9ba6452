"""TorchServe's adapter: a BaseHandler over the core's DiffusionService. It reads TorchServe's rows and
envelopes, and writes the service's answers, progress lines and metrics back through TorchServe's context."""

import json
import logging
from http import HTTPStatus
from pathlib import Path

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

from handlers.core.answers import Answer, progress_line
from handlers.core.bodies import merge_v2_inputs
from handlers.core.config import load_handler_config
from handlers.core.errors import PayloadTooLarge, RequestError
from handlers.core.formats import JSON, NDJSON
from handlers.core.schema import GenerationRequest
from handlers.core.service import DiffusionService
from handlers.torchserve.envelopes import envelope_size_bound, enveloped_answer, is_v2_inputs, read_row
from handlers.torchserve.metrics import TorchServeMetrics

logger = logging.getLogger(__name__)


class DiffusersHandler(BaseHandler):
    """Serves any diffusers text-to-image pipeline; one response per request, in order."""

    def initialize(self, context):
        self.config = load_handler_config(context.model_yaml_config)
        self.limits = self.config.limits
        # The envelope JSON-encodes whatever the handler returns: answers must be JSON values, not bytes.
        self.enveloped = self.config.service_envelope != "none"
        self.size_bound = envelope_size_bound(self.config.service_envelope)
        properties = context.system_properties
        self.service = DiffusionService(
            Path(properties["model_dir"]), self.config, properties.get("gpu_id"), self.size_bound, context.model_name
        )
        self.metrics = TorchServeMetrics(context.metrics)
        self.initialized = True

    def describe_handle(self):
        """What `GET /models/{name}?customized=true` shows as customizedMetadata: this model's request schema."""
        return json.dumps(self.service.describe())

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
        answer_bytes = sum(self.size_bound(request) for request in valid)
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
        body_type = (self._header(index, "body") or {}).get("content-type")
        request = self.service.read(lambda: read_row(row, body_type), self._header(index, "Accept"), self._request_id(index))
        if self.enveloped and not isinstance(request, RequestError) and request.stream:
            return RequestError("stream is not available through a KServe envelope", field="stream")
        return request

    def inference(self, data, *args, **kwargs):
        streaming = {id(request): index for index, request in enumerate(data) if getattr(request, "stream", False)}
        return data, self.service.generate(data, self._stream_progress(streaming) if streaming else None)

    def postprocess(self, data):
        requests, results = data
        encode = enveloped_answer if self.enveloped else None
        answers = [
            self.service.answer(request, result, self._request_id(index), encode)
            for index, (request, result) in enumerate(zip(requests, results))
        ]
        self._record_metrics(answers)
        if self.enveloped:
            return self._enveloped_responses(answers)
        for index, answer in enumerate(answers):
            if answer.status != 200:
                self.context.set_response_status(answer.status, HTTPStatus(answer.status).phrase, index)
            self.context.set_response_content_type(index, answer.content_type)
            for name, value in answer.headers.items():
                self.context.set_response_header(index, name, value)
        return [answer.body for answer in answers]

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

    def _record_metrics(self, answers: list[Answer]) -> None:
        for index, answer in enumerate(answers):
            request_id = self._request_id(index)
            try:
                self.metrics.record(answer.metrics, request_id)
            except Exception:  # noqa: BLE001 - a metric is never worth an answer
                logger.exception("recording metrics for request %s failed", request_id)

    def _request_id(self, index: int) -> str:
        return (getattr(self.context, "request_ids", None) or {}).get(index, f"#{index}")

    def _enveloped_responses(self, answers: list[Answer]) -> list:
        """Inside a KServe envelope all instances share one HTTP response, so errors travel as values."""
        errors = [answer for answer in answers if answer.status != 200]
        if errors and len(errors) == len(answers):
            self.context.set_response_status(errors[0].status, HTTPStatus(errors[0].status).phrase, 0)
        return [answer.error if answer.status != 200 else answer.body for answer in answers]

    def _header(self, index: int, name: str):
        """A request header by case-insensitive name; none inside an envelope, where rows are not requests."""
        if self.enveloped:
            return None
        headers = self.context.get_all_request_header(index)
        return next((value for key, value in headers.items() if key.lower() == name.lower()), None)

"""TorchServe's adapter: a BaseHandler over the core's DiffusionService. It reads TorchServe's rows (plain
requests, or KServe v1/v2 bodies when kserve_protocol says so), and writes the service's answers, progress
lines and metrics back through TorchServe's context."""

import json
import logging
from http import HTTPStatus
from pathlib import Path

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

from handlers.core.answers import Answer, progress_line
from handlers.core.config import load_handler_config
from handlers.core.errors import InternalError, PayloadTooLarge, RequestError
from handlers.core.formats import JSON, NDJSON
from handlers.core.service import DiffusionService
from handlers.torchserve.kserve import (
    KServeRow,
    read_v1,
    read_v2,
    request_size_bound,
    v1_answer,
    v1_size_bound,
    v2_answer,
    v2_size_bound,
    value_of,
)
from handlers.torchserve.continuous import ContinuousSteps, Reply
from handlers.torchserve.metrics import TorchServeMetrics
from handlers.torchserve.rows import body_type, read_row, text_header

logger = logging.getLogger(__name__)


class DiffusersHandler(BaseHandler):
    """Serves any diffusers text-to-image pipeline; one response per request, in order."""

    def initialize(self, context):
        self.config = load_handler_config(context.model_yaml_config)
        self.limits, self.protocol = self.config.limits, self.config.kserve_protocol
        check_batch_timeout(context.model_yaml_config or {}, context.system_properties.get("batch_size", 1),
                            self.limits.request_timeout_s)
        check_continuous_batching(context.model_yaml_config or {}, self.config.batching)
        properties = context.system_properties
        self.service = DiffusionService(Path(properties["model_dir"]), self.config, properties.get("gpu_id"),
                                        request_size_bound(self.protocol), context.model_name)
        self.model_version = (context.manifest or {}).get("model", {}).get("modelVersion", "")
        self.metrics = TorchServeMetrics(context.metrics)
        self.steps = None
        if self.config.batching == "step":
            batch_size = int(properties.get("batch_size") or 1)
            self.steps = ContinuousSteps(self.service, batch_size, self._record_metric)
        self.initialized = True

    def handle(self, data, context):
        self.batch = data  # _is_describe reads it
        if self.steps is None:
            return super().handle(data, context)
        self.context = context
        if self._is_describe():
            context.stopping_criteria = None  # a whole response, as without continuous batching
            return [self.describe_handle()]
        return self._step(data)

    def _is_describe(self):
        """Only TorchServe's own describe job, one row without parameters: a client's `describe` header on a
        prediction would otherwise turn its whole batch into one description. (An open request of the running
        set also comes back without parameters, but under its own request id.)"""
        is_open = self.steps is not None and self.steps.is_open(self._request_id(0))
        return super()._is_describe() and len(self.batch) == 1 and not self.batch[0] and not is_open

    def _step(self, data) -> list:
        """One step of the running set (handlers/torchserve/continuous.py); each row gets its reply."""
        self.steps.begin_call()
        request_ids = [self._request_id(index) for index in range(len(data))]
        new_rows = {request_id: self._read(index, row)[1][0] for index, (request_id, row) in enumerate(zip(request_ids, data))
                    if not self.steps.is_open(request_id)}
        replies = self.steps.call(request_ids, new_rows)
        # TorchServe asks each reply whether it ends its request: absent (None), it is a whole response.
        self.context.stopping_criteria = [lambda _, last=reply.last: last for reply in replies]
        return [self._send(index, reply) for index, reply in enumerate(replies)]

    def _send(self, index: int, reply: Reply):
        if reply.status != 200:
            self.context.set_response_status(reply.status, HTTPStatus(reply.status).phrase, index)
        self.context.set_response_content_type(index, reply.content_type)
        for name, value in reply.headers.items():
            self.context.set_response_header(index, name, value)
        return reply.body

    def _is_explain(self):
        """Nothing here explains: a client's `explain` header is its own request's 400 (preprocess)."""
        return False

    def describe_handle(self):
        """What `GET /models/{name}?customized=true` shows as customizedMetadata: this model's request schema."""
        return json.dumps(self.service.describe())

    def preprocess(self, data):
        """Each row's requests (one, or a KServe v1 body's instances), flat; self.rows keeps which are whose."""
        self.rows, requests = [], []
        for index, row in enumerate(data):
            kserve_row, row_requests = self._read(index, row)
            self.rows.append((kserve_row, range(len(requests), len(requests) + len(row_requests))))
            requests += row_requests
        return requests

    def _read(self, index: int, row) -> tuple[KServeRow | None, list]:
        headers, request_id = self.context.get_all_request_header(index), self._request_id(index)
        if text_header(headers, "explain") == "True":
            return None, [RequestError("this model has no explanations; ask /predictions", field="explain")]
        if self.protocol == "none":
            read = lambda: read_row(row, body_type(headers))  # noqa: E731
            return None, [self.service.read(read, text_header(headers, "Accept"), request_id)]
        try:
            body = row.get("body") if isinstance(row, dict) else None
            if self.protocol == "v1":
                kserve_row = read_v1(body, body_type(headers), self.limits.max_images_per_request)
            else:
                kserve_row = read_v2(body, body_type(headers), request_id)
        except RequestError as error:
            return KServeRow(error=error), [error]
        except Exception:  # noqa: BLE001 - whatever a client's body raises stays with this request
            logger.exception("reading request %s failed", request_id)
            error = InternalError("the server failed to read this request; the worker log has the details")
            return KServeRow(error=error), [error]
        requests = [self.service.read(reader, None, request_id) for reader in kserve_row.readers]
        return kserve_row, self._within_row_totals(kserve_row, requests)

    def _within_row_totals(self, row: KServeRow, requests: list) -> list:
        """A KServe request's generations share one answer: streaming is not available, and the caps hold for
        all of them together, its echoed id and name counted in the answer's size."""
        requests = [RequestError("stream is not available through KServe's protocols", field="stream")
                    if getattr(request, "stream", False) else request for request in requests]
        valid = [request for request in requests if not isinstance(request, RequestError)]
        images, work = sum(request.image_count for request in valid), sum(request.work(self.service.own_sampler_order) for request in valid)
        size = (v1_size_bound(valid) if self.protocol == "v1" else
                sum(v2_size_bound(row, request, self.service.model_name, self.model_version) for request in valid))
        for asked, limit, name in ((images, self.limits.max_images_per_request, "max_images_per_request"),
                                   (work, self.limits.max_work, "max_work"),
                                   (size, self.limits.max_response_bytes, "max_response_bytes")):
            if asked > limit:
                error = PayloadTooLarge(f"the request's instances ask for {asked} together against its {name} of "
                                        f"{limit}: send fewer or smaller ones", field="instances", allowed={name: limit})
                row.error = error
                return [error]
        return requests

    def inference(self, data, *args, **kwargs):
        streaming = {id(request): index for index, request in enumerate(data) if getattr(request, "stream", False)}
        return data, self.service.generate(data, self._stream_progress(streaming) if streaming else None)

    def postprocess(self, data):
        requests, results = data
        encode = value_of if self.protocol != "none" else None
        request_ids = [self._request_id(index) for index, (_, indices) in enumerate(self.rows) for _ in indices]
        answers = [self.service.answer(request, result, request_id, encode)
                   for request, result, request_id in zip(requests, results, request_ids)]
        self._record_metrics(answers, request_ids)
        return [self._respond(index, kserve_row, [answers[flat] for flat in indices])
                for index, (kserve_row, indices) in enumerate(self.rows)]

    def _respond(self, index: int, kserve_row: KServeRow | None, answers: list[Answer]):
        """One row's status, Content-Type, headers and body."""
        if self.protocol == "none" or kserve_row is None:
            [answer] = answers
            status, body, content_type, headers = answer.status, answer.body, answer.content_type, answer.headers
        elif self.protocol == "v1":
            (status, body), content_type, headers = v1_answer(answers), JSON, {}
        else:
            (status, body), content_type, headers = v2_answer(kserve_row, answers[0], self.service.model_name,
                                                              self.model_version), JSON, answers[0].headers
        if status != 200:
            self.context.set_response_status(status, HTTPStatus(status).phrase, index)
        self.context.set_response_content_type(index, content_type)
        for name, value in headers.items():
            self.context.set_response_header(index, name, value)
        return body

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

    def _record_metrics(self, answers: list[Answer], request_ids: list[str]) -> None:
        for answer, request_id in zip(answers, request_ids):
            self._record_metric(answer, request_id)

    def _record_metric(self, answer: Answer, request_id: str) -> None:
        try:
            self.metrics.record(answer.metrics, request_id)
        except Exception:  # noqa: BLE001 - a metric is never worth an answer
            logger.exception("recording metrics for request %s failed", request_id)

    def _request_id(self, index: int) -> str:
        return (getattr(self.context, "request_ids", None) or {}).get(index, f"#{index}")


def check_continuous_batching(model_yaml_config: dict, batching: str) -> None:
    """Step-level batching needs the frontend's continuous batching, and that frontend mode needs it: either
    alone would answer every request after one step, or hold every request for the whole generation."""
    continuous = bool(model_yaml_config.get("continuousBatching", False))
    if continuous != (batching == "step"):
        raise ValueError(
            "model-config.yaml sets continuousBatching: true and the handler's batching: step together, or neither "
            f"(found continuousBatching: {str(continuous).lower()}, batching: {batching}); "
            "`python -m archiver build --batching step` writes both"
        )


# TorchServe's responseTimeout when model-config.yaml sets none.
DEFAULT_RESPONSE_TIMEOUT_S = 120


def check_batch_timeout(model_yaml_config: dict, batch_size: int, request_timeout_s: int) -> None:
    """TorchServe gives a whole batch responseTimeout, then kills the worker and fails every request of it:
    it must cover batch_size (the frontend's, which the worker is told) requests, each of up to max_work,
    which takes up to request_timeout_s."""
    batch_size = int(batch_size or 1)
    timeout = int(model_yaml_config.get("responseTimeout", DEFAULT_RESPONSE_TIMEOUT_S))
    if timeout < batch_size * request_timeout_s:
        raise ValueError(
            f"model-config.yaml's responseTimeout ({timeout} s) is less than batchSize ({batch_size}) x the handler's "
            f"request_timeout_s ({request_timeout_s} s): a batch of legal requests could outlive it, and TorchServe "
            "would kill the worker. Raise responseTimeout (the archiver writes batchSize x --request-timeout), or "
            "lower request_timeout_s together with max_work"
        )

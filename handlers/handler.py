"""TorchServe entry point: thin glue between request parsing, the pipeline and the encoders."""

import logging
import sys
from http import HTTPStatus
from pathlib import Path

from ts.torch_handler.base_handler import BaseHandler
from ts.torch_handler.request_envelope.base import BaseEnvelope

from handlers.archive import locate_pipeline
from handlers.codecs import JSON, encode_response
from handlers.config import load_handler_config
from handlers.errors import RequestError
from handlers.pipelines import ImageGenerator, load_pipeline, resolve_batching, resolve_dtype, select_device
from handlers.request import is_v2_inputs, merge_v2_inputs, parse_request

logger = logging.getLogger(__name__)


class DiffusersHandler(BaseHandler):
    """Serves any diffusers text-to-image pipeline; one response per request, in order."""

    def initialize(self, context):
        properties = context.system_properties
        self.config = load_handler_config(context.model_yaml_config)
        self.defaults, self.limits = self.config.generation_defaults, self.config.limits
        self.device = select_device(properties.get("gpu_id"))
        unpack_dir = Path(self.config.unpack_dir) if self.config.unpack_dir else None
        pipeline_dir = locate_pipeline(Path(properties["model_dir"]), unpack_dir)
        dtype = resolve_dtype(self.config.torch_dtype, self.device)
        combine = resolve_batching(self.config.batching, self.device)
        logger.info("loading %s on %s as %s (combined batches: %s)", pipeline_dir, self.device, dtype, combine)
        self.pipeline = load_pipeline(pipeline_dir, self.device, dtype, self.config.allow_pickle_weights)
        self.generator = ImageGenerator(self.pipeline, combine)
        self.enveloped = False
        self.initialized = True

    def handle(self, data, context):
        self.enveloped = called_by_envelope()
        return super().handle(data, context)

    def preprocess(self, data):
        if self.enveloped and is_v2_inputs(data):
            data = [merge_v2_inputs(data)]  # the kservev2 envelope splits one request into its inputs
        requests = []
        for index, row in enumerate(data):
            try:
                requests.append(
                    parse_request(
                        row,
                        self.defaults,
                        self.limits,
                        body_type=(self._header(index, "body") or {}).get("content-type"),
                        accept=self._header(index, "Accept"),
                    )
                )
            except RequestError as error:
                requests.append(error)
        return requests

    def inference(self, data, *args, **kwargs):
        valid = [request for request in data if not isinstance(request, RequestError)]
        logger.info("batch of %d requests, %d valid", len(data), len(valid))
        generated = iter(self.generator.generate(valid))
        outcomes = []
        for request in data:
            if isinstance(request, RequestError):
                outcomes.append(request)
                continue
            images = next(generated)
            outcomes.append(images if isinstance(images, RequestError) else (request, images))
        return outcomes

    def postprocess(self, data):
        if self.enveloped:
            return self._enveloped_responses(data)
        responses = []
        for index, outcome in enumerate(data):
            if isinstance(outcome, RequestError):
                self.context.set_response_status(outcome.status, HTTPStatus(outcome.status).phrase, index)
                self.context.set_response_content_type(index, JSON)
                responses.append(outcome.to_json())
                continue
            request, images = outcome
            body, content_type = encode_response(request, images)
            self.context.set_response_content_type(index, content_type)
            self.context.set_response_header(index, "X-Seed", str(request.seed))
            responses.append(body)
        return responses

    def _enveloped_responses(self, data):
        """Inside a KServe envelope all instances share one HTTP response, so errors travel as values."""
        responses = [
            outcome.to_dict() if isinstance(outcome, RequestError) else encode_response(*outcome, enveloped=True)[0]
            for outcome in data
        ]
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


def called_by_envelope() -> bool:
    """Whether TorchServe's service_envelope (KServe v1/v2) wraps this handler.

    TorchServe gives a handler no other sign of it, and the envelope JSON-encodes whatever the
    handler returns, so the answers must then be JSON values rather than bytes or serialised text.
    """
    caller = sys._getframe(2).f_locals.get("self")
    return isinstance(caller, BaseEnvelope)

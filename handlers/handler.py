"""TorchServe entry point: thin glue between request parsing, the pipeline and the encoders."""

import logging
from http import HTTPStatus
from pathlib import Path

from ts.torch_handler.base_handler import BaseHandler

from handlers.archive import locate_pipeline
from handlers.codecs import NUMPY_JSON, encode_numpy_json
from handlers.config import load_handler_config
from handlers.errors import RequestError
from handlers.pipelines import generate, load_pipeline, resolve_dtype, select_device
from handlers.request import parse_request

logger = logging.getLogger(__name__)


class DiffusersHandler(BaseHandler):
    """Serves any diffusers text-to-image pipeline; one response per request, in order."""

    def initialize(self, context):
        properties = context.system_properties
        self.config = load_handler_config(context.model_yaml_config)
        self.device = select_device(properties.get("gpu_id"))
        unpack_dir = Path(self.config.unpack_dir) if self.config.unpack_dir else None
        pipeline_dir = locate_pipeline(Path(properties["model_dir"]), unpack_dir)
        dtype = resolve_dtype(self.config.torch_dtype, self.device)
        logger.info("loading %s on %s as %s", pipeline_dir, self.device, dtype)
        self.pipeline = load_pipeline(pipeline_dir, self.device, dtype, self.config.allow_pickle_weights)
        self.initialized = True

    def preprocess(self, data):
        requests = []
        for index, row in enumerate(data):
            body_headers = self.context.get_request_header(index, "body") or {}
            try:
                requests.append(parse_request(row, self.config.generation_defaults, body_headers.get("content-type")))
            except RequestError as error:
                requests.append(error)
        return requests

    def inference(self, data, *args, **kwargs):
        valid = [request for request in data if not isinstance(request, RequestError)]
        generated = iter(generate(self.pipeline, valid))
        outcomes = []
        for request in data:
            if isinstance(request, RequestError):
                outcomes.append(request)
                continue
            images = next(generated)
            outcomes.append(images if isinstance(images, RequestError) else (request, images))
        return outcomes

    def postprocess(self, data):
        responses = []
        for index, outcome in enumerate(data):
            if isinstance(outcome, RequestError):
                responses.append(self._error_response(index, outcome))
                continue
            request, images = outcome
            self.context.set_response_header(index, "X-Seed", str(request.seed))
            self.context.set_response_content_type(index, NUMPY_JSON)
            responses.append(encode_numpy_json(images[0]))
        return responses

    def _error_response(self, index: int, error: RequestError) -> str:
        self.context.set_response_status(error.status, HTTPStatus(error.status).phrase, index)
        self.context.set_response_content_type(index, "application/json")
        return error.to_json()

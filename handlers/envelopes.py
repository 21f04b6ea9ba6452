"""What TorchServe delivers and takes back: its request rows (a body, form fields, or a KServe
instance), KServe's v1 and v2 bodies and envelopes, and the answers an envelope carries. The
TorchServe adapter's own; the core sees only a request's fields."""

import json
from typing import Any

import numpy as np
from PIL.Image import Image

from handlers.core.codecs import (
    answer_size_bound,
    document_format,
    document_size_bound,
    json_document,
    numpy_list,
    numpy_size_bound,
)
from handlers.core.errors import RequestError
from handlers.core.request import AnswerBound, GenerationRequest, as_text, body_fields, form_fields, request_fields


def read_row(row: Any, body_type: str | None = None) -> dict[str, Any]:
    """A request's fields, from whichever shape TorchServe delivered; body_type is the body's Content-Type."""
    if isinstance(row, str):  # a KServe v1 instance, unwrapped by TorchServe's kserve envelope
        return request_fields({"prompt": row})
    if not isinstance(row, dict):
        raise RequestError("expected a prompt or an object of request fields", field="body")
    if "body" in row:
        return unwrap_kserve_body(body_fields(row["body"], body_type))
    # Form fields (urlencoded or multipart) and KServe instances arrive as the row's own keys.
    return request_fields(form_fields(row))


def unwrap_kserve_body(body: dict[str, Any]) -> dict[str, Any]:
    """Accept KServe v1 and v2 bodies posted straight to /predictions, one request each."""
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or len(instances) != 1:
            raise RequestError(
                "`instances` must hold exactly one instance per request here; to send several, "
                "start TorchServe with service_envelope=kserve",
                field="instances",
            )
        return read_row(instances[0])
    inputs = body.get("inputs")
    if isinstance(inputs, list) and inputs and all(isinstance(item, dict) for item in inputs):
        return request_fields(merge_v2_inputs(inputs))
    return request_fields(body)


def merge_v2_inputs(inputs: list[dict]) -> dict[str, Any]:
    """KServe v2 inputs become fields by name; one unnamed-field input is the prompt."""
    fields: dict[str, Any] = {}
    for item in inputs:
        data = item.get("data")
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        name = item.get("name")
        if name not in GenerationRequest.model_fields and name != "data" and "prompt" not in fields:
            name = "prompt"
        fields[name] = as_text(data)
    return fields


def is_v2_inputs(rows: list) -> bool:
    """Rows that TorchServe's kservev2 envelope made out of one request's inputs."""
    return bool(rows) and all(isinstance(row, dict) and {"name", "datatype", "data"} <= row.keys() for row in rows)


def enveloped_answer(request: GenerationRequest, images: list[Image], nsfw_flags: list[bool] | None) -> Any:
    """Inside a KServe envelope TorchServe JSON-encodes the answer itself: JSON values, not text or bytes."""
    if request.output_format == "numpy":
        return numpy_list(images)
    return json_document(request, images, document_format(request.output_format), nsfw_flags)


def answer_bound(envelope: str) -> AnswerBound:
    """The most bytes an answer can take on the wire under this service_envelope."""
    if envelope == "none":
        return answer_size_bound
    return lambda request: enveloped_answer_size_bound(request, envelope)


def enveloped_answer_size_bound(request: GenerationRequest, envelope: str) -> int:
    """TorchServe re-serialises an enveloped answer with json.dumps(indent=2), which the bound includes."""
    if request.output_format == "numpy":
        return numpy_size_bound(request.height, request.width, request.image_count, NUMPY_SIZES[envelope])
    return document_size_bound(request, lambda document: json.dumps({"predictions": [document]}, indent=2))


def _kserve_numpy_size(images: list[Image]) -> int:
    return len(json.dumps({"predictions": [numpy_list(images)]}, indent=2))


def _kservev2_numpy_size(images: list[Image]) -> int:
    flat = np.asarray(numpy_list(images)).flatten().tolist()  # its envelope flattens the array into one list
    output = {"name": "prompt", "datatype": "INT64", "data": flat, "shape": [len(flat)]}
    return len(json.dumps({"id": "", "model_name": "", "model_version": "", "outputs": [output]}, indent=2))


NUMPY_SIZES = {"kserve": _kserve_numpy_size, "kservev2": _kservev2_numpy_size}

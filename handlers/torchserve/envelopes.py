"""What TorchServe delivers and takes back: its request rows (a body, form fields, or a KServe instance),
KServe's service envelopes, and the answers an envelope carries. The core sees only a request's fields."""

import json
from typing import Any

import numpy as np

from handlers.core.answers import Generation, answer_size_bound, document_size_bound, json_document, numpy_size_bound
from handlers.core.bodies import fields_from_body, fields_from_form, instance_fields
from handlers.core.errors import RequestError
from handlers.core.formats import numpy_list
from handlers.core.limits import SizeBound
from handlers.core.schema import GenerationRequest, request_json_schema


def read_row(row: Any, body_type: str | None = None) -> dict[str, Any]:
    """A request's fields, from whichever shape TorchServe delivered; body_type is the body's Content-Type."""
    if isinstance(row, str):  # a KServe v1 instance, unwrapped by TorchServe's kserve envelope
        return instance_fields(row)
    if not isinstance(row, dict):
        raise RequestError("expected a prompt or an object of request fields", field="body")
    if "body" in row:
        return fields_from_body(row["body"], body_type)
    # Form fields (urlencoded or multipart) and KServe instances arrive as the row's own keys.
    return fields_from_form(row)


def is_v2_inputs(rows: list) -> bool:
    """Rows that TorchServe's kservev2 envelope made out of one request's inputs."""
    return bool(rows) and all(isinstance(row, dict) and {"name", "datatype", "data"} <= row.keys() for row in rows)


def enveloped_answer(request: GenerationRequest, generation: Generation) -> tuple[Any, str]:
    """Inside a KServe envelope TorchServe JSON-encodes the answer itself: JSON values, not text or bytes."""
    if request.output_format == "numpy":
        return numpy_list(generation.images), "application/json"
    return json_document(request, generation), "application/json"


def envelope_size_bound(envelope: str) -> SizeBound:
    """The most bytes an answer can take on the wire under this service_envelope."""
    if envelope == "none":
        return answer_size_bound
    return lambda request: enveloped_answer_size_bound(request, envelope)


def enveloped_answer_size_bound(request: GenerationRequest, envelope: str) -> int:
    """TorchServe re-serialises an enveloped answer with json.dumps(indent=2), which the bound includes."""
    if request.output_format == "numpy":
        return numpy_size_bound(request.height, request.width, request.image_count, NUMPY_SIZES[envelope])
    return document_size_bound(request, lambda document: json.dumps({"predictions": [document]}, indent=2))


def _kserve_numpy_size(images) -> int:
    return len(json.dumps({"predictions": [numpy_list(images)]}, indent=2))


def _kservev2_numpy_size(images) -> int:
    flat = np.asarray(numpy_list(images)).flatten().tolist()  # its envelope flattens the array into one list
    output = {"name": "prompt", "datatype": "INT64", "data": flat, "shape": [len(flat)]}
    return len(json.dumps({"id": "", "model_name": "", "model_version": "", "outputs": [output]}, indent=2))


NUMPY_SIZES = {"kserve": _kserve_numpy_size, "kservev2": _kservev2_numpy_size}


# KServe v2's datatypes for the request schema's JSON types.
V2_DATATYPES = {"string": "BYTES", "integer": "INT64", "number": "FP64", "boolean": "BOOL", "object": "BYTES"}


def v2_metadata() -> tuple[list[dict], list[dict]]:
    """KServe v2 model metadata (inputs, outputs) from the request schema: one named input per field, as
    the kservev2 envelope merges them into a request. TorchServe's envelope names the one output after the
    first input (send `prompt` first) and flattens the answer: the default numpy list is INT64."""
    inputs = []
    for name, schema in request_json_schema()["properties"].items():
        branches = [branch for branch in schema.get("anyOf", [schema]) if branch.get("type") != "null"]
        types = {branch.get("type", "string") for branch in branches}
        shape = [-1] if "array" in types else [1]  # a list of prompts
        datatype = next((V2_DATATYPES[kind] for kind in sorted(types) if kind in V2_DATATYPES), "BYTES")
        inputs.append({"name": name, "datatype": datatype, "shape": shape})
    outputs = [{"name": "prompt", "datatype": "INT64", "shape": [-1]}]
    return inputs, outputs

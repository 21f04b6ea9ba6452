"""KServe's v1 and v2 protocols, read and answered by the handler itself (`kserve_protocol` in the handler:
section). TorchServe's own service_envelope stays unset: it parses a client's bytes before any guard of
ours (its v2 envelope reshapes every non-BYTES input, and an empty input of shape [20000000, 0] grew a
worker to 24 GB), and it re-serialises answers with indent=2. Here every byte of an answer, the echoed id
and input name included, is counted before any work, and answers are compact JSON."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from handlers.core.answers import (
    Answer,
    Generation,
    answer_size_bound,
    compact_json,
    document_size_bound,
    json_document,
    numpy_size_bound,
)
from handlers.core.bodies import body_object, instance_fields, merge_v2_inputs, request_fields
from handlers.core.errors import PayloadTooLarge, RequestError
from handlers.core.formats import JSON, numpy_list
from handlers.core.limits import SizeBound
from handlers.core.schema import GenerationRequest, request_json_schema

MAX_ECHOED = 256  # characters of a v2 request's id, or of its first input's name, echoed into the answer
ERROR_BYTES = 4096  # room for an error in place of an instance's answer (messages quote 60 characters at most)
# KServe v2's datatypes for the request schema's JSON types.
V2_DATATYPES = {"string": "BYTES", "integer": "INT64", "number": "FP64", "boolean": "BOOL", "object": "BYTES"}


@dataclass
class KServeRow:
    """One HTTP request in a KServe protocol: a reader per generation it asks for (v1: one per instance; v2:
    one for its merged inputs), or its error; and what its answer echoes (v2)."""

    readers: list[Callable[[], dict]] = field(default_factory=list)
    error: RequestError | None = None
    request_id: str = ""
    input_name: str = "prompt"


def read_v1(body: Any, content_type: str | None, max_instances: int) -> KServeRow:
    """{"instances": [...]}: each instance a prompt or an object of request fields."""
    document = body_object(body, content_type)
    instances = document.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RequestError('a KServe v1 body is {"instances": [...]}, one instance per generation', field="instances")
    if len(instances) > max_instances:
        raise PayloadTooLarge(
            f"the body asks for {len(instances)} instances; one HTTP request may ask for at most {max_instances} images",
            field="instances", allowed={"max_images_per_request": max_instances},
        )
    return KServeRow([lambda instance=instance: instance_fields(instance) for instance in instances])


def read_v2(body: Any, content_type: str | None, request_id: str) -> KServeRow:
    """{"id": ..., "inputs": [{"name", "datatype", "shape", "data"}, ...]}: the inputs, by name, are one
    generation's fields. Shapes are not read: a field's value is its data."""
    document = body_object(body, content_type)
    inputs, echoed_id = document.get("inputs"), document.get("id", request_id)
    if not isinstance(inputs, list) or not inputs or not all(isinstance(item, dict) for item in inputs):
        raise RequestError('a KServe v2 body is {"inputs": [{"name": ..., "data": ...}, ...]}', field="inputs")
    if not isinstance(echoed_id, str) or len(echoed_id) > MAX_ECHOED:
        raise RequestError(f'"id" must be text of at most {MAX_ECHOED} characters', field="id")
    fields = merge_v2_inputs(inputs)  # checks every input's name and data
    name = inputs[0]["name"]
    if len(name) > MAX_ECHOED:
        raise RequestError(f"an input's name has at most {MAX_ECHOED} characters", field="inputs")
    return KServeRow([lambda: request_fields(fields)], request_id=echoed_id, input_name=name)


def value_of(request: GenerationRequest, generation: Generation) -> tuple[Any, str]:
    """An answer as a JSON value (the numpy list, or the json document), for a KServe answer to carry."""
    if request.output_format == "numpy":
        return numpy_list(generation.images), JSON
    return json_document(request, generation), JSON


def v1_answer(answers: list[Answer]) -> tuple[int, str]:
    """The row's status (an error's only when every instance failed) and its {"predictions": [...]}."""
    failed = [answer for answer in answers if answer.status != 200]
    status = failed[0].status if len(failed) == len(answers) else 200
    return status, compact_json({"predictions": [answer.error if answer.status != 200 else answer.body
                                                 for answer in answers]})


def v2_answer(row: KServeRow, answer: Answer, model_name: str, version: str) -> tuple[int, str]:
    return answer.status, compact_json(v2_document(row, answer.error or answer.body, model_name, version))


def v2_document(row: KServeRow, value: Any, model_name: str, version: str) -> dict:
    """As TorchServe's kservev2 envelope answers: one output named after the first input, its data flattened."""
    if isinstance(value, list):  # the numpy list
        data, datatype = flatten(value), "INT64"
    else:  # a json document or an error
        data, datatype = [value], "BYTES"
    output = {"name": row.input_name, "shape": [len(data)], "datatype": datatype, "data": data}
    return {"id": row.request_id, "model_name": model_name, "model_version": version, "outputs": [output]}


def flatten(value: Any) -> list:
    return [item for part in value for item in flatten(part)] if isinstance(value, list) else [value]


def v1_size_bound(requests: list[GenerationRequest]) -> int:
    """The most bytes {"predictions": [...]} can take for these instances, each a value or an error."""
    return len(compact_json({"predictions": []})) + sum(max(value_size_bound(request), ERROR_BYTES) + 1 for request in requests)


def v2_size_bound(row: KServeRow, request: GenerationRequest, model_name: str, version: str) -> int:
    """The answer's shell with its echoed id, name and version as they will be written, plus its data."""
    shell = len(compact_json(v2_document(row, [], model_name, version)))
    if request.output_format != "numpy":
        return shell + value_size_bound(request)
    pixels = request.image_count * request.height * request.width * 3
    return shell + len(str(pixels)) + pixels * len("255,")


def request_size_bound(protocol: str) -> SizeBound:
    """The most bytes one request's answer can take: the whole answer, or a value inside a KServe answer
    (whose whole is bounded per HTTP request, with what it echoes)."""
    return answer_size_bound if protocol == "none" else value_size_bound


def value_size_bound(request: GenerationRequest) -> int:
    if request.output_format == "numpy":
        return numpy_size_bound(request.height, request.width, request.image_count)
    return document_size_bound(request, compact_json)


def v2_metadata() -> tuple[list[dict], list[dict]]:
    """KServe v2 model metadata (inputs, outputs) from the request schema: one named input per field, as
    read_v2 merges them into a request. The one output is named after the first input (send `prompt`
    first) and holds the answer flattened: the default numpy list is INT64."""
    inputs = []
    for name, schema in request_json_schema()["properties"].items():
        branches = [branch for branch in schema.get("anyOf", [schema]) if branch.get("type") != "null"]
        types = {branch.get("type", "string") for branch in branches}
        shape = [-1] if "array" in types else [1]  # a list of prompts
        datatype = next((V2_DATATYPES[kind] for kind in sorted(types) if kind in V2_DATATYPES), "BYTES")
        inputs.append({"name": name, "datatype": datatype, "shape": shape})
    return inputs, [{"name": "prompt", "datatype": "INT64", "shape": [-1]}]

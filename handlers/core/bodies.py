"""A request's body as the request's fields: plain text, a JSON object, form fields, Hugging Face's
{"inputs", "parameters"}, or a KServe v1/v2 body posted straight to /predictions. Every engine reads
bodies through here; what an engine itself wraps around them (TorchServe's rows and envelopes) its
adapter unwraps first."""

import json
from typing import Any

from handlers.core.errors import RequestError
from handlers.core.images import IMAGE_FIELDS
from handlers.core.schema import GenerationRequest

HOW_TO_SEND_A_PROMPT = (
    "no prompt found. Send it as text (-H 'Content-Type: text/plain' -d 'a cat'), "
    "as JSON (-H 'Content-Type: application/json' -d '{\"prompt\": \"a cat\"}'), "
    "or as a form field (-d 'prompt=a cat' or -F 'prompt=a cat'). "
    "A bare curl -d 'a cat' is sent form-urlencoded and its text never reaches the model."
)


def fields_from_body(raw: Any, content_type: str | None = None) -> dict[str, Any]:
    """The fields of one request's body; raw is bytes, text, or JSON the engine parsed already."""
    return unwrap_kserve_body(body_object(raw, content_type))


def fields_from_form(items: dict[str, Any]) -> dict[str, Any]:
    """Form fields (urlencoded or multipart) as request fields: image parts stay bytes, the rest is text."""
    return request_fields({key: value if key in IMAGE_FIELDS else as_text(value) for key, value in items.items()})


def body_object(raw: Any, content_type: str | None = None) -> dict[str, Any]:
    """One request's body as an object: a JSON object, or plain text that is the prompt."""
    body = as_text(raw)
    is_raw_bytes = isinstance(raw, (bytes, bytearray))
    if is_raw_bytes and (content_type or "").startswith("application/json"):
        body = _load_json(body)
    if isinstance(body, str):
        # Raw bytes may arrive without a Content-Type, so a JSON object may hide in them.
        body = (_json_object(body) if is_raw_bytes else None) or {"prompt": body}
    if not isinstance(body, dict):
        raise RequestError('the JSON body must be an object such as {"prompt": "a cat"}', field="body")
    return dict(body)


def unwrap_kserve_body(body: dict[str, Any]) -> dict[str, Any]:
    """Accept KServe v1 and v2 bodies posted straight to /predictions, one request each."""
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or len(instances) != 1:
            raise RequestError(
                "`instances` must hold exactly one instance per request here; to send several, build the "
                "archive with --set kserve_protocol=v1",
                field="instances",
            )
        return instance_fields(instances[0])
    inputs = body.get("inputs")
    if isinstance(inputs, list) and inputs and all(isinstance(item, dict) for item in inputs):
        return request_fields(merge_v2_inputs(inputs))
    return request_fields(body)


def instance_fields(instance: Any) -> dict[str, Any]:
    """A KServe v1 instance: a prompt, or an object of request fields."""
    if isinstance(instance, str):
        return request_fields({"prompt": instance})
    if not isinstance(instance, dict):
        raise RequestError("expected a prompt or an object of request fields", field="body")
    return fields_from_form(instance)


def merge_v2_inputs(inputs: list[dict]) -> dict[str, Any]:
    """KServe v2 inputs become fields by name; one unnamed-field input is the prompt."""
    if len(inputs) > len(GenerationRequest.model_fields):
        raise RequestError(f"{len(inputs)} inputs; a request has at most {len(GenerationRequest.model_fields)} fields",
                           field="inputs", allowed=sorted(GenerationRequest.model_fields))
    fields: dict[str, Any] = {}
    for item in inputs:
        if not isinstance(item.get("name"), str) or not isinstance(item.get("datatype"), str) or "data" not in item:
            raise RequestError('every KServe v2 input needs a "name" and a "datatype" (text), and its "data"',
                               field="inputs")
        data = item.get("data")
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        name = item.get("name")
        if name not in GenerationRequest.model_fields and name != "data" and "prompt" not in fields:
            name = "prompt"
        fields[name] = as_text(data)
    return fields


def request_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields a request means: Hugging Face's {"inputs", "parameters"} and the example's `data` name
    the prompt, and there must be one."""
    if "inputs" in fields:
        parameters = fields.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise RequestError("`parameters` must be an object of request fields", field="parameters")
        fields = {"prompt": fields["inputs"], **parameters}
    if "data" in fields:
        if "prompt" in fields:
            raise RequestError("send the prompt as `prompt` or as `data`, not both", field="data")
        fields = {**fields, "prompt": fields["data"]}
        del fields["data"]
    if fields.get("prompt") is None:
        raise RequestError(HOW_TO_SEND_A_PROMPT, field="prompt")
    return fields


def as_text(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("the request body is not UTF-8 text", field="prompt") from None
    return value


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # ValueError: bad syntax, or an integer past Python's digit limit
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)[:200]
        raise RequestError(f"the body is not valid JSON: {reason}", field="body") from None


def _json_object(text: str) -> dict | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):  # not JSON after all: text that starts with a brace is a prompt
        return None
    return parsed if isinstance(parsed, dict) else None

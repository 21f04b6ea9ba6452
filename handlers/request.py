"""Turn one TorchServe request row into a validated GenerationRequest."""

import json
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from handlers.config import GenerationDefaults
from handlers.errors import RequestError

MAX_SEED = 2**32 - 1

HOW_TO_SEND_A_PROMPT = (
    "no prompt found. Send it as text (-H 'Content-Type: text/plain' -d 'a cat'), "
    "as JSON (-H 'Content-Type: application/json' -d '{\"prompt\": \"a cat\"}'), "
    "or as a form field (-d 'prompt=a cat' or -F 'prompt=a cat'). "
    "A bare curl -d 'a cat' is sent form-urlencoded and its text never reaches the model."
)


class GenerationRequest(GenerationDefaults):
    """One generation: the prompt plus every parameter a client may set."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=1000, description="what to draw")
    seed: int = Field(
        default_factory=lambda: secrets.randbelow(MAX_SEED + 1),
        ge=0,
        le=MAX_SEED,
        description="random when absent; always returned in the X-Seed header",
    )

    @field_validator("prompt")
    @classmethod
    def prompt_is_not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt is empty")
        return prompt


def parse_request(row: dict, defaults: GenerationDefaults, body_type: str | None = None) -> GenerationRequest:
    """Validate a row against GenerationRequest, filling gaps from the model's defaults.

    body_type is the Content-Type TorchServe recorded for the body, when it has one.
    """
    fields = read_fields(row, body_type)
    try:
        return GenerationRequest(**{**defaults.model_dump(), **fields})
    except ValidationError as error:
        raise _as_request_error(error) from None


def read_fields(row: dict, body_type: str | None = None) -> dict[str, Any]:
    """Collect request fields from whichever body shape TorchServe delivered."""
    if "body" in row:
        body = _as_text(row["body"])
        if isinstance(row["body"], (bytes, bytearray)) and (body_type or "").startswith("application/json"):
            body = _load_json(body)  # TorchServe forwards JSON it failed to decode as raw bytes
        if isinstance(body, dict):
            fields = dict(body)
        elif isinstance(body, str):
            # Raw bytes arrive without a Content-Type, so a JSON object may hide in them.
            is_raw_bytes = isinstance(row["body"], (bytes, bytearray))
            fields = (_json_object(body) if is_raw_bytes else None) or {"prompt": body}
        else:
            raise RequestError("the JSON body must be an object such as {\"prompt\": \"a cat\"}", field="body")
    else:
        # Form fields (urlencoded or multipart) arrive as the row's own keys.
        fields = {key: _as_text(value) for key, value in row.items()}

    if "data" in fields:
        if "prompt" in fields:
            raise RequestError("send the prompt as `prompt` or as `data`, not both", field="data")
        fields["prompt"] = fields.pop("data")
    if fields.get("prompt") is None:
        raise RequestError(HOW_TO_SEND_A_PROMPT, field="prompt")
    return fields


def _as_text(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("the request body is not UTF-8 text", field="prompt") from None
    return value


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise RequestError(f"the body is not valid JSON: {error}", field="body") from None


def _json_object(text: str) -> dict | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _as_request_error(error: ValidationError) -> RequestError:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        allowed = sorted(GenerationRequest.model_fields)
        return RequestError(f"unknown field {field!r}", field=field, allowed=allowed)
    message = first["msg"].removeprefix("Value error, ")
    return RequestError(f"{field}: {message} (got {first.get('input')!r})", field=field, allowed=allowed_values(field))


def allowed_values(field: str | None) -> dict | None:
    """What a field accepts, read from the model's own declaration."""
    schema = GenerationRequest.model_json_schema()["properties"].get(field or "", {})
    keys = ("type", "minimum", "maximum", "multipleOf", "maxLength", "enum")
    return {key: schema[key] for key in keys if key in schema} or None

"""What TorchServe delivers for one request: its row (a body, or form fields) and its headers, read
defensively: the frontend lets a client's headers overwrite the per-parameter entries it makes (a `body`
header replaces the body's Content-Type entry)."""

from typing import Any

from handlers.core.bodies import fields_from_body, fields_from_form
from handlers.core.errors import RequestError


def read_row(row: Any, body_type: str | None = None) -> dict[str, Any]:
    """A request's fields; body_type is the body's Content-Type."""
    if not isinstance(row, dict):
        raise RequestError("expected a prompt or an object of request fields", field="body")
    if "body" in row:
        return fields_from_body(row["body"], body_type)
    return fields_from_form(row)  # form fields (urlencoded or multipart) arrive as the row's own keys


def header(headers: dict, name: str) -> Any:
    """A request header by case-insensitive name."""
    return next((value for key, value in headers.items() if str(key).lower() == name.lower()), None)


def body_type(headers: dict) -> str | None:
    """The body's Content-Type, from the entry TorchServe makes for the body parameter, when it is one."""
    entry = header(headers, "body")
    content_type = entry.get("content-type") if isinstance(entry, dict) else None
    return content_type if isinstance(content_type, str) else None


def text_header(headers: dict, name: str) -> str | None:
    value = header(headers, name)
    return value if isinstance(value, str) else None

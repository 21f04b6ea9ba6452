"""Typed request errors that carry their HTTP status, and the one place that renders them."""

import json
from typing import Any


class RequestError(Exception):
    """A problem with one request; the rest of its batch carries on."""

    status = 400
    kind = "invalid_request"  # the `Kind` label of the diffusion_errors metric

    def __init__(self, message: str, field: str | None = None, allowed: Any = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.allowed = allowed

    def to_dict(self) -> dict:
        body = {"error": self.message, "field": self.field, "allowed": self.allowed}
        return {key: value for key, value in body.items() if value is not None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


class PayloadTooLarge(RequestError):
    status = 413
    kind = "too_large"


class OutOfMemory(RequestError):
    status = 507
    kind = "out_of_memory"

    def __init__(self, message: str = "out of memory while generating; retry with fewer or smaller images"):
        super().__init__(message)


class GenerationFailed(RequestError):
    status = 500
    kind = "generation_failed"


class InternalError(RequestError):
    """A fault of the server, not of the request; the traceback goes to the worker log, not to the client."""

    status = 500
    kind = "internal_error"


def excerpt(value: Any, limit: int = 60) -> str:
    """A short repr of client input for an error message: a 1 MB field must not come back in a 1 MB error."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer past Python's digit limit; a structure nested too deep
        return f"a {type(value).__name__} too large to quote"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class PipelineNotFound(Exception):
    """The model directory holds neither a diffusers pipeline nor a model.zip with one."""


class UnsafeArchive(Exception):
    """An archive member would land outside the directory it is extracted into."""


class ReferencedWeightsError(Exception):
    """Weights an archive references are missing, changed, or lie where they must not; the message names the file."""

"""What the ingress reads from an HTTP request, before any replica sees it: the body up to the limit, for
every kind of body (a chunked upload declares no length), the headers that matter, and a seed fixed now,
so that a request sent to a second replica makes the same images."""

import hashlib
import secrets
from dataclasses import dataclass, field

from starlette.requests import ClientDisconnect, Request

from handlers.core.bodies import fields_from_body, fields_from_form
from handlers.core.errors import PayloadTooLarge, RequestError
from handlers.core.schema import MAX_SEED

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


@dataclass
class RawRequest:
    """An HTTP request as read: its body, or its form's parts, the headers that matter, and its seed."""

    content_type: str
    accept: str | None
    request_id: str
    body: bytes = b""
    form: dict | None = None
    seed: int = field(default_factory=lambda: secrets.randbelow(MAX_SEED + 1))

    def fields(self):
        """The request's fields, read lazily by the service; the seed unless the request names one."""
        def read() -> dict:
            fields = fields_from_form(self.form) if self.form is not None else fields_from_body(self.body, self.content_type)
            return {"seed": self.seed, **fields}

        return read

    @property
    def fingerprint(self) -> str:
        """What identifies the request's content (its seed aside, which the ingress chose)."""
        digest = hashlib.sha256(self.content_type.encode() + b"\0" + (self.accept or "").encode() + b"\0" + self.body)
        for key, value in sorted((self.form or {}).items()):
            digest.update(f"\0{key}\0".encode() + (value if isinstance(value, bytes) else str(value).encode()))
        return digest.hexdigest()


async def read_request(http: Request, request_id: str, max_bytes: int) -> RawRequest:
    """The body, read as it arrives and stopped at max_bytes whatever Content-Length says; a form is parsed
    from the bytes read, never from the connection."""
    headers = http.headers
    raw = RawRequest(headers.get("content-type", ""), headers.get("accept"), request_id)
    def too_large(read: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"the body is over this server's limit of {max_bytes} bytes (read: {read})",
                               field="body", allowed={"max_request_bytes": max_bytes})

    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large(0)
    body = bytearray()
    try:
        async for chunk in http.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_large(len(body))
    except ClientDisconnect:  # or the proxy's BodyLimit (proxy.py) answered it 413 and closed
        raise RequestError("the client left before its body was read", field="body") from None
    if not raw.content_type.startswith(FORM_TYPES):
        raw.body = bytes(body)
        return raw
    try:
        form = await buffered(http, bytes(body)).form()
        raw.form = {key: await value.read() if hasattr(value, "read") else value for key, value in form.multi_items()}
    except Exception:  # noqa: BLE001 - a form the parser cannot read is this request's error
        raise RequestError("the form body could not be read", field="body") from None
    return raw


def buffered(http: Request, body: bytes) -> Request:
    """The same request, its body already read."""
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(http.scope, receive)

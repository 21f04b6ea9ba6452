"""A body cap inside Ray Serve's HTTP proxy, installed through Serve's own hook for proxy middlewares:
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=handlers.ray.proxy:middlewares in the environment of `ray start`
(scripts/serve_ray.sh, kuberay/rayservice.yaml).

Serve's proxy reads a request's body into an unbounded queue as fast as the client sends it, whatever the
deployment behind it reads: a 100 MiB chunked upload was 90 MiB into the proxy's memory by the time the
ingress, having read its 6.5 MB, answered 413. Here the proxy itself stops at the cap: a declared length
past it is refused before any body is read, and a body that grows past it is answered 413 at once, its
connection closed, and the ingress told the client left."""

import json

from starlette.middleware import Middleware

from handlers.core.limits import MAX_REQUEST_BYTES


class BodyLimit:
    """Pure ASGI middleware: 413 for a body past max_bytes, counted as it arrives."""

    def __init__(self, app, max_bytes: int = MAX_REQUEST_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self.refuse(send)
        read, refused, started = 0, False, False

        async def capped_receive():
            nonlocal read, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    refused = True
                    if not started:
                        await self.refuse(send)
                    return {"type": "http.disconnect"}  # the proxy stops reading; the ingress sees the client leave
            return message

        async def guarded_send(message):
            nonlocal started
            if refused and not started:
                return  # this request was answered here
            started = True
            await send(message)

        await self.app(scope, capped_receive, guarded_send)

    async def refuse(self, send) -> None:
        body = json.dumps({"error": f"the body is over this server's limit of {self.max_bytes} bytes", "field": "body",
                           "allowed": {"max_request_bytes": self.max_bytes}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def middlewares() -> list[Middleware]:
    """What Serve's proxy calls at start-up (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(BodyLimit)]

"""The HTTP ingress: reads each request's body (up to the body limit), hands it to a model replica, and
publishes the model's request schema at openapi.json and docs, beside /predictions/<model>.

It is what lets a request outlive the replica it was sent to: when that replica's process dies, the
ingress sends the request once more, to another replica.
"""

import logging

from fastapi.openapi.docs import get_swagger_ui_html
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from handlers.core.answers import Answer
from handlers.core.errors import PayloadTooLarge, RequestError
from handlers.core.limits import MAX_REQUEST_BYTES
from handlers.ray.metrics import RayMetrics
from handlers.ray.openapi import openapi_document
from handlers.ray.replica import RawRequest, log_to_worker_output

logger = logging.getLogger(__name__)

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# A request whose replica died goes to one more: a second death may be the request's own doing, and a
# third replica is not worth risking on it.
ATTEMPTS = 2

NOT_FOUND = {"error": "not found: POST a request to this path; GET openapi.json or docs below it"}


class ReplicaDied(RequestError):
    """The replica generating this request stopped, and so did the one it was sent to next."""

    status = 503
    kind = "replica_died"


def response_of(answer: Answer) -> Response:
    return Response(answer.body, status_code=answer.status, media_type=answer.content_type, headers=answer.headers)


# It holds requests while replicas generate, and runs no model: many requests at once, no CPU reserved.
@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
class HttpIngress:
    """Reads each HTTP request (up to max_request_bytes) and hands it to a model replica."""

    def __init__(self, model: DeploymentHandle, model_name: str, description: dict, api_docs: bool = True,
                 max_request_bytes: int = MAX_REQUEST_BYTES):
        log_to_worker_output()
        self.model = model.options(stream=True)
        self.model_name, self.description, self.api_docs = model_name, description, api_docs
        self.max_request_bytes = max_request_bytes
        self.metrics = RayMetrics()

    async def __call__(self, http: Request) -> Response:
        """The model's path (with or without a trailing slash: no redirect a client must follow), and its
        API description below it."""
        root = http.scope.get("root_path", "")
        below = http.scope["path"][len(root):] if http.scope["path"].startswith(root) else http.scope["path"]
        if below in ("", "/") and http.method == "POST":
            return await self.predict(http)
        if below == "/openapi.json" and http.method == "GET" and self.api_docs:
            return JSONResponse(openapi_document(self.model_name, self.description, root))
        if below == "/docs" and http.method == "GET" and self.api_docs:
            return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=self.model_name)
        return JSONResponse(NOT_FOUND, status_code=404)

    async def predict(self, http: Request) -> Response:
        try:
            raw = await self._read(http)
        except RequestError as error:
            return self._refuse(error)
        for attempt in range(1, ATTEMPTS + 1):
            answers = self.model.answer.remote(raw)
            try:
                answer = await answers.__anext__()
                break
            except RayActorError:
                logger.warning("the replica answering %s died (attempt %d of %d)", raw.request_id, attempt, ATTEMPTS)
        else:
            return self._refuse(ReplicaDied(f"the replicas generating this request stopped, {ATTEMPTS} times; "
                                            "it was not answered"))
        if answer.body is not None:
            return response_of(answer)
        return StreamingResponse(self._rest(answers), media_type=answer.content_type)

    async def _rest(self, answers):
        """A stream's progress lines and answer; a replica that dies midway ends it with an error line."""
        try:
            async for line in answers:
                yield line
        except RayActorError:
            error = ReplicaDied("the replica generating this request stopped while it streamed")
            self.metrics.record(Answer.refusal(error, self.model_name).metrics)
            yield error.to_json() + "\n"

    def _refuse(self, error: RequestError) -> Response:
        answer = Answer.refusal(error, self.model_name)
        self.metrics.record(answer.metrics)
        return response_of(answer)

    async def _read(self, http: Request) -> RawRequest:
        headers = http.headers
        raw = RawRequest(headers.get("content-type", ""), headers.get("accept"), headers.get("x-request-id", ""))
        too_large = PayloadTooLarge(
            f"the body is over this server's limit of {self.max_request_bytes} bytes",
            field="body", allowed={"max_request_bytes": self.max_request_bytes},
        )
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_request_bytes:
            raise too_large
        if raw.content_type.startswith(FORM_TYPES):
            try:
                raw.form = {key: await value.read() if hasattr(value, "read") else value
                            for key, value in (await http.form()).multi_items()}
            except Exception:  # noqa: BLE001 - a form the parser cannot read is this request's error
                raise RequestError("the form body could not be read", field="body") from None
            return raw
        body = bytearray()
        async for chunk in http.stream():
            body += chunk
            if len(body) > self.max_request_bytes:
                raise too_large
        raw.body = bytes(body)
        return raw

"""The HTTP ingress: reads each request's body (up to the body limit), hands it to a model replica, and
publishes the model's request schema at openapi.json and docs, beside /predictions/<model>.

A request that surely did not run, because its replica stopped before its batch started, is sent once
more to another replica, with the seed the ingress fixed, so it makes the same images. A request that was
being generated when its replica stopped is not: it may be what stopped it (a query of death would stop
every replica it is sent to), so it is answered 503 and remembered, and the same request is refused at once
from then on.
"""

import asyncio
import logging

from fastapi.openapi.docs import get_swagger_ui_html
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from handlers.core.answers import Answer
from handlers.core.errors import RequestError
from handlers.core.limits import MAX_REQUEST_BYTES
from handlers.ray import ledger
from handlers.ray.intake import RawRequest, read_request
from handlers.ray.logs import use_serve_logging
from handlers.ray.metrics import RayMetrics
from handlers.ray.openapi import openapi_document
from handlers.ray.replica import GENERATING

logger = logging.getLogger(__name__)

ATTEMPTS = 2  # a request that surely did not run goes to one more replica when its replica stops
NOT_FOUND = {"error": "not found: POST a request to this path; GET openapi.json or docs below it"}


class ReplicaDied(RequestError):
    """The replica generating this request stopped (or, before it ran, this one and another)."""

    status = 503
    kind = "replica_died"


class Suspect(RequestError):
    """The same request was being generated when a replica stopped: it is not generated again."""

    status = 422
    kind = "replica_stopped_by"


class Busy(RequestError):
    """The model's replicas hold as many requests as they may queue: answered at once, as TorchServe does."""

    status = 503
    kind = "busy"


def response_of(answer: Answer) -> Response:
    return Response(answer.body, status_code=answer.status, media_type=answer.content_type, headers=answer.headers)


# It holds requests while replicas generate, and runs no model: many requests at once, no CPU reserved.
@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
class HttpIngress:
    """Reads each HTTP request (up to max_request_bytes) and hands it to a model replica."""

    def __init__(self, model: DeploymentHandle, model_name: str, description: dict, api_docs: bool = True,
                 max_request_bytes: int = MAX_REQUEST_BYTES):
        use_serve_logging()
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
        # Serve's own request id: its access log and our modules' log lines carry it.
        request_id = serve.context._get_serve_request_context().request_id
        try:
            raw = await read_request(http, request_id, self.max_request_bytes)
        except RequestError as error:
            return self._refuse(error)
        if await asyncio.to_thread(ledger.is_suspect, raw.fingerprint):
            return self._refuse(Suspect("this request was being generated when a replica stopped; it is not "
                                        "generated again"))
        for attempt in range(1, ATTEMPTS + 1):
            answers, started = self.model.answer.remote(raw), False
            try:
                first = await answers.__anext__()
                if first == GENERATING:
                    started, first = True, await answers.__anext__()
                break
            except BackPressureError:
                return self._refuse(Busy("the model's queue is full; retry later"))
            except RayActorError as error:
                # ActorUnavailableError: Ray cannot say whether the request ran; the ledger says what started.
                if started or isinstance(error, ActorUnavailableError) or await asyncio.to_thread(ledger.was_started, request_id):
                    await asyncio.to_thread(ledger.forget, [request_id])
                    return await self._stopped_while_generating(raw)
                logger.warning("the replica holding %s stopped before it ran (attempt %d of %d)", request_id,
                               attempt, ATTEMPTS)
        else:
            return self._refuse(ReplicaDied(f"the replicas holding this request stopped, {ATTEMPTS} times, before "
                                            "it ran; it was not answered"))
        if first.body is not None:
            return response_of(first)
        return StreamingResponse(self._rest(raw, answers), media_type=first.content_type)

    async def _stopped_while_generating(self, raw: RawRequest) -> Response:
        await asyncio.to_thread(ledger.add_suspect, raw.fingerprint)
        logger.warning("the replica generating %s stopped; it is not sent again", raw.request_id)
        return self._refuse(ReplicaDied("the replica generating this request stopped; it is not sent again, since "
                                        "it may be what stopped it"))

    async def _rest(self, raw: RawRequest, answers):
        """A stream's progress lines and answer; a replica that stops midway ends it with an error line."""
        try:
            async for line in answers:
                yield line
        except RayActorError:
            await asyncio.to_thread(ledger.add_suspect, raw.fingerprint)
            error = ReplicaDied("the replica generating this request stopped while it streamed")
            self.metrics.record(Answer.refusal(error, self.model_name).metrics)
            yield error.to_json() + "\n"

    def _refuse(self, error: RequestError) -> Response:
        answer = Answer.refusal(error, self.model_name)
        self.metrics.record(answer.metrics)
        return response_of(answer)

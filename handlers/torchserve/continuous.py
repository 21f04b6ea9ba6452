"""Step-level batching on TorchServe, through its continuous batching (model-config.yaml's
`continuousBatching: true`): every handler call is one step of the running set.

The frontend (wlm/ContinuousBatching.java) refills the call's jobs up to batchSize between calls, and keeps
a job open while the handler answers it with `ts_stream_next: true`. So every open request gets a reply at
every step: its response head with the first, then its progress lines (NDJSON) or nothing, and its body
with the last. A job whose client went away is removed by the frontend after a reply, and is absent from
the next call: its run is dropped there. docs/step-batching.md says why this mode and not
asyncCommunication.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from handlers.core.answers import Answer, content_type_of, progress_line
from handlers.core.errors import RequestError
from handlers.core.schema import GenerationRequest
from handlers.core.service import DiffusionService

logger = logging.getLogger(__name__)


@dataclass
class Reply:
    """One request's part of one handler call. last: None for a whole response; False for a chunk with more to
    come (the first one carries the head: status, Content-Type and headers); True for the stream's last chunk."""

    status: int
    content_type: str
    body: bytes | str
    headers: dict[str, str] = field(default_factory=dict)
    last: bool | None = None


@dataclass
class OpenRequest:
    request: GenerationRequest
    request_id: str
    progress: list[str] = field(default_factory=list)
    head_sent: bool = False
    calls: int = 0


# The share of a worker's time that the frontend's round trip between two handler calls may take. Measured at
# 3-4 ms on the 2-core CPU, against 12-18 ms for a step of the digits model: one step per call made a lone
# request 1.21x slower than static batching, and a 5 % share still 1.08x. So a call steps on until the round
# trip is this share of the cycle, or until a request finishes (its answer goes out at once); a newcomer
# waits at most that long (about 50 round trips, 150-200 ms here) to join, or one step where a step is longer.
ROUND_TRIP_SHARE = 0.02


class ContinuousSteps:
    """The running set of one TorchServe worker, keyed by TorchServe's request ids."""

    def __init__(self, service: DiffusionService, capacity: int, record: Callable[[Answer, str], None]):
        self.service, self.record = service, record
        self.running = service.running_set(capacity, self._on_step)
        self.open: dict[str, OpenRequest] = {}
        self.round_trip_share = ROUND_TRIP_SHARE
        self.round_trip_s = 0.0  # the frontend's time between two calls while requests are open, averaged
        self.returned_at: float | None = None
        self.called_at = 0.0

    def is_open(self, request_id: str) -> bool:
        return request_id in self.open

    def begin_call(self) -> None:
        """The handler's call has begun: the time since the last one returned is the frontend's round trip."""
        self.called_at = time.perf_counter()
        if self.returned_at is not None:
            self.round_trip_s = 0.8 * self.round_trip_s + 0.2 * (self.called_at - self.returned_at)

    def call(self, request_ids: list[str], new_rows: dict[str, GenerationRequest | RequestError]) -> list[Reply]:
        """One step (or a few, see ROUND_TRIP_SHARE): drop the requests the frontend no longer sends, start the
        new ones, step, and reply to each."""
        for gone in set(self.open) - set(request_ids):
            logger.info("request %s: its client went away; dropped from the running set", gone)
            self.running.drop(gone)
            del self.open[gone]
        whole = {}
        for request_id, request in new_rows.items():
            if isinstance(request, RequestError):
                whole[request_id] = self._whole(self._answer(request, request, request_id))
                continue
            self.open[request_id] = OpenRequest(request, request_id)  # before it joins: its progress comes at once
            result = self.running.join(request_id, request)
            if result is not None:
                whole[request_id] = self._last(self.open.pop(request_id), result)
        finished = self._steps()
        for opened in self.open.values():
            opened.calls += 1
        replies = []
        for request_id in request_ids:
            if request_id in whole:
                replies.append(whole[request_id])
            elif request_id in finished:
                replies.append(self._last(self.open.pop(request_id), finished[request_id]))
            else:
                replies.append(self._next(self.open[request_id]))
        self.returned_at = time.perf_counter() if self.open else None
        return replies

    def _steps(self) -> dict:
        """One step, then more while the frontend's round trip would cost more than its share and no request
        has finished."""
        slice_s = self.round_trip_s * (1 - self.round_trip_share) / self.round_trip_share
        finished = self.running.iterate()
        while not finished and len(self.running) and time.perf_counter() - self.called_at < slice_s:
            finished = self.running.iterate()
        return finished

    def _on_step(self, request_id: str, step: int, total: int, elapsed: float) -> None:
        opened = self.open.get(request_id)
        if opened is not None and opened.request.stream:
            opened.progress.append(progress_line(step, total, elapsed))

    def _answer(self, request, result, request_id: str) -> Answer:
        answer = self.service.answer(request, result, request_id)
        self.record(answer, request_id)
        return answer

    @staticmethod
    def _whole(answer: Answer) -> Reply:
        return Reply(answer.status, answer.content_type, answer.body, answer.headers)

    def _next(self, opened: OpenRequest) -> Reply:
        """A chunk: the head on the first one, then the progress lines since the last."""
        body, opened.progress = "".join(opened.progress), []
        headers = {} if opened.head_sent else {"X-Seed": str(opened.request.seed)}
        opened.head_sent = True
        return Reply(200, content_type_of(opened.request), body, headers, last=False)

    def _last(self, opened: OpenRequest, result) -> Reply:
        if opened.calls:
            logger.info("request %s: %d steps in %d calls (the frontend's round trip: %.1f ms)", opened.request_id,
                        opened.request.denoising_steps, opened.calls, self.round_trip_s * 1000)
        answer = self._answer(opened.request, result, opened.request_id)
        if not opened.head_sent:  # it finished at its first step: one whole response, with its own status
            if opened.request.stream and answer.status == 200:
                answer.body = "".join(opened.progress) + answer.body
            return self._whole(answer)
        # The head went out with a 200: a failure can only say so in the body, as a stream's last line does.
        body = answer.body
        if opened.request.stream:
            body = "".join(opened.progress) + body + ("\n" if answer.status != 200 else "")
        return Reply(answer.status, answer.content_type, body, last=True)

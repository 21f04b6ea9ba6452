"""Step-level batching on a Ray replica: the queue feeds the core's running set between denoising steps."""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from handlers.core.answers import progress_line
from handlers.core.errors import InternalError
from handlers.ray.queue import QueuedRequest

logger = logging.getLogger(__name__)


class StepLoop:
    """Takes the place of the replica's BatchQueue when the model's batching is `step`.

    Between two steps, requests whose clients went away leave the running set, and waiting ones join it up
    to batch_size; every step runs on the replica's torch thread, and a request's result is set as soon as
    its last step is done.
    """

    def __init__(self, service, torch_thread: ThreadPoolExecutor, batch_size: int,
                 mark_started: Callable[[list[str]], None], forget: Callable[[list[str]], None]):
        """mark_started and forget keep the replica's ledger (handlers/ray/ledger.py) of the requests it generates."""
        self.torch_thread, self.mark_started, self.forget = torch_thread, mark_started, forget
        self.running_set = service.running_set(batch_size, self._on_step)
        self.waiting: deque[QueuedRequest] = deque()
        self.running: set[QueuedRequest] = set()
        self.arrived = asyncio.Event()
        self.runner: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stepping_since: float | None = None

    @property
    def batch_size(self) -> int:
        return self.running_set.capacity

    def reconfigure(self, batch_size: int, batch_delay_s: float) -> None:
        """Steps never wait for company, so only the size counts; it applies from the next step."""
        self.running_set.capacity = batch_size

    async def result(self, queued: QueuedRequest):
        if self.runner is None or self.runner.done():
            self.loop = asyncio.get_running_loop()
            self.runner = asyncio.create_task(self._run())
        self.waiting.append(queued)
        self.arrived.set()
        return await queued.result

    async def _run(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self.arrived.clear()
                await self.arrived.wait()
                continue
            departed = {queued for queued in self.running if queued.result.done()}
            for queued in departed:
                logger.info("request %s: its client went away; dropped from the running set", queued.request_id)
            joining = []
            while self.waiting and len(self.running) - len(departed) + len(joining) < self.batch_size:
                queued = self.waiting.popleft()
                if not queued.result.done():  # a request whose client went away is not generated
                    joining.append(queued)
            # Before any work: the ingress resends, after this replica dies, only what the ledger does not hold.
            if joining:
                await asyncio.to_thread(self.mark_started, [queued.request_id for queued in joining])
            for queued in joining:
                queued.started.set()
            self.running = (self.running - departed) | set(joining)
            self.stepping_since = time.monotonic()
            try:
                results = await self.loop.run_in_executor(self.torch_thread, self._iteration, departed, joining)
            except Exception:  # noqa: BLE001 - the core keeps each request's own error; this one is ours
                logger.exception("a step failed as a whole; its requests are answered with the error")
                error = InternalError("the server failed to generate this request; the replica's log has the details")
                results = {queued: error for queued in self.running}
                for queued in self.running:
                    self.running_set.drop(queued)
            finally:
                self.stepping_since = None
            if results or departed:
                await asyncio.to_thread(self.forget, [queued.request_id for queued in [*results, *departed]])
            for queued, result in results.items():
                self.running.discard(queued)
                if not queued.result.done():
                    queued.result.set_result(result)

    def _iteration(self, departed: set[QueuedRequest], joining: list[QueuedRequest]) -> dict:
        """On the torch thread: one step of the running set, after its departures and arrivals."""
        for queued in departed:
            self.running_set.drop(queued)
        results = {}
        for queued in joining:
            result = self.running_set.join(queued, queued.request)
            if result is not None:
                results[queued] = result
        return results | self.running_set.iterate()

    def _on_step(self, queued: QueuedRequest, step: int, total: int, elapsed: float) -> None:
        if queued.progress is not None:
            self.loop.call_soon_threadsafe(queued.progress.put_nowait, progress_line(step, total, elapsed))

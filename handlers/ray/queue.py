"""A Ray replica's batches, formed when its pipeline is free, as TorchServe's frontend forms a worker's."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from handlers.core.errors import InternalError, RequestError
from handlers.core.schema import GenerationRequest

logger = logging.getLogger(__name__)


def max_ongoing(batch_size: int) -> int:
    """What a replica holds at once: a batch generating and the next one forming."""
    return 2 * batch_size


@dataclass(eq=False)  # each one is its own request: hashed by identity, as a running set's key
class QueuedRequest:
    """One request waiting for a batch, its request id, where its progress lines go when it streams, when its
    batch started, and its result."""

    request: GenerationRequest | RequestError
    request_id: str = ""
    progress: asyncio.Queue | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class BatchQueue:
    """Forms each batch when the pipeline is free: the first request waiting, then up to batch_size,
    waiting at most batch_delay_s for them.

    Ray's @serve.batch forms the next batch as soon as its first request arrives, while the previous one
    still runs; with an archive's delay of a few milliseconds, its batches under load were mostly of one
    (measured at concurrency 8 on digits: 25 of 29), and throughput stayed at concurrency 1's.
    """

    def __init__(self, run_batch: Callable[[list[QueuedRequest]], Awaitable[list]], batch_size: int, batch_delay_s: float):
        self.run_batch, self.batch_size, self.batch_delay_s = run_batch, batch_size, batch_delay_s
        self.waiting: asyncio.Queue[QueuedRequest] = asyncio.Queue()
        self.runner: asyncio.Task | None = None

    def reconfigure(self, batch_size: int, batch_delay_s: float) -> None:
        """New batches form with these; the one running keeps its own."""
        self.batch_size, self.batch_delay_s = batch_size, batch_delay_s

    async def result(self, queued: QueuedRequest):
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self._run())
        self.waiting.put_nowait(queued)
        return await queued.result

    async def _next_batch(self) -> list[QueuedRequest]:
        batch = [await self.waiting.get()]
        deadline = asyncio.get_running_loop().time() + self.batch_delay_s
        while len(batch) < self.batch_size:
            if not self.waiting.empty():
                batch.append(self.waiting.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.waiting.get(), remaining))
            except TimeoutError:
                break
        # A request whose client went away is not generated.
        return [queued for queued in batch if not queued.result.done()]

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            for queued in batch:
                queued.started.set()
            try:
                results = await self.run_batch(batch)
            except Exception:  # noqa: BLE001 - the service keeps each request's own error; this one is ours
                logger.exception("a batch failed as a whole")
                results = [InternalError("the server failed to generate this request; the replica's log has the details")] * len(batch)
            for queued, result in zip(batch, results):
                if not queued.result.done():
                    queued.result.set_result(result)

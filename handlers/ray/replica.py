"""The model's replicas: each holds the core's DiffusionService, fed by its BatchQueue (or, for step-level
batching, its StepLoop). Ray Serve's own
mechanisms do the rest: check_health replaces a replica whose pipeline is stuck or whose CUDA context is
broken, reconfigure takes a new batch size and delay (user_config), and the deployment's options (app.py)
bound its queue and let a downscale finish the batches it holds."""

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from handlers.core.answers import Answer, progress_line
from handlers.core.errors import RequestError
from handlers.core.formats import NDJSON
from handlers.core.source import open_source
from handlers.ray import ledger
from handlers.ray.intake import RawRequest
from handlers.ray.logs import use_serve_logging
from handlers.ray.metrics import RayMetrics
from handlers.ray.queue import BatchQueue, QueuedRequest, max_ongoing
from handlers.ray.steps import StepLoop

logger = logging.getLogger(__name__)

# The first thing a replica answers once a request's batch starts: from then on the request may have run, so
# the ingress does not send it to another replica should this one stop.
GENERATING = "generating"


@serve.deployment
class DiffusionDeployment:
    """One replica: the core's DiffusionService, fed by its batch queue."""

    def __init__(self, source: str, model_name: str, unpack_root: str | None = None):
        # Here, not at the top: the ingress imports this module too, and needs neither torch nor diffusers.
        from handlers.core.service import DiffusionService

        use_serve_logging()
        model = open_source(source, unpack_root)
        # Every torch call of this replica runs on one thread. torch's OpenMP keeps a team of threads per
        # calling thread; once two teams outnumber the CPUs, libgomp stops spinning for work, and small
        # models run about 3x slower (measured with digits on 2 CPUs).
        self.torch_thread = ThreadPoolExecutor(1, thread_name_prefix="pipeline")
        self.service = self.torch_thread.submit(
            DiffusionService, model.model_dir, model.handler_config, model_name=model_name
        ).result()
        if model.handler_config.batching == "step":
            self.batches = StepLoop(self.service, self.torch_thread, model.batch_size, ledger.mark_started, ledger.forget)
        else:
            self.batches = BatchQueue(self.generate_batch, model.batch_size, model.batch_delay_s)
        self.max_ongoing = max_ongoing(model.batch_size)  # app.py's setting for this deployment
        # The longest a batch may take: batch size x the time a request of max_work may take.
        self.batch_bound_s = model.batch_size * model.handler_config.request_timeout_s
        self.generating_since: float | None = None
        self.metrics = RayMetrics()

    def reconfigure(self, user_config: dict) -> None:
        """user_config: {"batch_size": N, "batch_delay_ms": M}, from the Serve config; new batches use them."""
        batch_size = int(user_config.get("batch_size", self.batches.batch_size))
        self.batches.reconfigure(batch_size, int(user_config.get("batch_delay_ms", 1)) / 1000)
        self.batch_bound_s = batch_size * self.service.limits.request_timeout_s
        if batch_size > self.max_ongoing:
            logger.warning("batch_size %d is over max_ongoing_requests %d (set from the archive's batchSize): batches "
                           "can never fill; deploy the archive again with its batchSize", batch_size, self.max_ongoing)

    def check_health(self) -> None:
        """Raises, and Ray replaces the replica, when a batch has run past any batch's bound or the CUDA
        context no longer answers."""
        since = self.batches.stepping_since if isinstance(self.batches, StepLoop) else self.generating_since
        if since is not None and time.monotonic() - since > self.batch_bound_s:
            raise RuntimeError(f"a batch (or a step) has run {time.monotonic() - since:.0f} s, past its "
                               f"{self.batch_bound_s} s bound: the pipeline is stuck")
        if self.service.device.type == "cuda":
            import torch

            torch.cuda.mem_get_info(self.service.device)  # raises on a broken CUDA context

    async def answer(self, raw: RawRequest):
        """The answer to one request, GENERATING first once its batch starts; a streaming request's first
        answer has no body, and its progress lines and its final answer's body follow it."""
        # Reading decodes images: off the event loop, which keeps taking requests.
        request = await asyncio.to_thread(self.service.read, raw.fields(), raw.accept, raw.request_id)
        if isinstance(request, RequestError):
            yield self._recorded(Answer.refusal(request, self.service.model_name))
            return
        queued = QueuedRequest(request, raw.request_id, asyncio.Queue() if request.stream else None)
        generation = asyncio.ensure_future(self.batches.result(queued))
        started = asyncio.ensure_future(queued.started.wait())
        try:  # a client that goes away cancels this generator: its request is then not generated
            await asyncio.wait({generation, started}, return_when=asyncio.FIRST_COMPLETED)
            yield GENERATING
            if request.stream:
                yield Answer(200, NDJSON, None)
                async for line in self._progress(queued, generation):
                    yield line
            answer = self._recorded(await asyncio.to_thread(self.service.answer, request, await generation, raw.request_id))
            yield answer if not request.stream else answer.body if answer.status == 200 else answer.body + "\n"
        finally:
            started.cancel()
            generation.cancel()

    async def _progress(self, queued: QueuedRequest, generation: asyncio.Future):
        while not (generation.done() and queued.progress.empty()):
            getter = asyncio.ensure_future(queued.progress.get())
            await asyncio.wait({getter, generation}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()

    async def generate_batch(self, batch: list[QueuedRequest]):
        """Compatible requests share pipeline calls; each keeps its own result (the core's isolation)."""
        loop = asyncio.get_running_loop()
        streaming = {id(queued.request): queued.progress for queued in batch if queued.progress is not None}

        def on_step(group, step, total, elapsed):
            for request in group:
                if id(request) in streaming:
                    loop.call_soon_threadsafe(streaming[id(request)].put_nowait, progress_line(step, total, elapsed))

        # The pipeline runs on its thread: the replica's event loop keeps taking requests meanwhile.
        generate = functools.partial(
            self.service.generate, [queued.request for queued in batch], on_step if streaming else None
        )
        request_ids = [queued.request_id for queued in batch]
        # Before any work: the ingress resends, after this replica dies, only what this store does not hold.
        await asyncio.to_thread(ledger.mark_started, request_ids)
        self.generating_since = time.monotonic()
        try:
            return await loop.run_in_executor(self.torch_thread, generate)
        finally:
            self.generating_since = None
            await asyncio.to_thread(ledger.forget, request_ids)

    def _recorded(self, answer: Answer) -> Answer:
        self.metrics.record(answer.metrics)
        return answer

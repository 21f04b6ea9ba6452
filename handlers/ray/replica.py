"""The model's replicas: each holds the core's DiffusionService, fed by its BatchQueue."""

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ray import serve

from handlers.core.answers import Answer, progress_line
from handlers.core.bodies import fields_from_body, fields_from_form
from handlers.core.errors import RequestError
from handlers.core.formats import NDJSON
from handlers.core.source import open_source
from handlers.ray.metrics import RayMetrics
from handlers.ray.queue import BatchQueue, QueuedRequest

logger = logging.getLogger(__name__)


@dataclass
class RawRequest:
    """What the ingress read from an HTTP request: the body, or the form's parts, and the headers that matter."""

    content_type: str
    accept: str | None
    request_id: str
    body: bytes = b""
    form: dict | None = None

    def fields(self):
        """The request's fields, read lazily by the service."""
        if self.form is not None:
            return lambda: fields_from_form(self.form)
        return lambda: fields_from_body(self.body, self.content_type)


def log_to_worker_output() -> None:
    """Our modules log at INFO (loading, warm-up, each batch's size, retries), as a TorchServe worker's
    model_log has it; Ray keeps a replica's output with its worker's logs."""
    handlers_log = logging.getLogger("handlers")
    handlers_log.setLevel(logging.INFO)
    handlers_log.addHandler(logging.StreamHandler())


@serve.deployment(
    max_ongoing_requests=16,
    # Replicas follow the queue: each is asked to hold about one batch in flight.
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
)
class DiffusionDeployment:
    """One replica: the core's DiffusionService, fed by its batch queue."""

    def __init__(self, source: str, model_name: str):
        # Here, not at the top: the ingress imports this module too, and needs neither torch nor diffusers.
        from handlers.core.service import DiffusionService

        log_to_worker_output()
        model = open_source(source)
        # Every torch call of this replica runs on one thread. torch's OpenMP keeps a team of threads per
        # calling thread; once two teams outnumber the CPUs, libgomp stops spinning for work, and small
        # models run about 3x slower (measured with digits on 2 CPUs).
        self.torch_thread = ThreadPoolExecutor(1, thread_name_prefix="pipeline")
        self.service = self.torch_thread.submit(
            DiffusionService, model.model_dir, model.handler_config, model_name=model_name
        ).result()
        self.batches = BatchQueue(self.generate_batch, model.batch_size, model.batch_delay_s)
        self.metrics = RayMetrics()

    async def answer(self, raw: RawRequest):
        """The answer to one request; a streaming request's first answer has no body, and its progress lines
        and its final answer's body follow it."""
        request = self.service.read(raw.fields(), raw.accept, raw.request_id)
        if isinstance(request, RequestError):
            yield self._recorded(Answer.refusal(request, self.service.model_name))
            return
        if not request.stream:
            result = await self.batches.result(QueuedRequest(request))
            # Encoding is CPU work: off the event loop, which keeps taking requests.
            yield self._recorded(await asyncio.to_thread(self.service.answer, request, result, raw.request_id))
            return
        queued = QueuedRequest(request, asyncio.Queue())
        yield Answer(200, NDJSON, None)
        generation = asyncio.ensure_future(self.batches.result(queued))
        while not (generation.done() and queued.progress.empty()):
            getter = asyncio.ensure_future(queued.progress.get())
            await asyncio.wait({getter, generation}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        answer = self._recorded(await asyncio.to_thread(self.service.answer, request, generation.result(), raw.request_id))
        yield answer.body if answer.status == 200 else answer.body + "\n"

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
        return await loop.run_in_executor(self.torch_thread, generate)

    def _recorded(self, answer: Answer) -> Answer:
        self.metrics.record(answer.metrics)
        return answer

"""Ray Serve's adapter over the core: the same request API as the TorchServe handler (fields, defaults,
responses, Content-Types, error bodies, streaming), served at /predictions/<model name> on 127.0.0.1:8000.

Two deployments: a light HTTP ingress that reads bodies, and the model's replicas, which run the core.
The ingress is what lets a request outlive the replica it was sent to: when that replica's process dies,
the ingress sends the request once more, to another replica.

    python -m handlers.ray_serve --source model-store/stable_diffusion.mar   # or a directory, hub id, built-in

The model's settings are the same model-config.yaml `handler:` section an archive carries; a pipeline
directory, hub id or built-in runs with the built-in defaults.
"""

import argparse
import asyncio
import functools
import logging
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from handlers.core.archive import unpack_once
from handlers.core.codecs import NDJSON, progress_line
from handlers.core.config import HandlerConfig, load_handler_config
from handlers.core.errors import InternalError, PayloadTooLarge, RequestError
from handlers.core.metrics import MetricEvent, error_events
from handlers.core.request import GenerationRequest, body_fields, form_fields, request_fields

if TYPE_CHECKING:
    from handlers.core.service import Answer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "stable_diffusion"
MODEL_CONFIG = "model-config.yaml"
METRICS = Path(__file__).with_name("metrics.yaml")
REQUEST_TIMEOUT_S = 660
# TorchServe's default max_request_size: a body is read only up to it, on either engine.
MAX_REQUEST_BYTES = 6_553_500
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# A request whose replica died goes to one more: a second death may be the request's own doing, and a
# third replica is not worth risking on it.
ATTEMPTS = 2


@dataclass
class ModelSource:
    """Where a replica loads its model from, and the settings that come with it."""

    model_dir: Path
    model_config: dict = field(default_factory=dict)  # model-config.yaml, as TorchServe reads it

    @property
    def handler_config(self) -> HandlerConfig:
        return load_handler_config(self.model_config)

    @property
    def batch_size(self) -> int:
        return int(self.model_config.get("batchSize", 1))

    @property
    def batch_delay_s(self) -> float:
        return int(self.model_config.get("maxBatchDelay", 1)) / 1000


def open_source(source: str, unpack_root: Path | None = None) -> ModelSource:
    """A .mar (unpacked safely, once per content), a directory the archiver built (no-archive), a pipeline
    directory, a Hugging Face Hub id or a built-in name, as the archiver takes them."""
    path = Path(source).expanduser()
    unpack_root = unpack_root or Path(tempfile.gettempdir()) / "diffusers-ray-models"
    if path.is_file():
        path = unpack_once(path, unpack_root)
    if path.is_dir() and (path / MODEL_CONFIG).is_file():
        return ModelSource(path, yaml.safe_load((path / MODEL_CONFIG).read_text()) or {})
    if path.is_dir():
        return ModelSource(path)
    from archiver.sources import resolve_source  # hub downloads and built-ins: only when asked for

    return ModelSource(resolve_source(source, Path(tempfile.mkdtemp(prefix="diffusers-ray-"))))


def log_to_worker_output() -> None:
    """Our modules log at INFO (loading, warm-up, each batch's size, retries), as a TorchServe worker's
    model_log has it; Ray keeps a replica's output with its worker's logs."""
    handlers_log = logging.getLogger("handlers")
    handlers_log.setLevel(logging.INFO)
    handlers_log.addHandler(logging.StreamHandler())


class ReplicaDied(RequestError):
    """The replica generating this request stopped, and so did the one it was sent to next."""

    status = 503
    kind = "replica_died"


@dataclass
class Incoming:
    """What the ingress read from an HTTP request: the body, or the form's parts, and the headers that matter."""

    content_type: str
    accept: str | None
    request_id: str
    body: bytes = b""
    form: dict | None = None

    def fields(self):
        """The request's fields, read lazily by the service."""
        if self.form is not None:
            return lambda: request_fields(form_fields(self.form))
        return lambda: request_fields(body_fields(self.body, self.content_type))


@dataclass
class Reply:
    """A replica's answer to the ingress; body is None when progress lines and the answer follow it."""

    status: int
    content_type: str
    headers: dict = field(default_factory=dict)
    body: bytes | None = None

    @classmethod
    def of_error(cls, error: RequestError) -> "Reply":
        return cls(error.status, "application/json", body=error.to_json().encode())

    def response(self) -> Response:
        return Response(self.body, status_code=self.status, media_type=self.content_type, headers=self.headers)


@dataclass
class Pending:
    """One request waiting in a batch, where its progress lines go when it streams, and its outcome."""

    request: GenerationRequest | RequestError
    progress: asyncio.Queue | None = None
    outcome: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class BatchQueue:
    """Forms each batch when the pipeline is free, as TorchServe's frontend does for a worker: the first
    request waiting, then up to batch_size, waiting at most batch_delay_s for them.

    Ray's @serve.batch forms the next batch as soon as its first request arrives, while the previous one
    still runs; with an archive's delay of a few milliseconds, its batches under load were mostly of one
    (measured at concurrency 8 on digits: 25 of 29), and throughput stayed at concurrency 1's.
    """

    def __init__(self, run_batch, batch_size: int, batch_delay_s: float):
        self.run_batch, self.batch_size, self.batch_delay_s = run_batch, batch_size, batch_delay_s
        self.waiting: asyncio.Queue[Pending] = asyncio.Queue()
        self.runner: asyncio.Task | None = None

    async def outcome(self, pending: Pending):
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self._run())
        self.waiting.put_nowait(pending)
        return await pending.outcome

    async def _next_batch(self) -> list[Pending]:
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
        return [pending for pending in batch if not pending.outcome.done()]

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                outcomes = await self.run_batch(batch)
            except Exception:  # noqa: BLE001 - the service keeps each request's own error; this one is ours
                logger.exception("a batch failed as a whole")
                outcomes = [InternalError("the server failed to generate this request; the replica's log has the details")] * len(batch)
            for pending, outcome in zip(batch, outcomes):
                if not pending.outcome.done():
                    pending.outcome.set_result(outcome)


class Metrics:
    """The metrics TorchServe's adapter declares, with the same names and dimensions, as Ray counters."""

    def __init__(self):
        declared = [spec for specs in yaml.safe_load(METRICS.read_text())["model_metrics"].values() for spec in specs]
        self.dimensions = {spec["name"]: tuple(spec["dimensions"]) for spec in declared}
        self.counters = {name: Counter(name, tag_keys=dimensions) for name, dimensions in self.dimensions.items()}

    def record(self, events: list[MetricEvent]) -> None:
        try:
            for event in events:
                self.counters[event.name].inc(event.value, tags=dict(zip(self.dimensions[event.name], event.labels)))
        except Exception:  # noqa: BLE001 - a metric is never worth an answer
            logger.exception("recording metrics failed")


@serve.deployment(
    max_ongoing_requests=16,
    # Replicas follow the queue: each is asked to hold about one batch in flight.
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
)
class DiffusionDeployment:
    """One replica: the core's DiffusionService, fed by Ray Serve's batches."""

    def __init__(self, source: str, model_name: str = DEFAULT_MODEL_NAME):
        # Here, not at the top: the ingress imports this module too, and needs neither torch nor diffusers.
        from handlers.core.service import DiffusionService

        log_to_worker_output()
        model = open_source(source)
        self.model_name = model_name
        # Every torch call of this replica runs on one thread. torch's OpenMP keeps a team of threads per
        # calling thread; once two teams outnumber the CPUs, libgomp stops spinning for work, and small
        # models run about 3x slower (measured with digits on 2 CPUs).
        self.torch_thread = ThreadPoolExecutor(1, thread_name_prefix="pipeline")
        self.service = self.torch_thread.submit(DiffusionService, model.model_dir, model.handler_config).result()
        self.batches = BatchQueue(self.generate_batch, model.batch_size, model.batch_delay_s)
        self.metrics = Metrics()

    async def answer(self, incoming: Incoming):
        """The reply to one request; a streaming request's reply is followed by its progress lines and answer."""
        request = self.service.read(incoming.fields(), incoming.accept, incoming.request_id)
        if isinstance(request, RequestError):
            yield self._reply(request)
            return
        if not request.stream:
            outcome = await self.batches.outcome(Pending(request))
            # Encoding is CPU work: off the event loop, which keeps taking requests.
            yield self._reply(await asyncio.to_thread(self.service.encode, outcome, incoming.request_id))
            return
        pending = Pending(request, asyncio.Queue())
        yield Reply(200, NDJSON)
        generation = asyncio.ensure_future(self.batches.outcome(pending))
        while not (generation.done() and pending.progress.empty()):
            getter = asyncio.ensure_future(pending.progress.get())
            await asyncio.wait({getter, generation}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        answer = await asyncio.to_thread(self.service.encode, generation.result(), incoming.request_id)
        self._record(answer)
        yield answer.to_json() + "\n" if isinstance(answer, RequestError) else answer.body

    async def generate_batch(self, batch: list[Pending]):
        """Compatible requests share pipeline calls; each keeps its own outcome (the core's isolation)."""
        loop = asyncio.get_running_loop()
        streaming = {id(pending.request): pending.progress for pending in batch if pending.progress is not None}

        def on_step(group, step, total, elapsed):
            for request in group:
                if id(request) in streaming:
                    loop.call_soon_threadsafe(streaming[id(request)].put_nowait, progress_line(step, total, elapsed))

        # The pipeline runs on its thread: the replica's event loop keeps taking requests meanwhile.
        generate = functools.partial(
            self.service.generate, [pending.request for pending in batch], on_step if streaming else None
        )
        return await loop.run_in_executor(self.torch_thread, generate)

    def _record(self, answer: "Answer | RequestError") -> None:
        self.metrics.record(self.service.metric_events(answer, self.model_name))

    def _reply(self, answer: "Answer | RequestError") -> Reply:
        self._record(answer)
        if isinstance(answer, RequestError):
            return Reply.of_error(answer)
        return Reply(200, answer.content_type, answer.headers, answer.body)


# It holds requests while replicas generate, and runs no model: many requests at once, no CPU reserved.
@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
class HttpIngress:
    """Reads each HTTP request (up to max_request_bytes) and hands it to a model replica."""

    def __init__(self, model: DeploymentHandle, model_name: str = DEFAULT_MODEL_NAME,
                 max_request_bytes: int = MAX_REQUEST_BYTES):
        log_to_worker_output()
        self.model = model.options(stream=True)
        self.model_name, self.max_request_bytes = model_name, max_request_bytes
        self.metrics = Metrics()

    async def __call__(self, http: Request) -> Response:
        try:
            incoming = await self._read(http)
        except RequestError as error:
            return self._refuse(error)
        for attempt in range(1, ATTEMPTS + 1):
            replies = self.model.answer.remote(incoming)
            try:
                reply = await replies.__anext__()
                break
            except RayActorError:
                logger.warning("the replica answering %s died (attempt %d of %d)", incoming.request_id, attempt, ATTEMPTS)
        else:
            return self._refuse(ReplicaDied(f"the replicas generating this request stopped, {ATTEMPTS} times; "
                                            "it was not answered"))
        if reply.body is not None:
            return reply.response()
        return StreamingResponse(self._rest(replies), media_type=reply.content_type)

    async def _rest(self, replies):
        """A stream's progress lines and answer; a replica that dies midway ends it with an error line."""
        try:
            async for line in replies:
                yield line
        except RayActorError:
            error = ReplicaDied("the replica generating this request stopped while it streamed")
            self._count(error)
            yield error.to_json() + "\n"

    def _count(self, error: RequestError) -> None:
        self.metrics.record(error_events(error, self.model_name))

    def _refuse(self, error: RequestError) -> Response:
        self._count(error)
        return Reply.of_error(error).response()

    async def _read(self, http: Request) -> Incoming:
        headers = http.headers
        incoming = Incoming(headers.get("content-type", ""), headers.get("accept"), headers.get("x-request-id", ""))
        too_large = PayloadTooLarge(
            f"the body is over this server's limit of {self.max_request_bytes} bytes",
            field="body", allowed={"max_request_bytes": self.max_request_bytes},
        )
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_request_bytes:
            raise too_large
        if incoming.content_type.startswith(FORM_TYPES):
            try:
                incoming.form = {key: await value.read() if hasattr(value, "read") else value
                                 for key, value in (await http.form()).multi_items()}
            except Exception:  # noqa: BLE001 - a form the parser cannot read is this request's error
                raise RequestError("the form body could not be read", field="body") from None
            return incoming
        body = bytearray()
        async for chunk in http.stream():
            body += chunk
            if len(body) > self.max_request_bytes:
                raise too_large
        incoming.body = bytes(body)
        return incoming


class AppArgs(BaseModel):
    """The application's arguments: `args:` of a Serve config file (KubeRay's serveConfigV2), or the CLI's."""

    model_config = ConfigDict(extra="forbid")

    source: str
    model_name: str = DEFAULT_MODEL_NAME
    replicas: int | None = Field(None, ge=1, description="a fixed number of replicas; default: scale on queue length")
    max_replicas_per_node: int | None = Field(None, ge=1, description="1 spreads the replicas, one per node")
    # Ray sets a replica's OMP_NUM_THREADS to its CPUs, so on a CPU node this is also torch's thread count.
    num_cpus: float = Field(1, gt=0, description="CPUs each replica reserves")
    num_gpus: float = Field(0, ge=0, description="GPUs each replica reserves")


def build_app(args: AppArgs) -> Application:
    """The Ray Serve application (import path handlers.ray_serve:build_app): the ingress, and the model's
    replicas in a deployment named after the model."""
    options = {"num_replicas": args.replicas, "autoscaling_config": None} if args.replicas else {}
    spread = {"max_replicas_per_node": args.max_replicas_per_node} if args.max_replicas_per_node else {}
    model = DiffusionDeployment.options(
        name=args.model_name, ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        **options, **spread,
    ).bind(args.source, args.model_name)
    # As many ingresses as model replicas when they are fixed, spread alike; one holds many requests.
    return HttpIngress.options(num_replicas=args.replicas or 1, **spread).bind(model, args.model_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers.ray_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="a .mar, a directory, a Hugging Face Hub id or a built-in")
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--host", default="127.0.0.1", help="where Ray Serve's HTTP proxy listens (loopback by default)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, help="a fixed number of replicas (default: scale on queue length)")
    parser.add_argument("--max-replicas-per-node", type=int, help="spread replicas over nodes (1: one per node)")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs each replica reserves (default: 1)")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs each replica reserves (default: 0)")
    parser.add_argument("--address", default="auto", help="the Ray cluster to join (default: the one ray start began)")
    args = parser.parse_args(argv)
    import ray

    ray.init(address=args.address, log_to_driver=False)
    # No request waits forever: as long as TorchServe's responseTimeout in our archives, plus the queue.
    serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": REQUEST_TIMEOUT_S})
    serve.run(
        build_app(AppArgs(source=args.source, model_name=args.model_name, replicas=args.replicas,
                          max_replicas_per_node=args.max_replicas_per_node, num_cpus=args.num_cpus,
                          num_gpus=args.num_gpus)),
        name=args.model_name,
        route_prefix=f"/predictions/{args.model_name}",
    )
    print(f"serving {args.model_name} at http://{args.host}:{args.port}/predictions/{args.model_name}")
    return 0


if __name__ == "__main__":
    # Through the module's own name: replicas then import the deployments' classes (and log under
    # handlers.ray_serve), rather than receive copies pickled from __main__.
    from handlers.ray_serve import main as module_main

    sys.exit(module_main())

"""Ray Serve's adapter over the core: the same request API as the TorchServe handler (fields, defaults,
responses, Content-Types, error bodies, streaming), served by a Ray Serve deployment at
/predictions/<model name> on 127.0.0.1:8000.

    python -m handlers.ray_serve --source model-store/stable_diffusion.mar   # or a directory, hub id, built-in

The model's settings are the same model-config.yaml `handler:` section an archive carries; a pipeline
directory, hub id or built-in runs with the built-in defaults.
"""

import argparse
import asyncio
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.metrics import Counter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from handlers.core.archive import unpack_once
from handlers.core.codecs import NDJSON, progress_line
from handlers.core.config import HandlerConfig, load_handler_config
from handlers.core.errors import PayloadTooLarge, RequestError
from handlers.core.metrics import MetricEvent
from handlers.core.request import GenerationRequest, body_fields, form_fields, request_fields
from handlers.core.service import Answer, DiffusionService

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "stable_diffusion"
MODEL_CONFIG = "model-config.yaml"
METRICS = Path(__file__).with_name("metrics.yaml")
REQUEST_TIMEOUT_S = 660
# TorchServe's default max_request_size: a body is read only up to it, on either engine.
MAX_REQUEST_BYTES = 6_553_500
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


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


@dataclass
class Pending:
    """One request waiting in a batch, and where its progress lines go when it streams."""

    request: GenerationRequest | RequestError
    progress: asyncio.Queue | None = None


@serve.deployment(
    max_ongoing_requests=16,
    # Replicas follow the queue: each is asked to hold about one batch in flight.
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
)
class DiffusionDeployment:
    """One replica: the core's DiffusionService, fed by Ray Serve's batches."""

    def __init__(self, source: str, model_name: str = DEFAULT_MODEL_NAME, max_request_bytes: int = MAX_REQUEST_BYTES):
        # The core logs at INFO (loading, warm-up, each batch's size), as a TorchServe worker's model_log does;
        # Ray keeps a replica's output with its worker's logs.
        core_log = logging.getLogger("handlers")
        core_log.setLevel(logging.INFO)
        core_log.addHandler(logging.StreamHandler())
        model = open_source(source)
        self.model_name, self.max_request_bytes = model_name, max_request_bytes
        self.service = DiffusionService(model.model_dir, model.handler_config)
        self.generate_batch.set_max_batch_size(model.batch_size)
        self.generate_batch.set_batch_wait_timeout_s(model.batch_delay_s)
        # The metrics TorchServe's adapter declares, with the same names and dimensions.
        declared = [spec for specs in yaml.safe_load(METRICS.read_text())["model_metrics"].values() for spec in specs]
        self.dimensions = {spec["name"]: tuple(spec["dimensions"]) for spec in declared}
        self.counters = {name: Counter(name, tag_keys=dimensions) for name, dimensions in self.dimensions.items()}

    async def __call__(self, http: Request) -> Response:
        request_id = http.headers.get("x-request-id", "")
        content_type = http.headers.get("content-type", "")
        try:
            fields = await self._fields(http, content_type)
        except RequestError as error:
            return self._respond(error)
        request = self.service.read(fields, http.headers.get("accept"), request_id)
        if isinstance(request, RequestError):
            return self._respond(request)
        if request.stream:
            pending = Pending(request, asyncio.Queue())
            return StreamingResponse(self._stream(pending, request_id), media_type=NDJSON)
        outcome = await self.generate_batch(Pending(request))
        # Encoding is CPU work: off the event loop, which keeps taking requests.
        return self._respond(await asyncio.to_thread(self.service.encode, outcome, request_id))

    async def _fields(self, http: Request, content_type: str):
        """The request's fields, read lazily by the service; the body is read only up to max_request_bytes."""
        declared = http.headers.get("content-length")
        too_large = PayloadTooLarge(
            f"the body is over this server's limit of {self.max_request_bytes} bytes",
            field="body", allowed={"max_request_bytes": self.max_request_bytes},
        )
        if declared and declared.isdigit() and int(declared) > self.max_request_bytes:
            raise too_large
        if content_type.startswith(FORM_TYPES):
            try:
                form = {key: await value.read() if hasattr(value, "read") else value
                        for key, value in (await http.form()).multi_items()}
            except Exception:  # noqa: BLE001 - a form the parser cannot read is this request's error
                raise RequestError("the form body could not be read", field="body") from None
            return lambda: request_fields(form_fields(form))
        body = bytearray()
        async for chunk in http.stream():
            body += chunk
            if len(body) > self.max_request_bytes:
                raise too_large
        return lambda: request_fields(body_fields(bytes(body), content_type))

    async def _stream(self, pending: Pending, request_id: str):
        generation = asyncio.ensure_future(self.generate_batch(pending))
        while not (generation.done() and pending.progress.empty()):
            getter = asyncio.ensure_future(pending.progress.get())
            await asyncio.wait({getter, generation}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        answer = await asyncio.to_thread(self.service.encode, generation.result(), request_id)
        self._record(answer)
        yield answer.to_json() + "\n" if isinstance(answer, RequestError) else answer.body

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.001)
    async def generate_batch(self, batch: list[Pending]):
        """Compatible requests share pipeline calls; each keeps its own outcome (the core's isolation)."""
        loop = asyncio.get_running_loop()
        streaming = {id(pending.request): pending.progress for pending in batch if pending.progress is not None}

        def on_step(group, step, total, elapsed):
            for request in group:
                if id(request) in streaming:
                    loop.call_soon_threadsafe(streaming[id(request)].put_nowait, progress_line(step, total, elapsed))

        # The pipeline runs in a thread: the replica's event loop keeps taking requests meanwhile.
        return await asyncio.to_thread(
            self.service.generate, [pending.request for pending in batch], on_step if streaming else None
        )

    def _respond(self, answer: Answer | RequestError) -> Response:
        self._record(answer)
        if isinstance(answer, RequestError):
            return JSONResponse(answer.to_dict(), status_code=answer.status)
        return Response(answer.body, media_type=answer.content_type, headers=answer.headers)

    def _record(self, answer: Answer | RequestError) -> None:
        try:
            for event in self.service.metric_events(answer, self.model_name):
                self._count(event)
        except Exception:  # noqa: BLE001 - a metric is never worth an answer
            logger.exception("recording metrics failed")

    def _count(self, event: MetricEvent) -> None:
        tags = dict(zip(self.dimensions[event.name], event.labels))
        self.counters[event.name].inc(event.value, tags=tags)


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
    """The Ray Serve application (import path handlers.ray_serve:build_app)."""
    options = {"num_replicas": args.replicas, "autoscaling_config": None} if args.replicas else {}
    options["ray_actor_options"] = {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    if args.max_replicas_per_node:
        options["max_replicas_per_node"] = args.max_replicas_per_node
    return DiffusionDeployment.options(name=args.model_name, **options).bind(args.source, args.model_name)


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
    sys.exit(main())

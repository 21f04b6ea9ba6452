"""The Ray Serve application (import path handlers.ray.app:build_app, for `serve run` / `serve deploy` with a
Serve config file, locally as on KubeRay): the HTTP ingress, and the model's replicas in a deployment named
after the model, with Ray Serve's own mechanisms set from the archive's model-config.yaml."""

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from handlers.core.config import load_handler_config, model_description
from handlers.core.source import model_config_of
from handlers.ray.ingress import HttpIngress
from handlers.ray.queue import max_ongoing
from handlers.ray.replica import DiffusionDeployment

DEFAULT_MODEL_NAME = "stable_diffusion"


class AppArgs(BaseModel):
    """The application's arguments: `args:` of a Serve config file (KubeRay's serveConfigV2 too)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="a .mar, an archive directory, a pipeline directory or a Hugging Face Hub id")
    model_name: str = DEFAULT_MODEL_NAME
    replicas: int | None = Field(None, ge=1, description="a fixed number of replicas; default: scale on queue length")
    max_replicas_per_node: int | None = Field(None, ge=1, description="1 spreads the replicas, one per node")
    # Ray sets a replica's OMP_NUM_THREADS to its CPUs, so on a CPU node this is also torch's thread count.
    num_cpus: float = Field(1, gt=0, description="CPUs each replica reserves")
    num_gpus: float = Field(0, ge=0, description="GPUs each replica reserves")
    api_docs: bool = Field(True, description="serve openapi.json and docs beside the model's endpoint")
    unpack_root: str | None = Field(None, description="a private directory .mar files are unpacked into")
    max_queued_requests: int = Field(
        100, ge=1, description="requests an ingress may queue for the replicas beyond what they hold; past it, 503 "
        "at once, as TorchServe's job_queue_size (100 by default) answers",
    )


def build_app(args: AppArgs | dict) -> Application:
    """The ingress and the model's replicas, bound to their arguments."""
    args = AppArgs.model_validate(args)
    model_config = model_config_of(args.source)
    handler = load_handler_config(model_config)
    batch_size = int(model_config.get("batchSize", 1))
    scaling = {"num_replicas": args.replicas, "autoscaling_config": None} if args.replicas else {
        # Replicas follow the queue: each is asked to hold about one batch.
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": batch_size}}
    spread = {"max_replicas_per_node": args.max_replicas_per_node} if args.max_replicas_per_node else {}
    model = DiffusionDeployment.options(
        name=args.model_name,
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        max_ongoing_requests=max_ongoing(batch_size),  # user_config can change the batch, not this
        max_queued_requests=args.max_queued_requests,
        user_config={"batch_size": batch_size, "batch_delay_ms": int(model_config.get("maxBatchDelay", 1))},
        # A downscaled replica finishes what it holds: two batches, each up to batch size x request_timeout_s.
        graceful_shutdown_timeout_s=2 * batch_size * handler.request_timeout_s,
        logging_config={"log_level": "INFO"},
        **scaling, **spread,
    ).bind(args.source, args.model_name, args.unpack_root)
    # As many ingresses as model replicas when they are fixed, spread alike; one holds many requests.
    return HttpIngress.options(num_replicas=args.replicas or 1, logging_config={"log_level": "INFO"}, **spread).bind(
        model, args.model_name, model_description(handler), args.api_docs
    )

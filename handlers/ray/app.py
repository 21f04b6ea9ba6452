"""The Ray Serve application (import path handlers.ray.app:build_app, for `serve run` and KubeRay's
serveConfigV2): the HTTP ingress, and the model's replicas in a deployment named after the model."""

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from handlers.core.config import load_handler_config, model_description
from handlers.core.source import model_config_of
from handlers.ray.ingress import HttpIngress
from handlers.ray.replica import DiffusionDeployment

DEFAULT_MODEL_NAME = "stable_diffusion"


class AppArgs(BaseModel):
    """The application's arguments: `args:` of a Serve config file (KubeRay's serveConfigV2), or the CLI's."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="a .mar, an archive directory, a pipeline directory or a Hugging Face Hub id")
    model_name: str = DEFAULT_MODEL_NAME
    replicas: int | None = Field(None, ge=1, description="a fixed number of replicas; default: scale on queue length")
    max_replicas_per_node: int | None = Field(None, ge=1, description="1 spreads the replicas, one per node")
    # Ray sets a replica's OMP_NUM_THREADS to its CPUs, so on a CPU node this is also torch's thread count.
    num_cpus: float = Field(1, gt=0, description="CPUs each replica reserves")
    num_gpus: float = Field(0, ge=0, description="GPUs each replica reserves")
    api_docs: bool = Field(True, description="serve openapi.json and docs beside the model's endpoint")


def build_app(args: AppArgs | dict) -> Application:
    """The ingress and the model's replicas, bound to their arguments."""
    args = AppArgs.model_validate(args)
    options = {"num_replicas": args.replicas, "autoscaling_config": None} if args.replicas else {}
    spread = {"max_replicas_per_node": args.max_replicas_per_node} if args.max_replicas_per_node else {}
    model = DiffusionDeployment.options(
        name=args.model_name, ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        **options, **spread,
    ).bind(args.source, args.model_name)
    description = model_description(load_handler_config(model_config_of(args.source)))
    # As many ingresses as model replicas when they are fixed, spread alike; one holds many requests.
    return HttpIngress.options(num_replicas=args.replicas or 1, **spread).bind(
        model, args.model_name, description, args.api_docs
    )

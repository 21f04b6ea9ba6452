"""`python -m handlers.ray --source model-store/stable_diffusion.mar`: deploy the app on a running Ray
cluster, at /predictions/<model name> on 127.0.0.1:8000 (Ray Serve's port)."""

import argparse
import sys

from ray import serve

from handlers.ray.app import DEFAULT_MODEL_NAME, AppArgs, build_app

# No request waits forever: as long as TorchServe's responseTimeout in our archives, plus the queue.
REQUEST_TIMEOUT_S = 660


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers.ray", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="a .mar, an archive or pipeline directory, or a Hugging Face Hub id")
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--host", default="127.0.0.1", help="where Ray Serve's HTTP proxy listens (loopback by default)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, help="a fixed number of replicas (default: scale on queue length)")
    parser.add_argument("--max-replicas-per-node", type=int, help="spread replicas over nodes (1: one per node)")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs each replica reserves (default: 1)")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs each replica reserves (default: 0)")
    parser.add_argument("--no-api-docs", dest="api_docs", action="store_false", help="serve no openapi.json and docs")
    parser.add_argument("--address", default="auto", help="the Ray cluster to join (default: the one ray start began)")
    args = parser.parse_args(argv)
    import ray

    ray.init(address=args.address, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": REQUEST_TIMEOUT_S})
    app_args = AppArgs(source=args.source, model_name=args.model_name, replicas=args.replicas,
                       max_replicas_per_node=args.max_replicas_per_node, num_cpus=args.num_cpus,
                       num_gpus=args.num_gpus, api_docs=args.api_docs)
    serve.run(build_app(app_args), name=args.model_name, route_prefix=f"/predictions/{args.model_name}")
    print(f"serving {args.model_name} at http://{args.host}:{args.port}/predictions/{args.model_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

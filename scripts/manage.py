#!/usr/bin/env python3
"""TorchServe management API: describe a model, scale its workers, wait until it is READY, or check health."""

import argparse
import json
import sys
import time

import requests

from client import add_server_arguments, send


def management(args, method: str, path: str, **kwargs) -> requests.Response:
    return send(method, f"{args.url}{path}", "management", args.key_file, args.url, **kwargs)


def describe(args) -> dict:
    response = management(args, "GET", f"/models/{args.model}", timeout=30)
    response.raise_for_status()
    return response.json()[0]


def scale(args) -> dict:
    response = management(
        args,
        "PUT",
        f"/models/{args.model}",
        params={"min_worker": args.workers, "max_worker": args.workers, "synchronous": "true"},
        timeout=args.timeout,
    )
    if response.status_code != 200:
        sys.exit(f"error {response.status_code}: {response.text}")
    return describe(args)


def wait(args) -> dict:
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            model = describe(args)
            states = [worker["status"] for worker in model["workers"]]
            print(f"  workers: {states or 'starting'}", flush=True)
            if "READY" in states:
                return model
        except (requests.RequestException, FileNotFoundError, KeyError) as error:
            print(f"  waiting for TorchServe ({type(error).__name__})", flush=True)
        if time.monotonic() > deadline:
            sys.exit(f"error: {args.model} not READY after {args.timeout}s; see logs/model_log.log")
        time.sleep(2)


def health(args) -> int:
    """TorchServe's /ping, which needs the inference key: 0 when Healthy, 1 otherwise (for probes)."""
    try:
        response = send("GET", f"{args.inference_url}/ping", "inference", args.key_file, args.url, timeout=10)
    except (requests.RequestException, FileNotFoundError) as error:
        print(f"unreachable: {type(error).__name__}: {error}")
        return 1
    status = response.json().get("status") if response.headers.get("Content-Type", "").startswith("application/json") else None
    print(f"{response.status_code} {status or response.text.strip()}")
    return 0 if response.status_code == 200 and status == "Healthy" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("describe", help="print the model's description, workers included")
    scale_parser = commands.add_parser("scale", help="set the number of workers and wait for them")
    scale_parser.add_argument("--workers", type=int, required=True)
    scale_parser.add_argument("--timeout", type=float, default=600)
    wait_parser = commands.add_parser("wait", help="wait until a worker is READY")
    wait_parser.add_argument("--timeout", type=float, default=600)
    commands.add_parser("health", help="exit 0 when /ping answers Healthy (renews an expired key first)")
    for sub in commands.choices.values():
        add_server_arguments(sub, default_port=8081)
    args = parser.parse_args(argv)

    if args.command == "health":
        return health(args)
    model = {"describe": describe, "scale": scale, "wait": wait}[args.command](args)
    if args.command == "describe":
        print(json.dumps(model, indent=2))
    else:
        print(f"{args.model}: {len(model['workers'])} worker(s): {[worker['status'] for worker in model['workers']]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

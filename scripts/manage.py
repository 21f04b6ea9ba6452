#!/usr/bin/env python3
"""TorchServe management API: describe a model, scale its workers, or wait until it is READY."""

import argparse
import json
import sys
import time

import requests

from client import add_server_arguments, auth_header


def describe(args) -> dict:
    response = requests.get(
        f"{args.url}/models/{args.model}", headers=auth_header("management", args.key_file), timeout=30
    )
    response.raise_for_status()
    return response.json()[0]


def scale(args) -> dict:
    response = requests.put(
        f"{args.url}/models/{args.model}",
        params={"min_worker": args.workers, "max_worker": args.workers, "synchronous": "true"},
        headers=auth_header("management", args.key_file),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("describe", help="print the model's description, workers included")
    scale_parser = commands.add_parser("scale", help="set the number of workers and wait for them")
    scale_parser.add_argument("--workers", type=int, required=True)
    scale_parser.add_argument("--timeout", type=float, default=600)
    wait_parser = commands.add_parser("wait", help="wait until a worker is READY")
    wait_parser.add_argument("--timeout", type=float, default=600)
    for sub in commands.choices.values():
        add_server_arguments(sub, default_port=8081)
    args = parser.parse_args(argv)

    model = {"describe": describe, "scale": scale, "wait": wait}[args.command](args)
    if args.command == "describe":
        print(json.dumps(model, indent=2))
    else:
        print(f"{args.model}: {len(model['workers'])} worker(s): {[worker['status'] for worker in model['workers']]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

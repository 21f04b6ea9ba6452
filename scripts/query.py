#!/usr/bin/env python3
"""Send a prompt (and parameters) to the server and save the image as a PNG."""

import argparse
import sys
from pathlib import Path

import requests

from client import add_server_arguments, auth_header, image_from_numpy_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt")
    parser.add_argument("--out", type=Path, default=Path("output.png"), help="PNG to write (default: %(default)s)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-inference-steps", type=int)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    add_server_arguments(parser, default_port=8080)
    args = parser.parse_args(argv)

    parameters = ("seed", "num_inference_steps", "guidance_scale", "height", "width")
    body = {"prompt": args.prompt, **{name: getattr(args, name) for name in parameters if getattr(args, name) is not None}}
    response = requests.post(
        f"{args.url}/predictions/{args.model}", json=body, headers=auth_header("inference", args.key_file), timeout=3600
    )
    if response.status_code != 200:
        print(f"error {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    image = image_from_numpy_json(response.text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"saved {args.out} ({image.width}x{image.height}, seed {response.headers.get('X-Seed')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

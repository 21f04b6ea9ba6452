#!/usr/bin/env python3
"""Send prompts and generation parameters to the server and save the images.

Every request field is a flag (generated from the request schema, handlers/core/schema.py). One image
is saved as --out; several as OUT-1, OUT-2, ... The file type follows the response.
"""

import argparse
import base64
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import DEFAULT_DEADLINE_S, add_server_arguments, predict, save_response  # noqa: E402
from handlers.core.flags import add_schema_arguments, schema_values  # noqa: E402
from handlers.core.images import IMAGE_FIELDS  # noqa: E402
from handlers.core.schema import GenerationRequest  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    fields = parser.add_argument_group("request fields (unset: the model's default)")
    add_schema_arguments(fields, GenerationRequest, skip=("prompt",))
    # Here, unlike the server's numpy list, PNG: this client saves files.
    parser.set_defaults(output_format="png")
    parser.add_argument(
        "--deadline", type=float, default=DEFAULT_DEADLINE_S,
        help="seconds without an answer before the request is sent once more, with the same seed (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=Path("output.png"), help="where to save (default: %(default)s)")
    add_server_arguments(parser, default_port=8080)
    return parser


def request_body(args: argparse.Namespace) -> dict:
    body = {"prompt": args.prompt[0] if len(args.prompt) == 1 else args.prompt}
    body |= schema_values(args, GenerationRequest)
    body |= {name: base64.b64encode(body[name].read_bytes()).decode() for name in IMAGE_FIELDS if name in body}
    return body


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    body = request_body(args)
    url = f"{args.url}/predictions/{args.model}"
    response = predict(url, body, args.key_file, args.management_url, args.deadline)
    if response.status_code != 200:
        print(f"error {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    if body.get("stream"):
        print(response.text, end="")
        return 0
    paths = save_response(response, args.out)
    seed = int(response.headers["X-Seed"])
    # The server seeds image i with seed + i, wrapping at 2^32 (GenerationRequest.image_seeds).
    seeds = ", ".join(str((seed + offset) % 2**32) for offset in range(len(paths)))
    print(f"saved {', '.join(map(str, paths))} (seeds {seeds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

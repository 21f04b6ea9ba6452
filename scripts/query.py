#!/usr/bin/env python3
"""Send prompts and generation parameters to the server and save the images.

One image is saved as --out; several as OUT-1, OUT-2, ... The file type follows the response.
"""

import argparse
import base64
import sys
from pathlib import Path

from client import DEFAULT_DEADLINE_S, add_server_arguments, predict, save_response

PARAMETERS = (
    "negative_prompt", "num_inference_steps", "guidance_scale", "height", "width", "seed",
    "num_images_per_prompt", "scheduler", "output_format", "quality",
    "task", "strength", "controlnet", "controlnet_conditioning_scale", "lora", "lora_weight",
)
IMAGE_PARAMETERS = ("image", "mask_image", "control_image")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--num-inference-steps", type=int, help="1-150")
    parser.add_argument("--guidance-scale", type=float, help="0-30")
    parser.add_argument("--height", type=int, help="64-2048, a multiple of 8")
    parser.add_argument("--width", type=int, help="64-2048, a multiple of 8")
    parser.add_argument("--seed", type=int, help="0 to 2^32-1; random when absent")
    parser.add_argument("--num-images-per-prompt", type=int, help="1-8 unless the model allows more")
    parser.add_argument("--scheduler", help="ddim, pndm, lms, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_karras, unipc, ddpm")
    parser.add_argument("--output-format", default="png", choices=("png", "jpeg", "webp", "json", "numpy"),
                        help="what the server sends back (default: %(default)s)")
    parser.add_argument("--quality", type=int, help="jpeg/webp quality, 1-100")
    parser.add_argument("--task", choices=("txt2img", "img2img", "inpaint"), help="default: inferred from the images")
    parser.add_argument("--image", type=Path, help="img2img/inpaint start image file")
    parser.add_argument("--mask-image", type=Path, help="inpaint mask file: white is repainted")
    parser.add_argument("--strength", type=float, help="0-1")
    parser.add_argument("--controlnet", help="a ControlNet of the model, by name (e.g. canny)")
    parser.add_argument("--control-image", type=Path, help="the ControlNet's conditioning image file")
    parser.add_argument("--controlnet-conditioning-scale", type=float, help="0-2")
    parser.add_argument("--lora", help="a LoRA adapter of the model, by name")
    parser.add_argument("--lora-weight", type=float, help="-2 to 2")
    parser.add_argument(
        "--deadline", type=float, default=DEFAULT_DEADLINE_S,
        help="seconds without an answer before the request is sent once more, with the same seed (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=Path("output.png"), help="where to save (default: %(default)s)")
    add_server_arguments(parser, default_port=8080)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    body = {"prompt": args.prompt[0] if len(args.prompt) == 1 else args.prompt}
    body |= {name: getattr(args, name) for name in PARAMETERS if getattr(args, name) is not None}
    body |= {
        name: base64.b64encode(getattr(args, name).read_bytes()).decode()
        for name in IMAGE_PARAMETERS
        if getattr(args, name) is not None
    }
    response = predict(f"{args.url}/predictions/{args.model}", body, args.key_file, args.management_url, args.deadline)
    if response.status_code != 200:
        print(f"error {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    paths = save_response(response, args.out)
    seed = int(response.headers["X-Seed"])
    # The server seeds image i with seed + i, wrapping at 2^32 (GenerationRequest.image_seeds).
    seeds = ", ".join(str((seed + offset) % 2**32) for offset in range(len(paths)))
    print(f"saved {', '.join(map(str, paths))} (seeds {seeds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Ask the running server for the ten digits and save them as one labelled grid (docs/digits.png)."""

import argparse
import io
from pathlib import Path

from PIL import Image, ImageDraw

from client import REPO_ROOT, add_server_arguments, predict

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "digits.png")
    parser.add_argument("--seeds", type=int, default=3, help="rows: one seed each (default: %(default)s)")
    parser.add_argument("--scale", type=int, default=2, help="upscale each 64x64 tile (default: %(default)s)")
    add_server_arguments(parser, default_port=8080)
    args = parser.parse_args(argv)

    tile = 64 * args.scale
    label_height = 18
    grid = Image.new("RGB", (10 * tile, args.seeds * tile + label_height), "white")
    draw = ImageDraw.Draw(grid)
    for digit in range(10):
        draw.text((digit * tile + tile // 2 - 12, 3), f'"{digit}"', fill="black")
        for row in range(args.seeds):
            response = predict(
                f"{args.url}/predictions/{args.model}",
                {"prompt": f"a handwritten {WORDS[digit]}" if row % 2 else f"digit {digit}", "seed": row,
                 "output_format": "png"},
                args.key_file,
                args.management_url,
            )
            response.raise_for_status()
            image = Image.open(io.BytesIO(response.content)).convert("RGB").resize((tile, tile), Image.Resampling.NEAREST)
            grid.paste(image, (digit * tile, label_height + row * tile))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"saved {args.out}: digits 0-9 across, seeds 0-{args.seeds - 1} down")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

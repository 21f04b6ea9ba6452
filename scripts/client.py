"""Small client helpers shared by query.py and manage.py: addresses, keys, and decoding."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent


def auth_header(kind: str, key_file: Path) -> dict[str, str]:
    """The Bearer header for 'inference' or 'management'; empty when token auth is off (no key file)."""
    if not key_file.is_file():
        return {}
    return {"Authorization": f"Bearer {json.loads(key_file.read_text())[kind]['key']}"}


def image_from_numpy_json(body: str) -> Image.Image:
    """Decode the default response the way the pytorch/serve example's client does."""
    return Image.fromarray(np.array(json.loads(body), dtype="uint8"))


def add_server_arguments(parser, default_port: int) -> None:
    parser.add_argument("--url", default=f"http://127.0.0.1:{default_port}", help="server address (default: %(default)s)")
    parser.add_argument("--model", default="stable_diffusion", help="model name (default: %(default)s)")
    parser.add_argument(
        "--key-file", type=Path, default=REPO_ROOT / "key_file.json", help="TorchServe's key file (default: %(default)s)"
    )

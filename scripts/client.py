"""Small client helpers shared by query.py and manage.py: addresses, keys, and decoding."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpeg", "image/webp": ".webp"}


def auth_header(kind: str, key_file: Path) -> dict[str, str]:
    """The Bearer header for 'inference' or 'management'; empty when token auth is off (no key file)."""
    if not key_file.is_file():
        return {}
    return {"Authorization": f"Bearer {json.loads(key_file.read_text())[kind]['key']}"}


def images_from_numpy_json(body: str) -> list[Image.Image]:
    """Decode the numpy-list response the way the pytorch/serve example's client does."""
    array = np.array(json.loads(body), dtype="uint8")
    return [Image.fromarray(image) for image in (array if array.ndim == 4 else [array])]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_response(response: requests.Response, out: Path) -> list[Path]:
    """Write every image in a response: raw image bytes, the json document, or the numpy list."""
    content_type = response.headers.get("Content-Type", "").split(";")[0]
    if content_type in SUFFIXES:
        files = [(response.content, SUFFIXES[content_type])]
    else:
        document = response.json()
        if isinstance(document, dict):
            suffix = SUFFIXES[document["content_type"]]
            files = [(base64.b64decode(image), suffix) for image in document["images"]]
        else:
            files = [(png_bytes(image), ".png") for image in images_from_numpy_json(response.text)]
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, (data, suffix) in enumerate(files, start=1):
        path = out.with_suffix(suffix) if len(files) == 1 else out.with_name(f"{out.stem}-{number}{suffix}")
        path.write_bytes(data)
        paths.append(path)
    return paths


def add_server_arguments(parser, default_port: int) -> None:
    parser.add_argument("--url", default=f"http://127.0.0.1:{default_port}", help="server address (default: %(default)s)")
    parser.add_argument("--model", default="stable_diffusion", help="model name (default: %(default)s)")
    parser.add_argument(
        "--key-file", type=Path, default=REPO_ROOT / "key_file.json", help="TorchServe's key file (default: %(default)s)"
    )

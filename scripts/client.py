"""Small client helpers shared by query.py and manage.py: addresses, keys, and decoding."""

import base64
import io
import json
import secrets
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
INFERENCE_PORT, MANAGEMENT_PORT = 8080, 8081
SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpeg", "image/webp": ".webp"}


def auth_header(kind: str, key_file: Path) -> dict[str, str]:
    """The Bearer header for 'inference' or 'management'; empty when token auth is off (no key file)."""
    if not key_file.is_file():
        return {}
    return {"Authorization": f"Bearer {json.loads(key_file.read_text())[kind]['key']}"}


def key_expired(kind: str, key_file: Path) -> bool:
    """Whether the key's expiration time in key_file.json has passed (the API key has none)."""
    expiry = json.loads(key_file.read_text())[kind].get("expiration time")
    if expiry is None:
        return False
    # TorchServe writes Java's Instant, e.g. 2026-11-22T10:00:00.123456Z; seconds are precise enough.
    expires = datetime.strptime(expiry[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return expires <= datetime.now(timezone.utc)


def renew_key(kind: str, key_file: Path, management_url: str) -> None:
    """Ask TorchServe, with the API key, for a new inference or management key; it rewrites key_file.json."""
    response = requests.get(
        f"{management_url}/token", params={"type": kind}, headers=auth_header("API", key_file), timeout=30
    )
    response.raise_for_status()


def send(method: str, url: str, kind: str, key_file: Path, management_url: str, **kwargs) -> requests.Response:
    """A request with the current key from key_file.json.

    TorchServe's inference and management keys expire (token_expiration_min, 60 minutes by default)
    and are refused from then on; an expired key is renewed once and the request sent again.
    """
    headers = kwargs.pop("headers", {})
    response = requests.request(method, url, headers={**headers, **auth_header(kind, key_file)}, **kwargs)
    if response.status_code == 400 and key_file.is_file() and key_expired(kind, key_file):
        renew_key(kind, key_file, management_url)
        response = requests.request(method, url, headers={**headers, **auth_header(kind, key_file)}, **kwargs)
    return response


# A request that reaches a worker is answered within the model's responseTimeout (600 s in our
# archives): 200, or 500 when the worker dies or runs out of time. A request TorchServe 0.12.0 loses
# (README, "Nothing waits forever") is never answered, so no answer by then means: send it again.
DEFAULT_DEADLINE_S = 660


def predict(url: str, body: dict, key_file: Path, management_url: str, deadline_s: float = DEFAULT_DEADLINE_S):
    """POST a generation request; with no answer within deadline_s, send it once more.

    The request carries a seed (one is drawn here when absent), so the retry makes the same images.
    """
    body = {"seed": secrets.randbelow(2**32), **body}
    for attempt in (1, 2):
        try:
            return send("POST", url, "inference", key_file, management_url, json=body, timeout=(10, deadline_s))
        except requests.Timeout:
            if attempt == 2:
                raise
            print(f"no answer within {deadline_s:g} s; sending the request again (seed {body['seed']})", file=sys.stderr)


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
    """--url is this script's API (inference 8080 or management 8081); the other address is an option too."""
    parser.add_argument("--url", default=f"http://127.0.0.1:{default_port}", help="server address (default: %(default)s)")
    if default_port == MANAGEMENT_PORT:
        parser.add_argument(
            "--inference-url", default=f"http://127.0.0.1:{INFERENCE_PORT}", help="inference API (default: %(default)s)"
        )
    else:
        parser.add_argument(
            "--management-url",
            default=f"http://127.0.0.1:{MANAGEMENT_PORT}",
            help="management API, where expired keys are renewed (default: %(default)s)",
        )
    parser.add_argument("--model", default="stable_diffusion", help="model name (default: %(default)s)")
    parser.add_argument(
        "--key-file", type=Path, default=REPO_ROOT / "key_file.json", help="TorchServe's key file (default: %(default)s)"
    )

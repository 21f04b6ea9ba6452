"""Encode generated images into response bodies, and bound their size before any work."""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image as PILImage
from PIL.Image import Image

from handlers.core.images import IMAGE_FIELDS

if TYPE_CHECKING:  # request.py checks answer sizes with this module, so only the type is imported here
    from handlers.core.request import GenerationRequest

JSON = "application/json"
NDJSON = "application/x-ndjson"
PADDED_VALUES = np.array([f"{value:>3}".encode() for value in range(256)], dtype="S3")
IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image: Image, image_format: str, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": quality} if image_format in ("jpeg", "webp") else {}
    image.convert("RGB").save(buffer, format=PIL_FORMATS[image_format], **options)
    return buffer.getvalue()


def numpy_list(images: list[Image]) -> list:
    """HxWx3 nested lists: one image as is (what the pytorch/serve example returns), several as a list."""
    arrays = [np.asarray(image.convert("RGB")).tolist() for image in images]
    return arrays[0] if len(arrays) == 1 else arrays


def encode_numpy_json(images: list[Image]) -> bytes:
    """numpy_list(images) as compact JSON, built with array operations rather than tolist() and json.dumps."""
    bodies = [numpy_json(np.asarray(image.convert("RGB"))) for image in images]
    return bodies[0] if len(bodies) == 1 else b"[" + b",".join(bodies) + b"]"


def numpy_json(array: np.ndarray) -> bytes:
    """Equal to json.dumps(array.tolist(), separators=(",", ":")) for an HxWxC uint8 array, about 9x faster.

    Every value is first written three characters wide, space-padded, so the whole body is laid
    out by fixed-size array slices; dropping the spaces then leaves the compact JSON.
    """
    height, width, channels = array.shape
    digits = np.frombuffer(PADDED_VALUES[array].tobytes(), np.uint8).reshape(height, width, channels, 3)
    values = np.full((height, width, channels, 4), ord(","), np.uint8)  # "ddd," per value
    values[..., :3] = digits
    values = values.reshape(height, width, channels * 4)
    values[..., -1] = ord("]")  # the pixel's last value closes it
    pixels = np.empty((height, width, channels * 4 + 2), np.uint8)  # "[ddd,ddd,ddd],"
    pixels[..., 0] = ord("[")
    pixels[..., 1:-1] = values
    pixels[..., -1] = ord(",")
    rows = np.empty((height, width * pixels.shape[-1] + 2), np.uint8)  # "[pixels],"
    rows[:, 0] = ord("[")
    rows[:, 1:-1] = pixels.reshape(height, -1)
    rows[:, -2] = ord("]")  # replaces the row's last pixel comma
    rows[:, -1] = ord(",")
    body = np.concatenate([np.frombuffer(b"[", np.uint8), rows.reshape(-1)])
    body[-1] = ord("]")
    return body[body != ord(" ")].tobytes()


def compact_json(value: Any) -> str:
    """Serialised here because TorchServe would use indent=2, which triples the size of image lists."""
    return json.dumps(value, separators=(",", ":"))


def json_document(
    request: GenerationRequest, images: list[Image], image_format: str, nsfw_flags: list[bool] | None = None
) -> dict:
    """Base64 images with the seeds and parameters that made them, and the safety checker's flags where it ran."""
    encoded = [base64.b64encode(encode_image(image, image_format, request.quality)).decode() for image in images]
    return document_of(request, encoded, image_format, nsfw_flags)


def document_of(
    request: GenerationRequest, encoded_images: list[str], image_format: str, nsfw_flags: list[bool] | None
) -> dict:
    parameters = request.model_dump(exclude={"output_format", "quality", "stream", *IMAGE_FIELDS})
    document = {
        "images": encoded_images,
        "content_type": IMAGE_TYPES[image_format],
        "seeds": request.image_seeds,
        "parameters": parameters,
    }
    if nsfw_flags is not None:
        document["nsfw_content_detected"] = nsfw_flags
    return document


def encode_response(
    request: GenerationRequest, images: list[Image], nsfw_flags: list[bool] | None = None
) -> tuple[bytes | str, str]:
    """The body and its Content-Type.

    One image in png/jpeg/webp is sent as raw bytes; several are sent as the json document in that
    image format.
    """
    output_format = request.output_format
    if output_format == "numpy":
        return encode_numpy_json(images), JSON
    if output_format in IMAGE_TYPES and len(images) == 1:
        return encode_image(images[0], output_format, request.quality), IMAGE_TYPES[output_format]
    return compact_json(json_document(request, images, document_format(output_format), nsfw_flags)), JSON


def document_format(output_format: str) -> str:
    """The image format inside a json document: the one asked for, or png."""
    return output_format if output_format in IMAGE_TYPES else "png"


def progress_line(step: int, total: int, elapsed: float) -> str:
    return compact_json({"step": step, "total": total, "elapsed": round(elapsed, 3)}) + "\n"


def stream_result(
    request: GenerationRequest, images: list[Image], nsfw_flags: list[bool] | None = None
) -> tuple[str, str]:
    """The last line of a stream: the json document, its images in png unless jpeg or webp was asked for."""
    return compact_json(json_document(request, images, document_format(request.output_format), nsfw_flags)) + "\n", NDJSON


# What an encoded image can take, measured on uniform noise (the worst case) at quality 100:
# PNG 3.01, JPEG 1.98 and WebP 1.11 bytes per pixel. Headers and chunking fit in the constant.
ENCODED_BYTES_PER_PIXEL = 3.1
ENCODED_OVERHEAD_BYTES = 8192


def answer_size_bound(request: GenerationRequest) -> int:
    """The most bytes the answer to this request can take on the wire, known before any work.

    The format, the size and the image count bound it.
    """
    if request.output_format == "numpy":
        return numpy_size_bound(request.height, request.width, request.image_count)
    if request.output_format in IMAGE_TYPES and request.image_count == 1 and not request.stream:
        return encoded_image_bound(request)
    progress_bytes = STREAM_PROGRESS_BYTES * request.num_inference_steps if request.stream else 0
    return document_size_bound(request, compact_json) + progress_bytes


def encoded_image_bound(request: GenerationRequest) -> int:
    return math.ceil(request.height * request.width * ENCODED_BYTES_PER_PIXEL) + ENCODED_OVERHEAD_BYTES


def document_size_bound(request: GenerationRequest, serialise: Callable[[dict], str]) -> int:
    """The json document's size as serialise writes it.

    The document with empty image strings: base64 needs no JSON escaping, so each image adds exactly
    its base64 length to it, and no image-sized placeholder need be built. Flags at their longest.
    """
    count = request.image_count
    document = document_of(request, [""] * count, document_format(request.output_format), [False] * count)
    return len(serialise(document).encode()) + count * 4 * math.ceil(encoded_image_bound(request) / 3)


# A progress line, {"step":150,"total":150,"elapsed":12345.678}, with room to spare.
STREAM_PROGRESS_BYTES = 64


def numpy_size_bound(
    height: int, width: int, count: int, serialised_size: Callable[[list[Image]], int] | None = None
) -> int:
    """The numpy-list answer's size for count images, from its exact size at a few tiny sizes.

    The body is linear in height x width and in height (every value, pixel and row has a fixed
    cost once values are three digits wide, their worst case), so three tiny measurements of two
    white images give the per-image cost at any size. Two images nest one level deeper than one,
    so the per-image cost measured there also bounds a single image. serialised_size gives the size
    of the answer for some images as an engine wraps it (default: the body encode_response writes).
    """
    pixel, row, shell = _numpy_size_coefficients(serialised_size or _plain_numpy_size)
    return math.ceil(count * (pixel * height * width + row * height)) + shell + WRAPPER_NAMES_BYTES


# Room for what an engine's wrapper adds around the values: a request id, the model's name and version.
WRAPPER_NAMES_BYTES = 1024


def _plain_numpy_size(images: list[Image]) -> int:
    return len(encode_numpy_json(images))


@cache
def _numpy_size_coefficients(serialised_size: Callable[[list[Image]], int]) -> tuple[float, float, int]:
    def size(height: int, width: int) -> int:
        return serialised_size([PILImage.new("RGB", (width, height), (255, 255, 255))] * 2)

    one = size(1, 1)
    pixel = size(1, 2) - one  # per extra pixel, for two images
    row = size(2, 1) - one - pixel  # per extra row, for two images
    return pixel / 2, row / 2, one

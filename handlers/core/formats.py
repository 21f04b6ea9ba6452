"""Output formats: how generated images become a response body, and the most bytes each can take.

One entry per format. An image file format (PNG, JPEG, WebP, ...) is one ImageCodec line: its media
type, Pillow's writer and its worst case per pixel. The request schema, the Accept header's choices,
README's tables and query.py's flags all read their names from here.
"""

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL.Image import Image

JSON = "application/json"
NDJSON = "application/x-ndjson"


@dataclass(frozen=True)
class ImageCodec:
    """An image file format: its media type, Pillow's writer, and the most bytes one pixel can take.

    Measured on uniform noise (the worst case) at quality 100: PNG 3.01, JPEG 1.98 and WebP 1.11 bytes
    per pixel; every codec is bounded by the largest, with headers and chunking in HEADER_BYTES.
    """

    media_type: str
    pil_format: str
    worst_bytes_per_pixel: float
    takes_quality: bool

    def encode(self, image: Image, quality: int) -> bytes:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=self.pil_format, **({"quality": quality} if self.takes_quality else {}))
        return buffer.getvalue()

    def bound(self, height: int, width: int) -> int:
        return math.ceil(height * width * self.worst_bytes_per_pixel) + HEADER_BYTES


HEADER_BYTES = 8192
IMAGE_CODECS = {
    "png": ImageCodec("image/png", "PNG", 3.1, takes_quality=False),
    "jpeg": ImageCodec("image/jpeg", "JPEG", 3.1, takes_quality=True),
    "webp": ImageCodec("image/webp", "WEBP", 3.1, takes_quality=True),
}
# The image format inside a json document when the request asked for no image format.
DOCUMENT_CODEC = "png"

# Every output_format a request may ask for, with what it answers.
OUTPUT_FORMATS = {
    "numpy": "the pytorch/serve example's JSON nested list: HxWx3 for one image, NxHxWx3 for several",
    **{name: f"one image as raw {codec.media_type}; several as the json document" for name, codec in IMAGE_CODECS.items()},
    "json": "a document with base64 images, their seeds and the parameters that made them",
}
# Accept header values that choose an output format when the request names none.
FORMATS_BY_MEDIA_TYPE = {**{codec.media_type: name for name, codec in IMAGE_CODECS.items()}, JSON: "json"}

PADDED_VALUES = np.array([f"{value:>3}".encode() for value in range(256)], dtype="S3")


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

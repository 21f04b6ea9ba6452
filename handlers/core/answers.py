"""Answers: a generated request's response (or a refusal) as status, Content-Type, headers and body, and
the most bytes it can take, known before any work."""

import base64
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from PIL import Image as PILImage
from PIL.Image import Image

from handlers.core.errors import RequestError
from handlers.core.formats import DOCUMENT_CODEC, IMAGE_CODECS, JSON, NDJSON, encode_numpy_json
from handlers.core.images import IMAGE_FIELDS
from handlers.core.metrics import MetricEvent, answer_events, error_events
from handlers.core.schema import GenerationRequest


@dataclass
class Generation:
    """A request's generated images (image i seeded with image_seeds[i]), the seconds of the call that made
    them, and the safety checker's flag for each image where it ran (a flagged image is its black one)."""

    images: list[Image]
    seconds: float
    nsfw_flags: list[bool] | None = None


@dataclass
class Answer:
    """What goes back to one client: status, Content-Type, headers and body, and the metrics it makes."""

    status: int
    content_type: str
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    metrics: list[MetricEvent] = field(default_factory=list)

    @classmethod
    def refusal(cls, error: RequestError, model_name: str = "") -> "Answer":
        """A request refused or failed: its JSON error, with its status."""
        return cls(error.status, JSON, error.to_json(), metrics=error_events(error, model_name))

    @property
    def error(self) -> dict | None:
        return json.loads(self.body) if self.status != 200 else None


# encode(request, generation) -> (body, Content-Type): how an engine that wraps answers its own way encodes one.
Encoder = Callable[[GenerationRequest, Generation], tuple[Any, str]]


def generated_answer(request: GenerationRequest, generation: Generation, model_name: str, encode: Encoder | None = None) -> Answer:
    """The 200 answer to a generated request: its body, X-Seed, and the safety checker's flags."""
    if request.stream:
        body, content_type = stream_result(request, generation)
    else:
        body, content_type = (encode or encode_body)(request, generation)
    headers = {"X-Seed": str(request.seed)}
    if generation.nsfw_flags is not None:  # one flag per image, in order: the only word a raw image can carry
        headers["X-NSFW-Content-Detected"] = ",".join(str(flag).lower() for flag in generation.nsfw_flags)
    metrics = answer_events(request, len(generation.images), generation.seconds, model_name)
    return Answer(200, content_type, body, headers, metrics)


def content_type_of(request: GenerationRequest) -> str:
    """The Content-Type of a generated request's answer, known before any work (a step-batched answer's
    head goes out before its images exist)."""
    if request.stream:
        return NDJSON
    codec = IMAGE_CODECS.get(request.output_format)
    return codec.media_type if codec is not None and request.image_count == 1 else JSON


def encode_body(request: GenerationRequest, generation: Generation) -> tuple[bytes | str, str]:
    """The body and its Content-Type: one image in an image format as raw bytes; several as the json document."""
    content_type = content_type_of(request)
    if request.output_format == "numpy":
        return encode_numpy_json(generation.images), content_type
    if content_type != JSON:
        return IMAGE_CODECS[request.output_format].encode(generation.images[0], request.quality), content_type
    return compact_json(json_document(request, generation)), content_type


def json_document(request: GenerationRequest, generation: Generation) -> dict:
    """Base64 images with the seeds and parameters that made them, and the safety checker's flags where it ran."""
    codec = IMAGE_CODECS[document_format(request.output_format)]
    encoded = [base64.b64encode(codec.encode(image, request.quality)).decode() for image in generation.images]
    return document_of(request, encoded, generation.nsfw_flags)


def document_of(request: GenerationRequest, encoded_images: list[str], nsfw_flags: list[bool] | None) -> dict:
    parameters = request.model_dump(exclude={"output_format", "quality", "stream", *IMAGE_FIELDS})
    document = {
        "images": encoded_images,
        "content_type": IMAGE_CODECS[document_format(request.output_format)].media_type,
        "seeds": request.image_seeds,
        "parameters": parameters,
    }
    if nsfw_flags is not None:
        document["nsfw_content_detected"] = nsfw_flags
    return document


def document_format(output_format: str) -> str:
    """The image format inside a json document: the one asked for, or png."""
    return output_format if output_format in IMAGE_CODECS else DOCUMENT_CODEC


def compact_json(value: Any) -> str:
    """Serialised here because TorchServe would use indent=2, which triples the size of image lists."""
    return json.dumps(value, separators=(",", ":"))


def progress_line(step: int, total: int, elapsed: float) -> str:
    return compact_json({"step": step, "total": total, "elapsed": round(elapsed, 3)}) + "\n"


def stream_result(request: GenerationRequest, generation: Generation) -> tuple[str, str]:
    """The last line of a stream: the json document, its images in png unless jpeg or webp was asked for."""
    return compact_json(json_document(request, generation)) + "\n", NDJSON


def answer_size_bound(request: GenerationRequest) -> int:
    """The most bytes the answer to this request can take on the wire, known before any work: the
    format, the size and the image count bound it."""
    if request.output_format == "numpy":
        return numpy_size_bound(request.height, request.width, request.image_count)
    codec = IMAGE_CODECS.get(request.output_format)
    if codec is not None and request.image_count == 1 and not request.stream:
        return codec.bound(request.height, request.width)
    progress_bytes = STREAM_PROGRESS_BYTES * request.num_inference_steps if request.stream else 0
    return document_size_bound(request, compact_json) + progress_bytes


def document_size_bound(request: GenerationRequest, serialise: Callable[[dict], str]) -> int:
    """The json document's size as serialise writes it.

    The document with empty image strings: base64 needs no JSON escaping, so each image adds exactly
    its base64 length to it, and no image-sized placeholder need be built. Flags at their longest.
    """
    count = request.image_count
    document = document_of(request, [""] * count, [False] * count)
    image_bound = IMAGE_CODECS[document_format(request.output_format)].bound(request.height, request.width)
    return len(serialise(document).encode()) + count * 4 * math.ceil(image_bound / 3)


# A progress line, {"step":150,"total":150,"elapsed":12345.678}, with room to spare.
STREAM_PROGRESS_BYTES = 64
# Room for what an engine's wrapper adds around the values: a request id, the model's name and version.
WRAPPER_NAMES_BYTES = 1024


def numpy_size_bound(
    height: int, width: int, count: int, serialised_size: Callable[[list[Image]], int] | None = None
) -> int:
    """The numpy-list answer's size for count images, from its exact size at a few tiny sizes.

    The body is linear in height x width and in height (every value, pixel and row has a fixed
    cost once values are three digits wide, their worst case), so three tiny measurements of two
    white images give the per-image cost at any size. Two images nest one level deeper than one,
    so the per-image cost measured there also bounds a single image. serialised_size gives the size
    of the answer for some images as an engine wraps it (default: the body encode_body writes).
    """
    pixel, row, shell = _numpy_size_coefficients(serialised_size or _plain_numpy_size)
    return math.ceil(count * (pixel * height * width + row * height)) + shell + WRAPPER_NAMES_BYTES


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

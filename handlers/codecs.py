"""Encode generated images into response bodies."""

import base64
import io
import json
from typing import Any

import numpy as np
from PIL.Image import Image

from handlers.pipelines import GenerationResult
from handlers.request import GenerationRequest

JSON = "application/json"
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


def compact_json(value: Any) -> str:
    """TorchServe would serialise with indent=2: 25 MB instead of 8 MB for a 768x768 numpy list."""
    return json.dumps(value, separators=(",", ":"))


def json_document(request: GenerationRequest, result: GenerationResult, image_format: str) -> dict:
    """Base64 images with the seeds and parameters that made them."""
    parameters = request.model_dump(exclude={"output_format", "quality"})
    return {
        "images": [base64.b64encode(encode_image(image, image_format, request.quality)).decode() for image in result.images],
        "content_type": IMAGE_TYPES[image_format],
        "seeds": result.seeds,
        "parameters": parameters,
    }


def encode_response(request: GenerationRequest, result: GenerationResult, enveloped: bool = False) -> tuple[Any, str]:
    """The body and its Content-Type.

    One image in png/jpeg/webp is sent as raw bytes; several are sent as the json document in that
    image format. Inside a KServe envelope, TorchServe JSON-encodes the answer itself, so JSON
    values are returned rather than text or bytes.
    """
    output_format = request.output_format
    if output_format == "numpy":
        value = numpy_list(result.images)
        return (value if enveloped else compact_json(value)), JSON
    if output_format in IMAGE_TYPES and len(result.images) == 1 and not enveloped:
        return encode_image(result.images[0], output_format, request.quality), IMAGE_TYPES[output_format]
    document = json_document(request, result, "png" if output_format == "json" else output_format)
    return (document if enveloped else compact_json(document)), JSON

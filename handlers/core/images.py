"""Decode request images (base64 text or raw multipart bytes) behind format and size guards."""

import base64
import binascii
import io
import warnings

from PIL import Image

from handlers.core.errors import PayloadTooLarge, RequestError

IMAGE_FIELDS = ("image", "mask_image", "control_image")
# The formats README documents, by their file signatures. Anything else is refused before Pillow
# sees it, so none of Pillow's many other decoders ever parses client bytes.
SIGNATURES = {"PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8\xff",)}
HOW_TO_SEND_AN_IMAGE = "a PNG, JPEG or WebP file, as base64 text in JSON (a data: URL is fine) or as a multipart file part"


def decode_image(value: str | bytes, field: str, max_pixels: int) -> Image.Image:
    """A fully loaded RGB (or, for masks, greyscale) image.

    The header is read first, so an image whose dimensions exceed max_pixels is refused before its
    pixels are decompressed: a few kB of PNG can otherwise expand to gigabytes. Any failure of the
    decoder is the input's fault, whatever exception Pillow raises for it.
    """
    data = value if isinstance(value, (bytes, bytearray)) else _from_base64(value, field)
    image_format = sniff_format(bytes(data[:16]))
    if image_format is None:
        raise RequestError(
            f"{field} is not a PNG, JPEG or WebP file (its first bytes are {bytes(data[:8])!r})",
            field=field,
            allowed=HOW_TO_SEND_AN_IMAGE,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[image_format])
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"{field} is {width}x{height} = {width * height} pixels; at most {max_pixels} are allowed",
                    field=field,
                    allowed={"max_input_pixels": max_pixels},
                )
            image.load()
            return image.convert("L" if field == "mask_image" else "RGB")
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise PayloadTooLarge(
            f"{field} is too large to decode", field=field, allowed={"max_input_pixels": max_pixels}
        ) from None
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for bad bytes; all are the input's fault
        raise RequestError(
            f"{field} is not a readable {image_format} image ({type(error).__name__}: damaged or truncated data)",
            field=field,
            allowed=HOW_TO_SEND_AN_IMAGE,
        ) from None


def sniff_format(head: bytes) -> str | None:
    """PNG, JPEG or WEBP from a file's first bytes; None for anything else."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for name, prefixes in SIGNATURES.items() if head.startswith(prefixes)), None)


def _from_base64(text: str, field: str) -> bytes:
    if not isinstance(text, str):
        raise RequestError(f"{field} must be base64 text", field=field, allowed=HOW_TO_SEND_AN_IMAGE)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field} is not valid base64", field=field, allowed=HOW_TO_SEND_AN_IMAGE) from None

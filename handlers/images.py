"""Decode request images (base64 text or raw multipart bytes) behind size guards."""

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from handlers.errors import PayloadTooLarge, RequestError

IMAGE_FIELDS = ("image", "mask_image", "control_image")
HOW_TO_SEND_AN_IMAGE = "a PNG, JPEG or WebP file, as base64 text in JSON (a data: URL is fine) or as a multipart file part"


def decode_image(value: str | bytes, field: str, max_pixels: int) -> Image.Image:
    """A fully loaded RGB (or, for masks, greyscale) image.

    The header is read first, so an image whose dimensions exceed max_pixels is refused before its
    pixels are decompressed: a few kB of PNG can otherwise expand to gigabytes.
    """
    data = value if isinstance(value, (bytes, bytearray)) else _from_base64(value, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"{field} is {width}x{height} = {width * height} pixels; at most {max_pixels} are allowed",
                    field=field,
                    allowed={"max_input_pixels": max_pixels},
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise PayloadTooLarge(f"{field} is too large to decode: {error}", field=field) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise RequestError(
            f"{field} is not a readable image ({type(error).__name__}: {error})", field=field, allowed=HOW_TO_SEND_AN_IMAGE
        ) from None
    return image.convert("L" if field == "mask_image" else "RGB")


def _from_base64(text: str, field: str) -> bytes:
    if not isinstance(text, str):
        raise RequestError(f"{field} must be base64 text", field=field, allowed=HOW_TO_SEND_AN_IMAGE)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"{field} is not valid base64 ({error})", field=field, allowed=HOW_TO_SEND_AN_IMAGE) from None

"""Decode request images (base64 text or raw multipart bytes) behind format and size guards."""

import base64
import binascii
import io
import warnings

from PIL import Image

from handlers.core.errors import PayloadTooLarge, RequestError

IMAGE_FIELDS = ("image", "mask_image", "control_image")
# What decoding may cost beyond the pixels, each counted by a walk over the file's structure before any
# decoder runs. A progressive JPEG from common encoders has 10 scans (libjpeg's script; mozjpeg's up to
# about 20), and every scan makes the decoder walk every block of the image: a file of thousands of empty
# scans, 40 bytes each, costs seconds. PNG chunks and WebP chunks cost a little each; compressed PNG
# text decompresses up to 1 MB each (Pillow's own cap); an animated WebP is demuxed frame by frame.
MAX_JPEG_SCANS = 32
MAX_PNG_CHUNKS = 8192
MAX_PNG_COMPRESSED_CHUNKS = 8  # zTXt, iTXt, iCCP
MAX_WEBP_CHUNKS = 64
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
    data = bytes(value) if isinstance(value, (bytes, bytearray)) else _from_base64(value, field)
    image_format = sniff_format(data[:16])
    if image_format is None:
        raise RequestError(
            f"{field} is not a PNG, JPEG or WebP file (its first bytes are {data[:8]!r})",
            field=field,
            allowed=HOW_TO_SEND_AN_IMAGE,
        )
    check_structure(data, image_format, field)
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


def check_structure(data: bytes, image_format: str, field: str) -> None:
    """Refuse, before decoding, a file whose structure would cost more to decode than its pixels do."""
    refusal = {"JPEG": _jpeg_refusal, "PNG": _png_refusal, "WEBP": _webp_refusal}[image_format](data)
    if refusal:
        raise RequestError(f"{field}: {refusal}", field=field, allowed=HOW_TO_SEND_AN_IMAGE)


def _jpeg_refusal(data: bytes) -> str | None:
    """Counts the scans (SOS segments) by walking the markers; entropy-coded data is skipped to the next
    marker with bytes.find, so the walk costs a pass over the bytes."""
    position, scans = 2, 0
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill bytes before a marker
            position += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                return f"a JPEG of more than {MAX_JPEG_SCANS} scans (common encoders write at most about 20)"
            position = _next_jpeg_marker(data, position)
    return None


def _next_jpeg_marker(data: bytes, position: int) -> int:
    """The next marker after a scan's entropy-coded data: 0xFF not followed by a stuffed 0 or a restart."""
    while (position := data.find(b"\xff", position)) != -1 and position + 1 < len(data):
        following = data[position + 1]
        if following != 0 and not 0xD0 <= following <= 0xD7 and following != 0xFF:
            return position
        position += 1 if following == 0xFF else 2
    return len(data)


def _png_refusal(data: bytes) -> str | None:
    position, chunks, compressed = 8, 0, 0
    while position + 8 <= len(data):
        length, kind = int.from_bytes(data[position:position + 4], "big"), data[position + 4:position + 8]
        chunks += 1
        compressed += kind in (b"zTXt", b"iTXt", b"iCCP")
        if chunks > MAX_PNG_CHUNKS:
            return f"a PNG of more than {MAX_PNG_CHUNKS} chunks"
        if compressed > MAX_PNG_COMPRESSED_CHUNKS:
            return f"a PNG of more than {MAX_PNG_COMPRESSED_CHUNKS} compressed text or profile chunks"
        if kind == b"IEND":
            break
        position += 12 + length
    return None


def _webp_refusal(data: bytes) -> str | None:
    position, chunks = 12, 0
    while position + 8 <= len(data):
        kind, length = data[position:position + 4], int.from_bytes(data[position + 4:position + 8], "little")
        chunks += 1
        if kind in (b"ANIM", b"ANMF"):
            return "an animated WebP; send a still image"
        if chunks > MAX_WEBP_CHUNKS:
            return f"a WebP of more than {MAX_WEBP_CHUNKS} chunks"
        position += 8 + length + (length & 1)
    return None


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

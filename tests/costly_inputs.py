"""Bodies that are small but expensive to decode, parse or validate: what an attacker sends to make a
worker pay for a refusal. Shared by the unit tests of each guard and the fuzz test on a real server."""

import base64
import io
import json
import struct
import zlib

import numpy as np
from PIL import Image

from handlers.core.images import MAX_JPEG_SCANS, MAX_PNG_CHUNKS, MAX_PNG_COMPRESSED_CHUNKS, MAX_WEBP_CHUNKS


def picture(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8))


def encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan: its SOS segment and entropy-coded data, up to the next marker."""
    scans, position = [], data.find(b"\xff\xda")
    while position != -1:
        end = position + 2 + int.from_bytes(data[position + 2:position + 4], "big")
        while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
            end += 1
        scans.append((position, end))
        position = data.find(b"\xff\xda", end)
    return scans


def many_scan_jpeg(scans: int, size: int = 512) -> bytes:
    """A progressive JPEG whose last scan is repeated: each repeat makes libjpeg walk every block again."""
    data = encoded(picture(size), "JPEG", progressive=True, quality=90)
    start, end = jpeg_scans(data)[-1]
    written = len(jpeg_scans(data))
    return data[:end] + data[start:end] * (scans - written) + data[end:]


def png_chunk(kind: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with_chunks(chunks: list[bytes], size: int = 64) -> bytes:
    """A PNG with the chunks inserted after IHDR (8-byte signature, 25-byte IHDR chunk)."""
    data = encoded(picture(size), "PNG")
    return data[:33] + b"".join(chunks) + data[33:]


def many_chunk_png(count: int = MAX_PNG_CHUNKS + 1) -> bytes:
    return png_with_chunks([png_chunk(b"prVt")] * count)  # private ancillary chunks, 12 bytes each


def compressed_chunk_png(count: int = MAX_PNG_COMPRESSED_CHUNKS + 1) -> bytes:
    # Each decompresses to a megabyte of zeros (Pillow's own per-chunk cap) from about a kilobyte.
    text = png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"\x00" * 1_000_000, 9))
    return png_with_chunks([text] * count)


def animated_webp(frames: int = 200, size: int = 64) -> bytes:
    first, *rest = [picture(size).rotate(angle) for angle in range(frames)]
    return encoded(first, "WEBP", save_all=True, append_images=rest, lossless=False, quality=10)


def many_chunk_webp(count: int = MAX_WEBP_CHUNKS + 1) -> bytes:
    """A still WebP with unknown chunks appended (decoders skip them, one by one), its RIFF size fixed."""
    data = encoded(picture(), "WEBP") + b"XTRA\x00\x00\x00\x00" * count
    return data[:4] + struct.pack("<I", len(data) - 8) + data[8:]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def costly_bodies() -> dict[str, tuple[bytes, str, int]]:
    """name: (JSON body, the field its refusal names, its status). Each stays within the body limit."""
    image = lambda data: json.dumps({"prompt": "a cat", "image": b64(data)}).encode()  # noqa: E731
    return {
        f"progressive JPEG of {4 * MAX_JPEG_SCANS} scans": (image(many_scan_jpeg(4 * MAX_JPEG_SCANS)), "image", 400),
        "PNG of too many chunks": (image(many_chunk_png()), "image", 400),
        "PNG of too many compressed chunks": (image(compressed_chunk_png()), "image", 400),
        "animated WebP": (image(animated_webp()), "image", 400),
        "WebP of too many chunks": (image(many_chunk_webp()), "image", 400),
        "prompt of a million empty lists": (b'{"prompt": [' + b",".join([b"[]"] * 1_000_000) + b"]}", "prompt", 400),
        "lora of 100,000 bad weights": (json.dumps({"prompt": "a cat", "lora": {f"x{i}": "heavy" for i in range(100_000)}}).encode(), "lora", 400),
        "JSON nested 100,000 deep": (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body", 400),
        "seed of 5,000 digits": (b'{"prompt": "a cat", "seed": ' + b"9" * 5000 + b"}", "body", 400),
        "seed of 4,000 digits": (b'{"prompt": "a cat", "seed": ' + b"9" * 4000 + b"}", "seed", 400),
        "100,000 unknown fields": (json.dumps({f"f{i}": 1 for i in range(100_000)} | {"prompt": "a cat"}).encode(), "f0", 400),
    }

"""Serve diffusers pipelines: the core (handlers/core/), and one thin adapter per engine over it
(handlers/torchserve/, handlers/ray/)."""

import logging


# Notices from transformers that concern neither a user nor this code, printed once per process before
# every CLI's output and in every worker log: that without torchvision it falls back to Pillow (no
# pipeline served here preprocesses images with it), and, with diffusers 0.40 on transformers 5.6, that
# diffusers imports an image processor by its old `Fast` name. Installed before diffusers is imported.
LIBRARY_NOTICES = ("requires torchvision (not installed)", "The `Fast` suffix for image processors has been removed")


def _drops_library_notices(record: logging.LogRecord) -> bool:
    return not any(notice in record.getMessage() for notice in LIBRARY_NOTICES)


logging.getLogger("transformers.utils.import_utils").addFilter(_drops_library_notices)

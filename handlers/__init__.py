"""TorchServe handler for diffusers pipelines and the small modules it wires together."""

import logging


def _drops_torchvision_fallback_notice(record: logging.LogRecord) -> bool:
    return "requires torchvision (not installed)" not in record.getMessage()


# transformers tells every process, once per image-processor class, that without torchvision it
# falls back to Pillow. No pipeline served here preprocesses images with them, so the notice is
# only noise before every CLI's output and in every worker log. Installed before diffusers is imported.
logging.getLogger("transformers.utils.import_utils").addFilter(_drops_torchvision_fallback_notice)

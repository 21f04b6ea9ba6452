"""Encode generated images into response bodies."""

import json

import numpy as np
from PIL.Image import Image

NUMPY_JSON = "application/json"


def encode_numpy_json(image: Image) -> str:
    """The HxWx3 nested list that np.array(json.loads(body), dtype="uint8") restores.

    Compact separators keep a 768x768 image near 8 MB instead of TorchServe's indent=2 25 MB.
    """
    return json.dumps(np.asarray(image.convert("RGB")).tolist(), separators=(",", ":"))

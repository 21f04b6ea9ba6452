import json

import numpy as np
import pytest
from PIL import Image

from handlers.codecs import encode_numpy_json, numpy_json


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 3, 3), (7, 5, 3), (64, 48, 3), (3, 3, 1)])
def test_numpy_json_equals_compact_json_dumps(shape):
    array = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    array.flat[0], array.flat[-1] = 0, 255
    assert numpy_json(array) == json.dumps(array.tolist(), separators=(",", ":")).encode()


def test_several_images_are_a_list_of_images():
    arrays = [np.full((2, 2, 3), value, np.uint8) for value in (9, 10, 200)]
    body = encode_numpy_json([Image.fromarray(array) for array in arrays])
    assert json.loads(body) == [array.tolist() for array in arrays]
    assert np.array(json.loads(body), dtype="uint8").shape == (3, 2, 2, 3)

import json

import numpy as np
import pytest
from PIL import Image

from handlers.core.answers import Generation, answer_size_bound, encode_body
from handlers.core.formats import encode_numpy_json, numpy_json
from handlers.core.schema import GenerationRequest
from handlers.core.answers import Answer
from handlers.torchserve.kserve import KServeRow, v1_answer, v1_size_bound, v2_answer, v2_size_bound, value_of


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


def noise(height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(height * width).integers(0, 256, (height, width, 3), np.uint8))


@pytest.mark.parametrize("output_format", ["numpy", "png", "jpeg", "webp", "json"])
@pytest.mark.parametrize("height, width, count", [(64, 64, 1), (96, 64, 2), (64, 128, 3)])
def test_the_size_bound_holds_for_the_worst_case_answer(output_format, height, width, count):
    """Noise at quality 100 is what compresses worst; all-255 values are the numpy list's widest."""
    request = GenerationRequest(prompt=["a cat"] * count, height=height, width=width, output_format=output_format,
                                quality=100, seed=0)
    images = [Image.new("RGB", (width, height), (255, 255, 255)) if output_format == "numpy" else noise(height, width)
              for _ in range(count)]
    body, _ = encode_body(request, Generation(images, 0.0))
    bound = answer_size_bound(request)
    assert len(body) <= bound
    if output_format == "numpy":
        assert bound <= 1.05 * len(body) + 2048  # tight: a bound far above the answer would refuse legal requests


@pytest.mark.parametrize("output_format", ["numpy", "png", "json"])
@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_the_kserve_bounds_hold_for_the_worst_case_answer_with_what_it_echoes(protocol, output_format):
    """All-255 numpy lists and noise at quality 100, inside the answer as the handler writes it, with a long
    v2 id and input name echoed: the bound is never below the answer."""
    request = GenerationRequest(prompt=["a cat"] * 2, height=64, width=72, seed=0, output_format=output_format, quality=100)
    images = [Image.new("RGB", (72, 64), (255, 255, 255)) if output_format == "numpy" else noise(64, 72)] * 2
    value, _ = value_of(request, Generation(images, 0.0))
    answer = Answer(200, "application/json", value)
    if protocol == "v1":
        _, body = v1_answer([answer, answer])
        bound = v1_size_bound([request, request])
    else:
        row = KServeRow(request_id="i" * 256, input_name="n" * 256)
        _, body = v2_answer(row, answer, "stable_diffusion", "1.0")
        bound = v2_size_bound(row, request, "stable_diffusion", "1.0")
    assert len(body.encode()) <= bound
    if output_format == "numpy":  # tight where the answer's size is exact; compressed images carry header room
        assert bound <= 1.05 * len(body.encode()) + 10_000

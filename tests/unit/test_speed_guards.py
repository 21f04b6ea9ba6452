"""Every speed option keeps the picture: on the digits model, enabling it keeps the oracle's accuracy
above a floor. An option that breaks images fails here, not for a user. scripts/bench.py --speed
measures the same settings with 50 images each, with their time per image."""

import io

import pytest
from PIL import Image

from archiver.cli import main as archiver_main
from devtools.models.digits import DigitsOracle
from tests.unit.helpers import served_family

FLOOR = 0.8  # of 10 digits; the default settings draw all 10 (the oracle test: >= 90 % of 50)

# Handler options (the handler: section), each on its own worker.
OPTIONS = {
    "attention_slicing": {"attention_slicing": "auto"},
    "vae_slicing": {"vae_slicing": True},
    "vae_tiling": {"vae_tiling": True},
    "channels_last": {"channels_last": True},
    "fuse_qkv_projections": {"fuse_qkv_projections": True},
    "bfloat16": {"torch_dtype": "bfloat16"},
}
# Samplers at few steps, chosen per request.
SAMPLERS = {
    "dpmpp_2m, 4 steps": {"scheduler": "dpmpp_2m", "num_inference_steps": 4},
    "dpmpp_2m_karras, 5 steps": {"scheduler": "dpmpp_2m_karras", "num_inference_steps": 5},
    "unipc, 4 steps": {"scheduler": "unipc", "num_inference_steps": 4},
    "euler, 8 steps": {"scheduler": "euler", "num_inference_steps": 8},
}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    store = tmp_path_factory.mktemp("digits-speed")
    assert archiver_main(["build", "--source", "digits", "--model-name", "digits", "--export-path", str(store),
                          "--archive-format", "no-archive"]) == 0
    return store / "digits"


@pytest.fixture(scope="module")
def oracle():
    return DigitsOracle()


def accuracy(served, oracle, **fields) -> float:
    bodies = [{"prompt": f"digit {digit}", "seed": 200 + digit, "output_format": "png", **fields} for digit in range(10)]
    images = [Image.open(io.BytesIO(answer.body)) for answer in served.post(*bodies)]
    return sum(label == digit for digit, label in enumerate(oracle.labels(images))) / 10


@pytest.fixture(scope="module")
def default_digits(digits_dir):
    return served_family(digits_dir)


@pytest.mark.parametrize("fields", SAMPLERS.values(), ids=SAMPLERS.keys())
def test_a_sampler_at_few_steps_keeps_the_digits(default_digits, oracle, fields):
    assert accuracy(default_digits, oracle, **fields) >= FLOOR


@pytest.mark.parametrize("option", OPTIONS.values(), ids=OPTIONS.keys())
def test_a_speed_option_keeps_the_digits(digits_dir, oracle, option):
    assert accuracy(served_family(digits_dir, **option), oracle) >= FLOOR


@pytest.mark.parametrize("regions", [False, True], ids=["whole denoiser", "regions"])
def test_torch_compile_keeps_the_digits(digits_dir, oracle, regions):
    assert accuracy(served_family(digits_dir, torch_compile=True, compile_regions=regions), oracle) >= FLOOR


def test_the_floor_can_fail(default_digits, oracle):
    """What the guard catches: a setting too coarse to draw digits (1 step) falls below the floor."""
    assert accuracy(default_digits, oracle, num_inference_steps=1) < FLOOR

"""SDXL (with a refiner) and FLUX load through the same handler as SD, from archives our archiver built."""

import numpy as np
import pytest

from tests.unit.helpers import UNetBatchSizes, pixels, png_base64, served_family


@pytest.fixture(scope="module")
def sdxl(family_archives):
    return served_family(family_archives["sdxl"])


@pytest.fixture(scope="module")
def flux(family_archives):
    return served_family(family_archives["flux"])


def generate(served, **fields) -> np.ndarray:
    [answer] = served.post({"prompt": "a cat", "output_format": "png", "seed": 3, **fields})
    return pixels(answer)


def test_sdxl_loads_with_two_text_encoders_and_its_refiner(sdxl):
    assert type(sdxl.service.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert sdxl.service.pipeline.text_encoder_2 is not None
    assert type(sdxl.service.generator.refiner).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert sdxl.service.generator.refiner.text_encoder_2 is sdxl.service.pipeline.text_encoder_2  # shared, not a copy


def test_sdxl_refiner_finishes_txt2img_unless_the_request_turns_it_off(sdxl):
    with UNetBatchSizes(sdxl) as base_calls, UNetBatchSizes(sdxl, sdxl.service.generator.refiner.unet) as refiner_calls:
        refined = generate(sdxl)
    # 4 steps split at 0.8: the base runs the first 3, the refiner the last one.
    assert (len(base_calls), len(refiner_calls)) == (3, 1)
    with UNetBatchSizes(sdxl) as base_calls, UNetBatchSizes(sdxl, sdxl.service.generator.refiner.unet) as refiner_calls:
        unrefined = generate(sdxl, use_refiner=False)
    assert (len(base_calls), len(refiner_calls)) == (4, 0)
    assert not np.array_equal(refined, unrefined)


def test_sdxl_streams_steps_across_base_and_refiner(sdxl):
    progress = []
    sdxl.post({"prompt": "a cat", "stream": True}, stream_to=progress)
    assert [(line["step"], line["total"]) for line in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize(
    "fields",
    [{}, {"image": png_base64(), "strength": 0.5}, {"image": png_base64(), "mask_image": png_base64(mode="L", color=255)}],
)
def test_sdxl_tasks(sdxl, fields):
    assert generate(sdxl, **fields).shape == (64, 64, 3)


def test_flux_transformer_pipeline(flux):
    assert type(flux.service.pipeline).__name__ == "FluxPipeline"
    first, again = generate(flux), generate(flux)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, generate(flux, seed=4))


def test_flux_img2img(flux):
    assert generate(flux, image=png_base64(), strength=0.6).shape == (64, 64, 3)
    assert type(flux.service.generator.views.pipeline_for("img2img")).__name__ == "FluxImg2ImgPipeline"


def test_flux_refuses_samplers_it_was_not_trained_for(flux):
    [answer] = flux.post({"prompt": "a cat", "scheduler": "euler_a"})
    assert answer.status == 400
    assert "does not fit" in answer.body and "FlowMatchEulerDiscreteScheduler" in answer.body


def test_sdxl_combined_batching_never_lets_a_negative_prompt_change_a_neighbour(family_archives):
    """SDXL conditions a request without negative_prompt on zeros, not on the empty prompt's embedding."""
    served = served_family(family_archives["sdxl"], batching="combined", use_refiner=False)
    plain = {"prompt": "a cat", "output_format": "png", "seed": 3}
    [alone] = served.post(plain)
    with UNetBatchSizes(served) as sizes:
        _, beside = served.post({**plain, "seed": 4, "negative_prompt": "blurry"}, plain)
    assert np.array_equal(pixels(beside), pixels(alone))
    assert set(sizes) == {2}  # not combined: one image (x2 for guidance) per call
    assert generate(served, negative_prompt="blurry").tobytes() != pixels(alone).tobytes()

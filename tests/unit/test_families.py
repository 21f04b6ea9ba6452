"""SDXL (with a refiner) and FLUX load through the same handler as SD, from archives our archiver built."""

import numpy as np
import pytest

from tests.unit.helpers import (
    UNetBatchSizes,
    WorkerSocket,
    pixels,
    png_base64,
    progress_lines,
    run_json,
    served_family,
)


@pytest.fixture(scope="module")
def sdxl(family_archives):
    return served_family(family_archives["sdxl"])


@pytest.fixture(scope="module")
def flux(family_archives):
    return served_family(family_archives["flux"])


def generate(served, **fields) -> np.ndarray:
    handler, context = served
    [body] = run_json(handler, context, {"prompt": "a cat", "output_format": "png", "seed": 3, **fields})
    assert isinstance(body, bytes), body
    return pixels(body)


def test_sdxl_loads_with_two_text_encoders_and_its_refiner(sdxl):
    handler, _ = sdxl
    assert type(handler.service.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert handler.service.pipeline.text_encoder_2 is not None
    assert type(handler.service.generator.refiner).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert handler.service.generator.refiner.text_encoder_2 is handler.service.pipeline.text_encoder_2  # shared, not a copy


def test_sdxl_refiner_finishes_txt2img_unless_the_request_turns_it_off(sdxl):
    handler, _ = sdxl
    with UNetBatchSizes(handler) as base_calls, UNetBatchSizes(handler, handler.service.generator.refiner.unet) as refiner_calls:
        refined = generate(sdxl)
    # 4 steps split at 0.8: the base runs the first 3, the refiner the last one.
    assert (len(base_calls), len(refiner_calls)) == (3, 1)
    with UNetBatchSizes(handler) as base_calls, UNetBatchSizes(handler, handler.service.generator.refiner.unet) as refiner_calls:
        unrefined = generate(sdxl, use_refiner=False)
    assert (len(base_calls), len(refiner_calls)) == (4, 0)
    assert not np.array_equal(refined, unrefined)


def test_sdxl_streams_steps_across_base_and_refiner(sdxl):
    handler, context = sdxl
    worker_socket = WorkerSocket(context)
    try:
        run_json(handler, context, {"prompt": "a cat", "stream": True})
        progress = progress_lines(worker_socket.received())
    finally:
        worker_socket.close()
    assert [(line["step"], line["total"]) for line in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize(
    "fields",
    [{}, {"image": png_base64(), "strength": 0.5}, {"image": png_base64(), "mask_image": png_base64(mode="L", color=255)}],
)
def test_sdxl_tasks(sdxl, fields):
    assert generate(sdxl, **fields).shape == (64, 64, 3)


def test_flux_transformer_pipeline(flux):
    handler, _ = flux
    assert type(handler.service.pipeline).__name__ == "FluxPipeline"
    first, again = generate(flux), generate(flux)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, generate(flux, seed=4))


def test_flux_img2img(flux):
    handler, _ = flux
    assert generate(flux, image=png_base64(), strength=0.6).shape == (64, 64, 3)
    assert type(handler.service.generator.views.pipeline_for("img2img")).__name__ == "FluxImg2ImgPipeline"


def test_flux_refuses_samplers_it_was_not_trained_for(flux):
    handler, context = flux
    [body] = run_json(handler, context, {"prompt": "a cat", "scheduler": "euler_a"})
    assert context.get_response_status(0)[0] == 400
    assert "does not fit" in body and "FlowMatchEulerDiscreteScheduler" in body


def test_sdxl_combined_batching_never_lets_a_negative_prompt_change_a_neighbour(family_archives):
    """SDXL conditions a request without negative_prompt on zeros, not on the empty prompt's embedding."""
    handler, context = served = served_family(family_archives["sdxl"], batching="combined", use_refiner=False)
    plain = {"prompt": "a cat", "output_format": "png", "seed": 3}
    [alone] = run_json(handler, context, plain)
    with UNetBatchSizes(handler) as sizes:
        _, beside = run_json(handler, context, {**plain, "seed": 4, "negative_prompt": "blurry"}, plain)
    assert np.array_equal(pixels(beside), pixels(alone))
    assert set(sizes) == {2}  # not combined: one image (x2 for guidance) per call
    assert generate(served, negative_prompt="blurry").tobytes() != pixels(alone).tobytes()

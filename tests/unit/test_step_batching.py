"""The core's running set (handlers/core/stepping.py) on the tiny SD pipeline: each request stepped beside
others gets the image diffusers gives it alone, its errors stay its own, and out of memory splits a step."""

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.core.answers import Generation
from handlers.core.config import HandlerConfig
from handlers.core.errors import RequestError
from handlers.core.schema import GenerationRequest
from handlers.core.service import DiffusionService
from tests.unit.helpers import OutOfMemoryAbove, UNetBatchSizes

# The tolerance batching already has (docs/batching.md, docs/step-batching.md): kernels are not
# batch-invariant, so a shared call may move a pixel by a grey level or two.
GREY_LEVELS = 2
SMALL = {"height": 64, "width": 64}


@pytest.fixture(scope="module")
def service(tiny_pipeline_dir) -> DiffusionService:
    return DiffusionService(tiny_pipeline_dir, HandlerConfig(**SMALL, batching="step"))


def request(**fields) -> GenerationRequest:
    return GenerationRequest(**{**SMALL, "prompt": "a cat", "num_inference_steps": 6, **fields})


def alone(service: DiffusionService, generation_request: GenerationRequest) -> list[np.ndarray]:
    """The request through diffusers' own pipeline call, by itself."""
    [generation] = service.generate([generation_request])
    return [np.asarray(image).astype(int) for image in generation.images]


def images(result) -> list[np.ndarray]:
    assert isinstance(result, Generation), result
    return [np.asarray(image).astype(int) for image in result.images]


def run_all(running, arrivals: dict[int, list[tuple[str, GenerationRequest]]]) -> dict:
    """Step the set until it is empty, letting requests join before the iterations arrivals names."""
    results, iteration = {}, 0
    while len(running) or any(when >= iteration for when in arrivals):
        for key, joining in arrivals.get(iteration, []):
            result = running.join(key, joining)
            if result is not None:
                results[key] = result
        results |= running.iterate()
        iteration += 1
    return results


MIXED = {
    "guided": request(seed=1, num_inference_steps=8),
    "unguided, 2 images, dpm++": request(prompt="a dog", seed=2, num_inference_steps=4, guidance_scale=1.0,
                                          scheduler="dpmpp_2m", num_images_per_prompt=2),
    "negative prompt, euler a": request(prompt="a cow", seed=3, scheduler="euler_a", negative_prompt="blurry"),
    "another size, heun": request(prompt="a fox", seed=4, width=96, num_inference_steps=3, scheduler="heun"),
    "img2img": request(prompt="a red cat", seed=5, task="img2img", image=Image.new("RGB", (64, 64), (200, 30, 30)), strength=0.6),
}


def test_requests_joining_mid_run_get_their_solo_images(service):
    expected = {name: alone(service, generation_request) for name, generation_request in MIXED.items()}
    running = service.running_set(capacity=8)
    names = list(MIXED)
    # The first starts alone; the others join at its 2nd and 3rd steps.
    arrivals = {0: [(names[0], MIXED[names[0]])], 2: [(name, MIXED[name]) for name in names[1:3]],
                3: [(name, MIXED[name]) for name in names[3:]]}
    with UNetBatchSizes(None, service.pipeline.unet) as sizes:
        results = run_all(running, arrivals)
    differences = {name: max(int(np.abs(got - want).max()) for got, want in zip(images(results[name]), expected[name]))
                   for name in MIXED}
    print("grey levels from the solo images:", differences)
    assert all(difference <= GREY_LEVELS for difference in differences.values()), differences
    assert all(len(images(results[name])) == MIXED[name].image_count for name in MIXED)
    # They did share denoiser calls: more rows than any one request's.
    assert max(sizes) > 4


def test_short_requests_leave_first_and_each_step_reports_its_progress(service):
    progress = []
    running = service.running_set(4, on_step=lambda key, step, total, elapsed: progress.append((key, step, total)))
    assert running.join("long", request(num_inference_steps=10)) is None
    running.iterate()
    assert running.join("short", request(num_inference_steps=2, seed=9)) is None
    finished = [list(running.iterate()) for _ in range(9)]
    assert finished[1] == ["short"] and finished[8] == ["long"] and len(running) == 0
    assert [step for key, step, _ in progress if key == "short"] == [1, 2]
    assert [(step, total) for key, step, total in progress if key == "long"] == [(step, 10) for step in range(1, 11)]


def test_a_dropped_request_makes_no_more_steps(service):
    running = service.running_set(4)
    running.join("stays", request(num_inference_steps=3))
    running.join("goes", request(num_inference_steps=3))
    running.iterate()
    running.drop("goes")
    with UNetBatchSizes(None, service.pipeline.unet) as sizes:
        results = running.iterate() | running.iterate()
    assert list(results) == ["stays"] and sizes == [2, 2]  # one guided request: its two rows only


def test_a_failing_request_leaves_with_its_error_and_the_others_go_on(service):
    healthy = request(seed=21)
    expected = alone(service, healthy)
    running = service.running_set(4)
    running.join("healthy", healthy)
    running.join("broken", request(seed=22))
    running.iterate()
    running.runs["broken"].latents[0, 0, 0, 0] = float("nan")  # what a diverging sampler leaves
    results = run_all(running, {})
    assert isinstance(results["broken"], RequestError) and results["broken"].status == 500
    assert "no longer finite" not in results["broken"].message  # the details go to the log, not the client
    assert max(int(np.abs(got - want).max()) for got, want in zip(images(results["healthy"]), expected)) <= GREY_LEVELS


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError], ids=["cuda", "cpu"])
def test_out_of_memory_halves_the_step_and_fails_no_request(service, error):
    requests = {f"request {index}": request(seed=40 + index) for index in range(4)}
    expected = {key: alone(service, value) for key, value in requests.items()}
    running = service.running_set(4)
    for key, value in requests.items():
        running.join(key, value)
    # Four guided requests are a denoiser batch of 8 rows: refused, then stepped in halves of 4 rows.
    with OutOfMemoryAbove(service.pipeline.unet, limit=4, error=error):
        results = run_all(running, {})
    for key in requests:
        assert max(int(np.abs(got - want).max()) for got, want in zip(images(results[key]), expected[key])) <= GREY_LEVELS
    running.join("alone", request(seed=50))
    with OutOfMemoryAbove(service.pipeline.unet, limit=1, error=error):
        [refused] = run_all(running, {}).values()
    assert refused.status == 507


def test_requests_that_cannot_step_run_whole_at_once(service):
    """Inpainting blends its mask into every step: it runs through the pipeline's own call, as today."""
    inpaint = request(task="inpaint", image=Image.new("RGB", (64, 64), (200, 30, 30)), mask_image=Image.new("RGB", (64, 64), (255, 255, 255)), seed=3)
    running = service.running_set(4)
    assert not running.batcher.can_step(inpaint)
    result = running.join("inpaint", inpaint)
    assert np.array_equal(images(result)[0], alone(service, inpaint)[0])
    assert len(running) == 0

"""Prompts over real HTTP to a real TorchServe, decoded the way the pytorch/serve example's client does."""

import json
import time

import numpy as np
import pytest
import requests
from PIL import Image

from tests.integration.conftest import DEFAULTS, TINY


def decode_like_the_example_client(response: requests.Response) -> Image.Image:
    return Image.fromarray(np.array(json.loads(response.text), dtype="uint8"))


@pytest.mark.parametrize(
    "request_options",
    [
        pytest.param({"data": b"a photo of an astronaut"}, id="raw bytes"),
        pytest.param({"data": "a photo of an astronaut", "headers": {"Content-Type": "text/plain"}}, id="text/plain"),
        pytest.param({"json": {"prompt": "a photo of an astronaut"}}, id="json prompt"),
        pytest.param({"json": {"data": "A futuristic cityscape at sunset, digital art"}}, id="json data"),
        pytest.param({"data": {"prompt": "a photo of an astronaut"}}, id="form urlencoded"),
        pytest.param({"files": {"data": (None, "a photo of an astronaut")}}, id="multipart"),
    ],
)
def test_every_body_shape_returns_the_image(server, request_options):
    response = server.predict(TINY, **request_options)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert int(response.headers["X-Seed"]) >= 0
    image = decode_like_the_example_client(response)
    assert image.size == (64, 64)
    assert image.mode == "RGB"


def test_the_example_client_works_unchanged(server):
    # pytorch/serve examples/diffusers/query.py, plus the token header our secure default needs.
    prompt = "a photo of an astronaut riding a horse on mars"
    response = requests.post(
        f"{server.inference_url}/predictions/{TINY}", data=prompt, headers=server.auth("inference"), timeout=300
    )
    image = Image.fromarray(np.array(json.loads(response.text), dtype="uint8"))
    assert image.size == (64, 64)
    assert "\n" not in response.text[:1000]  # compact, not TorchServe's indent=2


def test_built_in_defaults_run_end_to_end_at_768(server):
    response = server.predict(DEFAULTS, data="a cat", headers={"Content-Type": "text/plain"})
    assert response.status_code == 200, response.text
    array = np.array(json.loads(response.text), dtype="uint8")
    assert array.shape == (768, 768, 3)
    assert len(response.content) < 10_000_000
    assert array.std() > 0  # a real picture, not a blank


def test_form_encoded_curl_without_a_field_gets_a_400_saying_how_to_send_a_prompt(server):
    # What `curl -d "a cat"` sends: TorchServe drops the form-encoded text.
    response = server.predict(TINY, data="a cat", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400
    body = response.json()
    assert body["field"] == "prompt"
    assert "Content-Type: text/plain" in body["error"]


def test_bad_input_gets_a_json_400_and_the_worker_keeps_serving(server):
    malformed = server.predict(TINY, data=b'{"prompt": "a cat"', headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400
    assert "not valid JSON" in malformed.json()["error"]
    out_of_range = server.predict(TINY, json={"prompt": "a cat", "num_inference_steps": 1000})
    assert out_of_range.status_code == 400
    assert out_of_range.json()["field"] == "num_inference_steps"
    assert out_of_range.json()["allowed"]["maximum"] == 150
    assert server.predict(TINY, data="a cat", headers={"Content-Type": "text/plain"}).status_code == 200


def test_same_seed_same_image(server):
    first = server.predict(TINY, json={"prompt": "a red apple", "seed": 1234})
    second = server.predict(TINY, json={"prompt": "a red apple", "seed": 1234})
    other = server.predict(TINY, json={"prompt": "a red apple", "seed": 4321})
    assert first.headers["X-Seed"] == "1234"
    assert first.text == second.text
    assert first.text != other.text


def test_requests_without_the_token_are_refused(server):
    url = f"{server.inference_url}/predictions/{TINY}"
    missing = requests.post(url, data="a cat", headers={"Content-Type": "text/plain"}, timeout=30)
    wrong = requests.post(url, data="a cat", headers={"Content-Type": "text/plain", "Authorization": "Bearer nope"}, timeout=30)
    for response in (missing, wrong):
        assert response.status_code == 400
        assert "key" in response.text.lower() and "token" in response.text.lower()
    assert requests.get(f"{server.management_url}/models/{TINY}", timeout=30).status_code == 400


def test_model_api_is_off_but_scaling_works(server):
    headers = server.auth("management")
    register = requests.post(f"{server.management_url}/models?url=other.mar", headers=headers, timeout=30)
    assert register.status_code == 405

    def scale(count: int) -> list[dict]:
        response = server.scale(TINY, count, timeout_s=300)
        assert response.status_code == 200, response.text
        return server.describe(TINY)["workers"]

    assert len(server.describe(TINY)["workers"]) == 1
    assert len(scale(2)) == 2
    assert server.predict(TINY, data="a cat", headers={"Content-Type": "text/plain"}).status_code == 200
    workers = scale(1)
    assert len(workers) == 1
    assert workers[0]["status"] == "READY"


def scrape(server, name: str, timeout_s: float = 10) -> dict[str, float]:
    """The samples of one metric family on the metrics port, by their label text; polled because workers
    report metrics through their log, which the frontend reads asynchronously."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
        samples = {
            line.split("{", 1)[1].rsplit("}", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{")
        }
        if samples or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def test_metrics_port_serves_the_handler_metrics_in_prometheus_format(server):
    response = server.predict(TINY, json={"prompt": ["a cat", "a dog"], "num_inference_steps": 3, "width": 96})
    assert response.status_code == 200, response.text
    assert server.predict(TINY, json={"prompt": "a cat", "num_inference_steps": 1000}).status_code == 400

    images = scrape(server, "diffusion_images_generated")
    txt2img = [value for labels, value in images.items() if f'ModelName="{TINY}"' in labels and 'Task="txt2img"' in labels]
    assert txt2img and txt2img[0] >= 2
    pixels = scrape(server, "diffusion_pixels_generated")
    assert any(value >= 2 * 96 * 64 for labels, value in pixels.items() if f'ModelName="{TINY}"' in labels)
    errors = scrape(server, "diffusion_errors")
    assert any('Kind="invalid_request"' in labels and value >= 1 for labels, value in errors.items())
    steps = scrape(server, "diffusion_denoising_steps")
    assert any(value >= 3 for value in steps.values())
    answered = scrape(server, "diffusion_requests")
    assert any(value >= 1 for value in answered.values())
    seconds = scrape(server, "diffusion_generation_seconds")
    assert any(value > 0 for value in seconds.values())
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text  # the metrics port needs no token
    for family, kind in [
        ("diffusion_images_generated", "counter"),
        ("diffusion_pixels_generated", "counter"),
        ("diffusion_errors", "counter"),
        ("diffusion_requests", "counter"),
        ("diffusion_denoising_steps", "counter"),
        ("diffusion_generation_seconds", "counter"),
    ]:
        assert f"# TYPE {family} {kind}" in text

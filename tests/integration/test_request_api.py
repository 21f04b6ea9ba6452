"""The request API through each engine, TorchServe and Ray Serve, with batchSize 4 and concurrent clients:
one suite, one client; only where an engine publishes the request schema differs."""

import base64
import io
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from devtools import REPO_ROOT
from devtools.harness.torchserve import TorchServe
from tests.integration.conftest import ENGINES, TINY, serving, worker_log


@pytest.fixture(scope="module", params=ENGINES)
def server(request, tmp_path_factory, model_store):
    archives = {TINY: f"{TINY}.mar"}
    with serving(request.param, tmp_path_factory.mktemp(request.param), model_store, archives) as server:
        yield server


def concurrently(server, bodies: list[dict]) -> list:
    """POST all bodies at once so the engine can batch them (maxBatchDelay 500 ms)."""
    barrier = threading.Barrier(len(bodies))

    def post(body):
        barrier.wait()
        return server.predict(TINY, json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def batch_sizes_logged(server) -> list[int]:
    log = worker_log(server)
    return [int(line.split("batch of ")[1].split()[0]) for line in log.splitlines() if "batch of " in line]


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_the_request_schema_is_published_with_the_models_defaults(server):
    """TorchServe: the describe answer of the management API; Ray Serve: OpenAPI beside the endpoint."""
    if isinstance(server, TorchServe):
        response = requests.get(f"{server.management_url}/models/{TINY}", params={"customized": "true"},
                                headers=server.auth("management"), timeout=60)
        assert response.status_code == 200, response.text
        schema = response.json()[0]["customizedMetadata"]["request"]  # TorchServe parses the JSON the handler gave
    else:
        response = server.get(f"/predictions/{TINY}/openapi.json")
        assert response.status_code == 200, response.text
        schema = response.json()["paths"]["/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        page = server.get(f"/predictions/{TINY}/docs")
        assert page.status_code == 200 and f"/predictions/{TINY}/openapi.json" in page.text
        # The model's own path answers as it is, with no redirect to a trailing slash for a client to follow.
        refused = server.predict(TINY, json={"prompt": "a cat", "num_inference_steps": 0}, allow_redirects=False)
        assert refused.status_code == 400, refused.status_code
    assert schema["properties"]["num_inference_steps"]["default"] == 4  # the archive's default, not the built-in 50
    assert schema["properties"]["num_inference_steps"]["maximum"] == 150
    assert schema["required"] == ["prompt"]
    assert schema["properties"]["seed"]["x-shared-in-batch"] is True


@pytest.mark.parametrize(
    "output_format, content_type, pil_format",
    [("png", "image/png", "PNG"), ("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")],
)
def test_image_formats(server, output_format, content_type, pil_format):
    response = server.predict(TINY, json={"prompt": "a cat", "output_format": output_format, "width": 96, "quality": 80})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == content_type
    image = open_image(response.content)
    assert (image.format, image.size) == (pil_format, (96, 64))


def test_accept_header_chooses_the_format(server):
    response = server.predict(TINY, data="a cat", headers={"Content-Type": "text/plain", "Accept": "image/png"})
    assert response.headers["Content-Type"] == "image/png"
    assert open_image(response.content).format == "PNG"


def test_json_format_and_every_field(server):
    body = {
        "prompt": ["a cat", "a dog"],
        "negative_prompt": "blurry",
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "height": 72,
        "width": 64,
        "seed": 123,
        "num_images_per_prompt": 2,
        "scheduler": "dpmpp_2m_karras",
        "output_format": "json",
        "quality": 90,
    }
    response = server.predict(TINY, json=body)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Seed"] == "123"
    document = response.json()
    assert document["seeds"] == [123, 124, 125, 126]
    assert {key: document["parameters"][key] for key in body if key not in ("output_format", "quality")} == {
        key: value for key, value in body.items() if key not in ("output_format", "quality")
    }
    images = [open_image(base64.b64decode(image)) for image in document["images"]]
    assert [(image.format, image.size) for image in images] == [("PNG", (64, 72))] * 4


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "ddpm"])
def test_every_scheduler(server, scheduler):
    response = server.predict(TINY, json={"prompt": "a cat", "scheduler": scheduler, "seed": 1, "output_format": "png"})
    assert response.status_code == 200, response.text
    assert open_image(response.content).size == (64, 64)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"instances": [{"data": "a photo of an astronaut riding a horse on mars"}]}, id="kserve v1"),
        pytest.param(
            {"id": "1", "inputs": [{"name": "prompt", "shape": -1, "datatype": "BYTES", "data": "a photo of an astronaut"}]},
            id="kserve v2",
        ),
    ],
)
def test_kserve_bodies_posted_directly(server, body):
    """Both engines read bodies through the core (handlers/core/bodies.py), KServe's included."""
    response = server.predict(TINY, json=body)
    assert response.status_code == 200, response.text
    assert np.array(json.loads(response.text), dtype="uint8").shape == (64, 64, 3)


def test_hugging_face_bodies(server):
    body = {"inputs": "a photo of an astronaut", "parameters": {"seed": 3}}
    response = server.predict(TINY, json=body)
    assert response.status_code == 200, response.text
    assert np.array(json.loads(response.text), dtype="uint8").shape == (64, 64, 3)


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "a cat", "height": 100}, 400, "height"),
        ({"prompt": "a cat", "scheduler": "nope"}, 400, "scheduler"),
        ({"prompt": "a cat", "output_format": "bmp"}, 400, "output_format"),
        ({"prompt": "a cat", "seed": -5}, 400, "seed"),
        ({"prompt": "a cat", "num_images_per_prompt": 100}, 400, "num_images_per_prompt"),
        ({"prompt": "a cat", "height": 2048, "width": 2048}, 413, "height"),
        ({"prompt": ["a"] * 9, "num_images_per_prompt": 2}, 413, "num_images_per_prompt"),
    ],
)
def test_errors_are_json_with_field_and_allowed(server, body, status, field):
    response = server.predict(TINY, json=body)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()
    assert error["field"] == field
    assert error["error"] and error["allowed"]


def test_same_seed_gives_identical_pixels_alone_and_in_every_batch_position(server):
    target = {"prompt": "a lighthouse at dusk", "seed": 2024, "output_format": "png"}
    alone = server.predict(TINY, json=target)
    assert alone.status_code == 200
    logged_before = len(batch_sizes_logged(server))
    for position in range(4):
        neighbours = [{"prompt": f"neighbour {position}-{index}", "seed": index, "output_format": "png"} for index in range(3)]
        bodies = neighbours[:position] + [target] + neighbours[position:]
        responses = concurrently(server, bodies)
        assert all(response.status_code == 200 for response in responses)
        assert responses[position].content == alone.content
        assert np.array_equal(np.asarray(open_image(responses[position].content)), np.asarray(open_image(alone.content)))
    assert max(batch_sizes_logged(server)[logged_before:]) > 1, "the concurrent requests were never batched"


def test_a_batch_mixing_parameters(server):
    bodies = [
        {"prompt": "a", "output_format": "png"},
        {"prompt": "b", "width": 128, "output_format": "jpeg"},
        {"prompt": "c", "num_inference_steps": 2, "scheduler": "euler", "output_format": "webp"},
        {"prompt": "d", "height": 96, "num_images_per_prompt": 2},
    ]
    png, jpeg, webp, listed = concurrently(server, bodies)
    assert open_image(png.content).size == (64, 64)
    assert (open_image(jpeg.content).format, open_image(jpeg.content).size) == ("JPEG", (128, 64))
    assert (open_image(webp.content).format, open_image(webp.content).size) == ("WEBP", (64, 64))
    assert np.array(json.loads(listed.text), dtype="uint8").shape == (2, 96, 64, 3)


def test_one_bad_member_of_a_batch_is_answered_alone(server):
    bodies = [{"prompt": "a", "seed": 1}, {"prompt": "b", "num_inference_steps": 0}, {"prompt": "c"}, {"prompt": "d"}]
    responses = concurrently(server, bodies)
    assert [response.status_code for response in responses] == [200, 400, 200, 200]
    assert responses[1].json()["field"] == "num_inference_steps"
    assert all(np.array(json.loads(responses[index].text)).shape == (64, 64, 3) for index in (0, 2, 3))


def test_query_script_exposes_every_parameter(server, tmp_path):
    command = server.client_command([
        sys.executable, "scripts/query.py", "a cat", "a dog",
        "--negative-prompt", "blurry", "--num-inference-steps", "3", "--guidance-scale", "6",
        "--height", "64", "--width", "80", "--seed", "11", "--num-images-per-prompt", "2",
        "--scheduler", "euler_a", "--output-format", "jpeg", "--quality", "70",
        "--out", str(tmp_path / "out.jpeg"),
        "--url", server.inference_url, "--model", TINY, "--key-file", str(server.workdir / "key_file.json"),
    ])
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    saved = sorted(tmp_path.glob("out-*.jpeg"))
    assert [path.name for path in saved] == ["out-1.jpeg", "out-2.jpeg", "out-3.jpeg", "out-4.jpeg"]
    assert all(open_image(path.read_bytes()).size == (80, 64) for path in saved)
    assert "seeds 11, 12, 13, 14" in result.stdout


def test_a_body_over_the_request_size_limit_is_refused_with_413(server):
    response = server.predict(TINY, data=b"x" * 7_000_000, headers={"Content-Type": "text/plain"})
    assert response.status_code == 413

"""img2img, inpaint, guards, ControlNet, LoRA and streaming through each engine, TorchServe and Ray Serve;
and an SDXL archive."""

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import requests
from PIL import Image

from devtools.harness.torchserve import REPO_ROOT
from tests.integration.conftest import ENGINES, b64, bomb, build_archive, png, serving

SD = "adapters_sd"  # tiny SD with a canny ControlNet and two LoRA adapters
SDXL = "tiny_sdxl"  # tiny SDXL with its refiner
SMALL = ["--height", "64", "--width", "64", "--num-inference-steps", "4", "--output-format", "png"]


@pytest.fixture(scope="module")
def task_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("task-store")
    build_archive(
        store, SD, "--source", "tiny", "--controlnet", "canny=tiny", "--lora", "style=tiny", "--lora", "ink=tiny",
        "--set", "max_input_pixels=1048576", *SMALL,
    )
    build_archive(store, SDXL, "--source", "tiny-sdxl", "--refiner", "tiny", *SMALL)
    return store


@pytest.fixture(scope="module", params=ENGINES)
def server(request, tmp_path_factory, task_store):
    archives = {SD: f"{SD}.mar", SDXL: f"{SDXL}.mar"}
    with serving(request.param, tmp_path_factory.mktemp(request.param), task_store, archives) as server:
        yield server


START = png(Image.new("RGB", (64, 64), (200, 30, 30)))
MASK = png(Image.new("L", (64, 64), 255))


def image_of(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)


def generate(server, model=SD, **fields) -> np.ndarray:
    return image_of(server.predict(model, json={"prompt": "a red square", "seed": 9, **fields}))


@pytest.mark.parametrize(
    "fields",
    [
        {"task": "txt2img"},
        {"task": "img2img", "image": b64(START), "strength": 0.6},
        {"task": "inpaint", "image": b64(START), "mask_image": b64(MASK)},
    ],
    ids=["txt2img", "img2img", "inpaint"],
)
def test_each_task(server, fields):
    assert generate(server, **fields).shape == (64, 64, 3)


def test_img2img_from_multipart_parts(server):
    files = {"image": ("start.png", START, "image/png")}
    data = {"prompt": "a red square", "seed": "9", "strength": "0.6"}
    multipart = image_of(server.predict(SD, files=files, data=data))
    assert np.array_equal(multipart, generate(server, image=b64(START), strength=0.6))


def test_inpaint_from_multipart_parts(server):
    files = {"image": ("start.png", START, "image/png"), "mask_image": ("mask.png", MASK, "image/png")}
    response = server.predict(SD, files=files, data={"prompt": "a red square", "task": "inpaint", "seed": "9"})
    assert image_of(response).shape == (64, 64, 3)


@pytest.mark.parametrize(
    "fields, status, message",
    [
        ({"image": b64(bomb())}, 413, "pixels"),
        ({"image": b64(png(Image.new("RGB", (1100, 1000))))}, 413, "max_input_pixels"),
        ({"image": b64(START), "mask_image": b64(png(Image.new("L", (32, 64))))}, 400, "must be the same size"),
        ({"image": b64(b"GIF89a but not really")}, 400, "not a PNG, JPEG or WebP file"),
        ({"image": "%%% not base64 %%%"}, 400, "not valid base64"),
        ({"image": b64(START), "strength": 2}, 400, "strength"),
    ],
    ids=["decompression-bomb", "over-the-configured-cap", "mismatched-mask", "not-an-image", "bad-base64", "strength"],
)
def test_each_guard_answers_4xx_and_the_worker_keeps_serving(server, fields, status, message):
    response = server.predict(SD, json={"prompt": "a red square", **fields})
    assert response.status_code == status, response.text
    assert message in response.json()["error"] or message in json.dumps(response.json())
    assert generate(server).shape == (64, 64, 3)


def test_controlnet_switching(server):
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[:, 28:36] = 255
    control = b64(png(Image.fromarray(edges)))
    plain = generate(server)
    steered = generate(server, controlnet="canny", control_image=control)
    assert not np.array_equal(plain, steered)
    assert np.array_equal(generate(server), plain)  # the ControlNet does not stick to later requests
    unknown = server.predict(SD, json={"prompt": "a", "controlnet": "depth", "control_image": control})
    assert unknown.status_code == 400 and unknown.json()["allowed"] == ["canny"]


def test_lora_switching(server):
    plain = generate(server)
    style, ink = generate(server, lora="style"), generate(server, lora="ink")
    assert len({image.tobytes() for image in (plain, style, ink)}) == 3
    assert np.array_equal(generate(server, lora="style", lora_weight=0), plain)
    assert np.array_equal(generate(server), plain)
    assert np.array_equal(generate(server, lora="style"), style)
    unknown = server.predict(SD, json={"prompt": "a", "lora": "nope"})
    assert unknown.status_code == 400 and sorted(unknown.json()["allowed"]) == ["ink", "style"]


def test_the_sdxl_archive(server):
    refined = generate(server, SDXL)
    assert refined.shape == (64, 64, 3)
    assert not np.array_equal(refined, generate(server, SDXL, use_refiner=False))
    assert generate(server, SDXL, image=b64(START), strength=0.5).shape == (64, 64, 3)


def test_streaming_sends_progress_lines_then_the_image(server):
    response = server.predict(SD, json={"prompt": "a red square", "seed": 9, "stream": True}, stream=True)
    assert response.status_code == 200
    lines = [json.loads(line) for line in response.iter_lines() if line]
    progress, final = lines[:-1], lines[-1]
    assert [(line["step"], line["total"]) for line in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(final["images"][0]))).convert("RGB")).astype(int)
    assert final["seeds"] == [9] and np.array_equal(image, generate(server))


def test_query_script_sends_images_and_adapters(server, tmp_path):
    start, control = tmp_path / "start.png", tmp_path / "edges.png"
    start.write_bytes(START)
    control.write_bytes(png(Image.new("RGB", (64, 64), (255, 255, 255))))
    command = server.client_command([
        sys.executable, "scripts/query.py", "a red square", "--image", str(start), "--strength", "0.6",
        "--controlnet", "canny", "--control-image", str(control), "--lora", "style", "--lora-weight", "0.5",
        "--seed", "9", "--out", str(tmp_path / "out.png"),
        "--url", server.inference_url, "--model", SD, "--key-file", str(server.workdir / "key_file.json"),
    ])
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    saved = np.asarray(Image.open(tmp_path / "out.png").convert("RGB")).astype(int)
    expected = generate(
        server, image=b64(START), strength=0.6, controlnet="canny", control_image=b64(control.read_bytes()),
        lora="style", lora_weight=0.5,
    )
    assert np.array_equal(saved, expected)

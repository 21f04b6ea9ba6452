"""Step-level batching through real servers (a TorchServe with continuous batching, and Ray Serve), on
archives of the tiny and digits models built with `--batching step`: requests join the running set at the
next step and leave after their last, each with the image it gets alone, its errors its own, and the worker
alive through all of it."""

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from archiver.sources import DIGITS_DIR
from devtools.models.digits import DigitsOracle
from handlers.core.config import HandlerConfig
from handlers.core.schema import GenerationRequest
from handlers.core.service import DiffusionService
from tests.integration.conftest import ENGINES, build_archive, serving, worker_log

STEP = "step_sd"
# The tolerance batching already has (docs/batching.md): a shared call may move a pixel by a grey level or two.
GREY_LEVELS = 2
LONG = {"prompt": "a long one", "num_inference_steps": 150, "seed": 5}
REPLICA_PIDS = """
from ray.util.state import list_actors
result = sorted(actor.pid for actor in list_actors(filters=[("state", "=", "ALIVE")])
                if actor.class_name == "ServeReplica:%s:%s")
"""


@pytest.fixture(scope="module")
def step_store(tmp_path_factory, tiny_pipeline_dir):
    store = tmp_path_factory.mktemp("step-store")
    build_archive(store, STEP, "--source", str(tiny_pipeline_dir), "--height", "64", "--width", "64",
                  "--num-inference-steps", "4", "--batch-size", "4", "--batching", "step")
    return store


@pytest.fixture(scope="module", params=ENGINES)
def step_server(request, tmp_path_factory, step_store):
    with serving(request.param, tmp_path_factory.mktemp(request.param), step_store, {STEP: f"{STEP}.mar"}) as server:
        yield server


@pytest.fixture(scope="module")
def alone(tiny_pipeline_dir):
    """The same pipeline, each request run through diffusers' own call by itself."""
    service = DiffusionService(tiny_pipeline_dir, HandlerConfig(height=64, width=64, batching="per_request"))

    def image(body: dict) -> np.ndarray:
        [generation] = service.generate([GenerationRequest(**{"height": 64, "width": 64, **body})])
        return np.asarray(generation.images[0]).astype(int)

    return image


def model_pids(server) -> list[int]:
    if hasattr(server, "workers"):
        return sorted(worker.pid for worker in server.workers())
    return server.state(REPLICA_PIDS % (STEP, STEP))


class Running:
    """A long streaming request, in the running set once its first progress line arrives."""

    def __init__(self, server, body: dict = LONG):
        self.response = server.predict(STEP, json={**body, "stream": True}, stream=True)
        assert self.response.status_code == 200, self.response.text
        self.lines = self.response.iter_lines()
        self.first = json.loads(next(line for line in self.lines if line))
        self.finished_at: float | None = None

    def rest(self) -> list[dict]:
        """Every line of the stream, the first one included."""
        lines = [self.first, *(json.loads(line) for line in self.lines if line)]
        self.finished_at = time.monotonic()
        return lines


def pixels(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)


def test_a_request_joining_mid_run_gets_its_solo_image_and_leaves_first(step_server, alone):
    pids = model_pids(step_server)
    running = Running(step_server)
    joining = {"prompt": "a short one", "num_inference_steps": 6, "seed": 11, "guidance_scale": 3.0}
    start = time.monotonic()
    short = step_server.predict(STEP, json={**joining, "output_format": "png"})
    short_done = time.monotonic()
    lines = running.rest()
    assert lines[-1]["images"] and lines[-2] == {**lines[-2], "step": 150, "total": 150}
    # It joined a run at its step 1 or later, and left while the long one still ran.
    assert running.first["step"] >= 1 and short_done < running.finished_at
    difference = np.abs(pixels(short) - alone(joining)).max()
    print(f"joined mid-run: {difference} grey levels from its solo image; {short_done - start:.2f} s")
    assert difference <= GREY_LEVELS
    assert short.headers["X-Seed"] == "11"
    assert model_pids(step_server) == pids


def test_short_requests_leave_before_long_ones(step_server):
    # 128x128 for all: the long one takes seconds even on a fast CPU, and the short ones share its calls.
    size = {"height": 128, "width": 128}
    running = Running(step_server, {**LONG, **size})
    finished = {}

    def post(name: str):
        response = step_server.predict(STEP, json={"prompt": name, "num_inference_steps": 4, "output_format": "png",
                                                   **size})
        assert response.status_code == 200, response.text
        finished[name] = time.monotonic()

    shorts = [threading.Thread(target=post, args=(f"short {index}",)) for index in range(3)]
    for thread in shorts:
        thread.start()
    for thread in shorts:
        thread.join()
    lines = running.rest()
    assert lines[-1]["images"]
    assert all(finished[f"short {index}"] < running.finished_at for index in range(3)), (finished, running.finished_at)


def test_a_failing_request_leaves_alone(step_server):
    pids = model_pids(step_server)
    running = Running(step_server)
    # A step run fails this request at its start (its image is no image), the others go on.
    failing = step_server.predict(STEP, json={"prompt": "x", "task": "img2img", "image": "bm90IGFuIGltYWdl",
                                              "num_inference_steps": 4})
    healthy = step_server.predict(STEP, json={"prompt": "y", "num_inference_steps": 4, "output_format": "png"})
    assert failing.status_code == 400 and json.loads(failing.content)["field"] == "image"
    assert healthy.status_code == 200 and healthy.headers["Content-Type"] == "image/png"
    lines = running.rest()
    assert lines[-1]["images"] and len(lines) == LONG["num_inference_steps"] + 1
    assert model_pids(step_server) == pids


def test_a_departed_client_is_dropped_at_the_next_step(step_server):
    pids = model_pids(step_server)
    running = Running(step_server, {**LONG, "prompt": "nobody waits for this", "num_inference_steps": 150})
    running.response.close()
    time.sleep(0.5)  # TorchServe's frontend removes the job once it sees the connection closed
    # The next step (this request's first, on TorchServe the next call of the worker) leaves it out.
    response = step_server.predict(STEP, json={"prompt": "next", "num_inference_steps": 2, "output_format": "png"})
    assert response.status_code == 200
    log = worker_log(step_server)
    assert "went away; dropped from the running set" in log
    assert model_pids(step_server) == pids


@pytest.fixture(scope="module")
def digits_server(tmp_path_factory):
    store = tmp_path_factory.mktemp("digits-step")
    build_archive(store, "digits_step", "--source", "digits", "--batch-size", "4", "--batching", "step")
    with serving("torchserve", tmp_path_factory.mktemp("digits-torchserve"), store, {"digits_step": "digits_step.mar"}) as server:
        yield server


def test_mixed_digits_requests_stepped_together_draw_their_digits_as_they_would_alone(digits_server):
    """Ten requests at once, 4-step dpm++ beside 25 and 50 steps and guidance from 2 to 7: the oracle reads
    their digits, and each image is its solo image within the tolerance."""
    mix = [{"num_inference_steps": 4, "scheduler": "dpmpp_2m"}, {"num_inference_steps": 25}, {"num_inference_steps": 50}]
    bodies = [{"prompt": f"digit {digit}", "seed": 100 + digit, "guidance_scale": 2 + digit / 2, **mix[digit % 3]}
              for digit in range(10)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        served = list(pool.map(lambda body: digits_server.predict("digits_step", json={**body, "output_format": "png"}),
                               bodies))
    images = [pixels(response) for response in served]
    labels = DigitsOracle().labels([Image.fromarray(image.astype("uint8")) for image in images])
    assert sum(label == digit for digit, label in enumerate(labels)) >= 9, labels
    service = DiffusionService(DIGITS_DIR, HandlerConfig(height=64, width=64, batching="per_request", warm_up=False))
    differences = []
    for body, image in zip(bodies, images):
        [alone] = service.generate([GenerationRequest(height=64, width=64, **body)])
        differences.append(int(np.abs(image - np.asarray(alone.images[0]).astype(int)).max()))
    print("grey levels from the solo images:", differences)
    assert max(differences) <= GREY_LEVELS


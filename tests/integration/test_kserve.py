"""KServe's v1 and v2 protocols, read and answered by the handler, against TorchServe started from
kserve/config.properties, which the KServe wrapper fronts in an InferenceService: the wrapper forwards each
KServe request body to /predictions/<model>, as these tests do."""

import base64
import io
import threading
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from devtools import REPO_ROOT
from devtools.archives import model_dir
from devtools.harness.torchserve import TorchServe, worker_hwm
from handlers.core.weights import ROOT_VARIABLE
from tests.integration.conftest import build_archive, read_properties

KSERVE_CONFIG = REPO_ROOT / "kserve" / "config.properties"
MODEL = "stable_diffusion"  # the name kserve/config.properties' model_snapshot registers


def kserve_storage(tmp_path_factory, protocol: str) -> Path:
    """The storage an InferenceService's storageUri holds, laid out as kserve/README.md says: an archive built
    with the protocol the handler reads and answers, referencing weights that were then uploaded beside it."""
    storage = tmp_path_factory.mktemp(f"kserve-{protocol}") / "mnt-models"
    build_machine = Path(shutil.copytree(model_dir("tiny"), storage.parent / "build-machine" / "tiny"))
    (storage / "model-store").mkdir(parents=True)
    build_archive(
        storage / "model-store", MODEL, "--source", str(build_machine), "--weights", "reference", "--height", "64",
        "--width", "64", "--num-inference-steps", "2", "--batch-size", "4", "--max-batch-delay", "200",
        "--server-config", str(KSERVE_CONFIG), "--set", f"kserve_protocol={protocol}",
    )
    build_machine.rename(storage / "weights")  # the upload: the build machine's folder is gone
    return storage


def kserve_server(tmp_path_factory, protocol: str) -> TorchServe:
    storage = kserve_storage(tmp_path_factory, protocol)
    return TorchServe(
        tmp_path_factory.mktemp(f"torchserve-{protocol}"),
        storage / "model-store",
        {MODEL: f"{MODEL}.mar"},
        token_auth=False,  # as shipped: only the wrapper, on loopback in the pod, calls TorchServe
        env={ROOT_VARIABLE: str(storage / "weights")},  # as the InferenceService sets it, at /mnt/models/weights
        base_config=KSERVE_CONFIG,
    )


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    with kserve_server(tmp_path_factory, "v1") as torchserve:
        yield torchserve


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    with kserve_server(tmp_path_factory, "v2") as torchserve:
        yield torchserve


def post(server, body: dict) -> requests.Response:
    return requests.post(f"{server.inference_url}/predictions/{MODEL}", json=body, timeout=300)


def png_of(document: dict) -> Image.Image:
    assert document["content_type"] == "image/png"
    [encoded] = document["images"]
    return Image.open(io.BytesIO(base64.b64decode(encoded)))


def test_the_worker_loads_the_weights_uploaded_beside_the_archive(v2):
    log = v2.log_since(0)
    assert f"weights referenced in {v2.model_store.parent / 'weights'} (from {ROOT_VARIABLE})" in log
    assert not list(v2.model_store.rglob("*.safetensors"))


def test_the_shipped_config_keeps_the_secure_settings():
    settings = read_properties(KSERVE_CONFIG)
    assert settings["inference_address"].startswith("http://127.0.0.1:")
    assert settings["management_address"].startswith("http://127.0.0.1:")
    assert settings["grpc_inference_address"] == settings["grpc_management_address"] == "127.0.0.1"
    assert (settings["enable_envvars_config"], settings["enable_model_api"], settings["install_py_dep_per_model"]) == (
        "false", "false", "false"
    )
    assert "service_envelope" not in settings  # the handler reads KServe's bodies; TorchServe's envelope never does


def test_v1_instances_each_get_their_prediction_and_a_bad_one_fails_alone(v1):
    response = post(v1, {"instances": [
        {"data": "a photo of an astronaut"},
        {"prompt": "a red square", "seed": 3, "output_format": "png"},
        {"prompt": "a cat", "num_inference_steps": 1000},
    ]})
    assert response.status_code == 200, response.text
    numpy_list, document, error = response.json()["predictions"]
    assert np.array(numpy_list, dtype="uint8").shape == (64, 64, 3)
    assert document["seeds"] == [3] and png_of(document).size == (64, 64)
    assert error["field"] == "num_inference_steps" and error["allowed"]["maximum"] == 150


def test_v1_all_bad_instances_answer_400(v1):
    response = post(v1, {"instances": [{"prompt": ""}]})
    assert response.status_code == 400
    assert response.json()["predictions"][0]["field"] == "prompt"
    wrong_protocol = post(v1, {"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a cat"]}]})
    assert wrong_protocol.status_code == 400
    assert "instances" in wrong_protocol.json()["predictions"][0]["error"]


def test_v1_concurrent_requests_are_not_mixed_up(v1):
    seeds = [11, 12, 13, 14]
    barrier = threading.Barrier(len(seeds))

    def one(seed: int) -> list[int]:
        barrier.wait()
        response = post(v1, {"instances": [{"prompt": "a cat", "seed": seed, "output_format": "json"}]})
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]["seeds"]

    with ThreadPoolExecutor(len(seeds)) as pool:
        assert list(pool.map(one, seeds)) == [[seed] for seed in seeds]


def test_v2_named_inputs_become_one_generation(v2):
    response = post(v2, {"id": "request-1", "inputs": [
        {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a red square"]},
        {"name": "seed", "shape": [1], "datatype": "INT64", "data": [7]},
        {"name": "output_format", "shape": [1], "datatype": "BYTES", "data": ["png"]},
    ]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["id"], body["model_name"]) == ("request-1", MODEL)
    [output] = body["outputs"]
    [document] = output["data"]
    assert document["seeds"] == [7] and png_of(document).size == (64, 64)


def test_v2_bad_input_answers_400_and_the_next_request_succeeds(v2):
    response = post(v2, {"id": "bad", "inputs": [
        {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a cat"]},
        {"name": "num_inference_steps", "shape": [1], "datatype": "INT64", "data": [1000]},
    ]})
    assert response.status_code == 400
    [output] = response.json()["outputs"]
    assert output["data"][0]["field"] == "num_inference_steps"
    plain = post(v2, {"id": "ok", "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a cat"]}]})
    assert plain.status_code == 200
    [output] = plain.json()["outputs"]
    # TorchServe's kservev2 envelope flattens every output, so the numpy list arrives as H*W*3 values.
    assert output["shape"] == [64 * 64 * 3]
    assert np.array(output["data"], dtype="uint8").reshape(64, 64, 3).std() > 0


def test_v1_instances_are_capped_per_http_request(v1):
    body = {"instances": ["a cat"] * 3200}  # about 30 kB asking for 3,200 images
    started = time.monotonic()
    response = post(v1, body)
    assert response.status_code == 413 and time.monotonic() - started < 10
    [error] = response.json()["predictions"]
    assert error["field"] == "instances" and "3200 instances" in error["error"]
    assert post(v1, {"instances": ["a cat"]}).status_code == 200


def test_what_the_config_leaves_open_in_the_pod_cannot_load_models_or_leak_requests(v2):
    """kserve/config.properties' own reasons: tokenless management cannot register or unregister,
    and the metrics port shows no request content."""
    register = requests.post(f"{v2.management_url}/models", params={"url": "anything.mar"}, timeout=30)
    unregister = requests.delete(f"{v2.management_url}/models/{MODEL}", timeout=30)
    assert (register.status_code, unregister.status_code) == (405, 405)
    secret = "zebra-secret-prompt-4711"
    assert post(v2, {"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": [secret]}]}).status_code == 200
    metrics = requests.get(f"{v2.metrics_url}/metrics", timeout=30)
    assert metrics.status_code == 200 and "diffusion_images_generated" in metrics.text and secret not in metrics.text


def worker_pid(server) -> int:
    [worker] = server.describe(MODEL)["workers"]
    return worker["pid"]


def test_a_v2_input_of_a_huge_empty_shape_is_refused_at_once_beside_a_good_request(v2):
    """79 bytes that grew TorchServe's own kservev2 envelope to 24 GB (it reshapes data to the shape given)."""
    pid, rss_before = worker_pid(v2), worker_hwm(worker_pid(v2))
    hostile = {"inputs": [{"name": "prompt", "shape": [20000000, 0], "datatype": "INT64", "data": []}]}
    good = {"id": "good", "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a cat"]}]}
    with ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        refused, answered = pool.map(lambda body: post(v2, body), [hostile, good])
        elapsed = time.monotonic() - started
    assert refused.status_code == 400 and answered.status_code == 200, (refused.text, answered.text[:200])
    assert elapsed < 10 and worker_pid(v2) == pid
    assert worker_hwm(pid) - rss_before < 100 * 2**20


@pytest.mark.parametrize("bad_input", [
    {"name": 5, "shape": [1], "datatype": "BYTES", "data": ["a cat"]},
    {"name": "prompt", "shape": [1], "data": ["a cat"]},
    {"name": "prompt", "shape": [1], "datatype": "BYTES"},
])
def test_a_malformed_v2_input_is_a_400_not_a_500(v2, bad_input):
    response = post(v2, {"id": "bad", "inputs": [bad_input]})
    assert response.status_code == 400, response.text
    assert response.json()["outputs"][0]["data"][0]["field"] == "inputs"


def test_v1_instances_are_capped_in_work_together(v1):
    """16 instances at 1024x1024 and 150 steps: each within max_work alone, six times it together."""
    instance = {"prompt": "a cat", "height": 1024, "width": 1024, "num_inference_steps": 150}
    response = post(v1, {"instances": [instance] * 16})
    assert response.status_code == 413
    [error] = response.json()["predictions"]
    assert "max_work" in error["allowed"]

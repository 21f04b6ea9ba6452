"""Secure defaults of config.properties, checked against a real TorchServe: tokens, health checks,
environment variables, per-model pip installs, allowed_urls and key expiry."""

import json
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
import requests

from devtools import REPO_ROOT
from devtools.harness.torchserve import TorchServe
from tests.conftest import plant_hostile_files
from tests.integration.conftest import TINY, build_archive

# What an attacker who can set the server's environment would try; enable_envvars_config=false ignores it.
HOSTILE_ENVIRONMENT = {
    "TS_ENABLE_MODEL_API": "true",
    "TS_DISABLE_TOKEN_AUTHORIZATION": "true",
    "TS_INSTALL_PY_DEP_PER_MODEL": "true",
    "TS_ALLOWED_URLS": "http(s)?://.*",
}
# pip install -r would fail on this, and the model would never load.
UNINSTALLABLE = "torchserve-diffusers-must-never-install==0.0.0\n"


def with_requirements(source, target):
    """A copy of a .mar that asks TorchServe to pip-install a requirements file."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for member in original.infolist():
            data = original.read(member)
            if member.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["requirementsFile"] = "requirements.txt"
                data = json.dumps(manifest).encode()
            copy.writestr(member, data)
        copy.writestr("requirements.txt", UNINSTALLABLE)
    return target


def health(server) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/manage.py", "health", "--url", server.management_url,
         "--inference-url", server.inference_url, "--key-file", str(server.workdir / "key_file.json")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )


@pytest.fixture(scope="module")
def hardened(tmp_path_factory, model_store):
    store = tmp_path_factory.mktemp("hardened") / "model-store"
    store.mkdir()
    with_requirements(model_store / f"{TINY}.mar", store / f"{TINY}.mar")
    workdir = tmp_path_factory.mktemp("torchserve-hardened")
    with TorchServe(workdir, store, {TINY: f"{TINY}.mar"}, env=HOSTILE_ENVIRONMENT) as torchserve:
        yield torchserve


def test_environment_variables_cannot_loosen_the_config(hardened):
    no_token = requests.post(f"{hardened.inference_url}/predictions/{TINY}", data="a cat", timeout=30)
    assert no_token.status_code == 400 and "Token Authorization failed" in no_token.text
    register = requests.post(
        f"{hardened.management_url}/models", params={"url": "x.mar"}, headers=hardened.auth("management"), timeout=30
    )
    assert register.status_code == 405


def test_archives_do_not_pip_install_their_requirements(hardened):
    # The archive names an uninstallable requirement: had pip run, the worker would never be READY.
    assert hardened.describe(TINY)["workers"][0]["status"] == "READY"
    response = hardened.predict(TINY, data="a cat", headers={"Content-Type": "text/plain"})
    assert response.status_code == 200, response.text


def test_health_checks_that_work(hardened):
    ping = f"{hardened.inference_url}/ping"
    assert requests.get(ping, timeout=10).status_code == 400  # /ping needs the token too
    assert requests.get(ping, headers=hardened.auth("management"), timeout=10).status_code == 400
    with_inference_key = requests.get(ping, headers=hardened.auth("inference"), timeout=10)
    assert (with_inference_key.status_code, with_inference_key.json()) == (200, {"status": "Healthy"})
    result = health(hardened)
    assert (result.returncode, result.stdout.strip()) == (0, "200 Healthy"), result.stderr
    # The metrics port needs no token: enough for a liveness probe, though it says nothing of the workers.
    assert requests.get(f"{hardened.metrics_url}/metrics", timeout=10).status_code == 200


def test_health_check_fails_when_the_server_is_down(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/manage.py", "health", "--url", "http://127.0.0.1:9",
         "--inference-url", "http://127.0.0.1:9", "--key-file", str(tmp_path / "key_file.json")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "unreachable" in result.stdout


def test_expired_keys_are_refused_and_the_scripts_renew_them(tmp_path):
    # Keys live 3 seconds here instead of 60 minutes.
    (tmp_path / "model-store").mkdir()
    with TorchServe(tmp_path, tmp_path / "model-store", {}, extra_config={"token_expiration_min": "0.05"}) as torchserve:
        old_key = torchserve.keys()["inference"]
        time.sleep(4)
        expired = requests.get(f"{torchserve.inference_url}/ping", headers=torchserve.auth("inference"), timeout=10)
        assert expired.status_code == 400
        result = health(torchserve)
        assert (result.returncode, result.stdout.strip()) == (0, "200 Healthy"), result.stdout + result.stderr
        assert torchserve.keys()["inference"] != old_key


def test_allowed_urls_admit_only_the_model_store(tmp_path, model_store):
    # Even with the model API switched on, registration by URL is refused outside a model store.
    store, elsewhere = tmp_path / "model-store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    for directory in (store, elsewhere):
        (directory / f"{TINY}.mar").write_bytes((model_store / f"{TINY}.mar").read_bytes())
    with TorchServe(tmp_path / "torchserve", store, {}, extra_config={"enable_model_api": "true"}) as torchserve:
        def register(url: str) -> requests.Response:
            return requests.post(
                f"{torchserve.management_url}/models",
                params={"url": url, "initial_workers": 0},
                headers=torchserve.auth("management"),
                timeout=60,
            )

        for url in ("https://example.com/sd.mar", "http://127.0.0.1:9/sd.mar", f"file://{elsewhere}/{TINY}.mar"):
            refused = register(url)
            assert refused.status_code == 404
            assert "does not match any allowed URL" in refused.json()["message"]
        assert register(f"{TINY}.mar").status_code == 200  # by name, from the model store


def test_a_worker_served_from_a_hostile_model_directory_never_runs_its_planted_code(tmp_path, tiny_pipeline_dir):
    source = tmp_path / "hostile"
    shutil.copytree(tiny_pipeline_dir, source)
    markers = tmp_path / "markers"
    plant_hostile_files(source, markers)
    store = tmp_path / "store"
    build_archive(store, "hostile", "--source", str(source), "--height", "64", "--width", "64",
                  "--num-inference-steps", "2")
    with TorchServe(tmp_path / "server", store, {"hostile": "hostile.mar"}) as server:
        response = server.predict("hostile", json={"prompt": "a cat", "seed": 1, "output_format": "png"})
        assert response.status_code == 200 and response.headers["Content-Type"] == "image/png"
    assert sorted(path.name for path in markers.iterdir()) == []

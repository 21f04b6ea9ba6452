"""One server per test module, serving archives built by our own archiver CLI: TorchServe, or, for the
suites that check the request API on both engines, Ray Serve on a real Ray cluster."""

import base64
import io
import importlib.util
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from archiver.settings import read_properties  # noqa: F401 - the tests read config files as the archiver does
from devtools.harness.ray_cluster import RayServeCluster, can_make_namespaces
from devtools import REPO_ROOT
from devtools.harness.torchserve import TorchServe

TINY = "tiny_sd"  # small defaults from its model-config.yaml, for fast tests
DEFAULTS = "default_sd"  # built-in generation defaults untouched: 7.5 / 50 / 768x768


def build_archive(model_store: Path, name: str, *options: str) -> Path:
    # The archiver's own command, with the development models (tiny, tiny-sdxl, ...) as sources.
    command = [sys.executable, "-m", "devtools.archives", "build", "--export-path", str(model_store), "--model-name", name]
    result = subprocess.run([*command, *options], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"built {model_store / name}" in result.stdout
    return model_store / f"{name}.mar"


@pytest.fixture(scope="session")
def model_store(tmp_path_factory, tiny_pipeline_dir) -> Path:
    store = tmp_path_factory.mktemp("model-store")
    build_archive(
        store, TINY, "--source", "tiny", "--height", "64", "--width", "64", "--num-inference-steps", "4",
        "--batch-size", "4", "--max-batch-delay", "500",
    )
    build_archive(store, DEFAULTS, "--source", str(tiny_pipeline_dir))
    return store


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_store):
    torchserve = TorchServe(
        tmp_path_factory.mktemp("torchserve"), model_store, {TINY: f"{TINY}.mar", DEFAULTS: f"{DEFAULTS}.mar"}
    )
    torchserve.start()
    try:
        yield torchserve
    finally:
        torchserve.stop()


ENGINES = ["torchserve", "ray"]


@contextmanager
def serving(engine: str, workdir: Path, model_store: Path, archives: dict[str, str], **ray_options):
    """The archives (model name: file in model_store) served by one engine; the same client calls either.
    ray_options go to RayServeCluster (nodes, replicas, ...)."""
    if engine == "torchserve":
        server = TorchServe(workdir, model_store, archives)
    else:
        if importlib.util.find_spec("ray") is None:
            pytest.skip("ray[serve] is not installed: pip install -e .[test,ray] (scripts/test.sh installs it)")
        if not can_make_namespaces():
            pytest.skip("Ray runs in a loopback-only network namespace here, which needs root (unshare -n)")
        server = RayServeCluster(workdir, {name: model_store / archive for name, archive in archives.items()}, **ray_options)
    with server:
        yield server


def worker_log(server) -> str:
    """What the model's workers (TorchServe) or replicas (Ray Serve) logged."""
    if isinstance(server, TorchServe):
        return (server.workdir / "logs" / "model_log.log").read_text()
    return server.replica_log()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb() -> bytes:
    """A few hundred kB of PNG that decodes to 20000 x 20000 pixels."""
    return png(Image.new("L", (20000, 20000)))

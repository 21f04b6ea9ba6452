"""Archives that reference their weights, through a real TorchServe: the digits model's weights stay in a
folder of the test's own, the .mar holds the rest, and every worker checks them at its start.

As tests/integration/test_memory_sharing.py does for one archive's workers, the mapping test reads each
worker's /proc/PID/smaps: workers of two archives of one base model map the same files of the root,
read-only, and each holds a share of their pages."""

import hashlib
import io
import json
import re
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devtools.harness.torchserve import TorchServe, can_mount_read_only
from devtools.models.digits import DEFAULT_WEIGHTS_DIR
from handlers.core.weights import ROOT_VARIABLE
from tests.integration.conftest import build_archive
from tests.integration.test_memory_sharing import safetensors_mappings
from tests.unit.helpers import fine_tuned

SMALL = ("--height", "64", "--width", "64", "--num-inference-steps", "10", "--guidance-scale", "4")
UNET = "unet/diffusion_pytorch_model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"
REQUEST = {"prompt": "digit 7", "seed": 3, "output_format": "png"}


def weights_root(path: Path) -> Path:
    return Path(shutil.copytree(DEFAULT_WEIGHTS_DIR, path))


def reference(store: Path, name: str, root: Path, *options: str) -> Path:
    return build_archive(store, name, "--source", str(root), "--weights", "reference", *SMALL, *options)


def pixels(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


@pytest.fixture(scope="module")
def shared_root_server(tmp_path_factory):
    """Two reference archives of one root (one with two workers) and a packed archive of the same weights."""
    workdir = tmp_path_factory.mktemp("references")
    root, store = weights_root(workdir / "weights"), workdir / "store"
    reference(store, "ref", root, "--min-workers", "2", "--max-workers", "2")
    reference(store, "ref_other", root, "--num-inference-steps", "5")
    build_archive(store, "packed", "--source", str(root), "--weights", "pack", *SMALL)
    models = {name: f"{name}.mar" for name in ("ref", "ref_other", "packed")}
    with TorchServe(workdir / "server", store, models).start(600) as server:
        yield server, root, store


def test_a_reference_archive_is_small_and_draws_what_the_packed_one_draws(shared_root_server):
    server, root, store = shared_root_server
    weights = sum(path.stat().st_size for path in root.rglob("*.safetensors"))
    assert (store / "ref.mar").stat().st_size < weights / 10 < (store / "packed.mar").stat().st_size
    assert (pixels(server.predict("ref", json=REQUEST)) == pixels(server.predict("packed", json=REQUEST))).all()
    unpacked = [path.parent for path in server.workdir.rglob("weights.json")]  # TorchServe's copy of ref*.mar
    assert unpacked and not [path for folder in unpacked for path in folder.rglob("*.safetensors")]


def test_workers_of_two_archives_map_one_copy_of_the_weights_read_only(shared_root_server):
    server, root, _ = shared_root_server
    for name in ("ref", "ref_other"):
        assert server.predict(name, json=REQUEST).status_code == 200
    real_root = str(root.resolve())
    referencing = {}
    for worker in server.workers():
        mappings = safetensors_mappings(worker.pid)
        if any(path.startswith(real_root) for path in mappings):
            assert all(path.startswith(real_root) for path in mappings), mappings  # nothing of its own
            referencing[worker.pid] = mappings
    assert len(referencing) == 3  # ref's two workers and ref_other's one
    sizes = {path: Path(path).stat().st_size for path in next(iter(referencing.values()))}
    assert {str(Path(real_root) / UNET), str(Path(real_root) / VAE)} <= set(sizes)
    for pid, mappings in referencing.items():
        assert set(mappings) == set(sizes)
        for path, size in sizes.items():
            assert mappings[path]["Rss"] >= 0.95 * size, (path, mappings[path], size)
            assert mappings[path]["Pss"] <= 0.55 * mappings[path]["Rss"], (path, mappings[path], size)
        assert not shared_file_mappings(pid, real_root)


def shared_file_mappings(pid: int, root: str) -> list[str]:
    """Mappings of files under root that write through to the file (shared ones): safetensors maps privately,
    copy-on-write, so nothing a worker does reaches the weights."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return [line for line in lines if line.split()[-1].startswith(root) and line.split()[1][3] == "s"]


def test_serving_leaves_the_weights_as_they_were(shared_root_server):
    server, root, store = shared_root_server
    assert server.predict("ref", json=REQUEST).status_code == 200
    manifest = json.loads(zipfile.ZipFile(store / "ref.mar").read("weights.json"))
    for entry in manifest["files"]:
        assert hashlib.sha256((root / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]


@pytest.mark.skipif(not can_mount_read_only(), reason="a read-only mount of the weights needs root (unshare -m)")
def test_weights_moved_to_a_read_only_volume_serve_where_the_variable_says(tmp_path):
    root, store = weights_root(tmp_path / "weights"), tmp_path / "store"
    reference(store, "moved", root)
    moved = root.rename(tmp_path / "volume")
    server = TorchServe(tmp_path / "server", store, {"moved": "moved.mar"}, env={ROOT_VARIABLE: str(moved)},
                        read_only=(moved,))
    with server.start(300):
        assert server.predict("moved", json=REQUEST).status_code == 200
        assert f"weights referenced in {moved} (from {ROOT_VARIABLE})" in server.log_since(0)


def broken(tmp_path: Path, store: Path, name: str, damage) -> str:
    """An archive whose weights damage(root) changes after the build; the file its refusal must name."""
    root = weights_root(tmp_path / name)
    reference(store, name, root)
    return damage(tmp_path, root)


def remove_root(tmp_path: Path, root: Path) -> str:
    shutil.rmtree(root)
    return f"{root} (from the build (neither {ROOT_VARIABLE} nor weights_root is set)) is not a directory on this " \
           f"machine. Set {ROOT_VARIABLE} to the directory holding text_encoder/, unet/, vae/"


def fine_tune_unet(tmp_path: Path, root: Path) -> str:
    fine_tuned(root / UNET, root / UNET)
    return f"{UNET} in {root} has changed: its sampled sha256"


def link_vae_out(tmp_path: Path, root: Path) -> str:
    outside = shutil.copyfile(root / VAE, tmp_path / "outside.safetensors")
    (root / VAE).unlink()
    (root / VAE).symlink_to(outside)
    return f"{VAE} in the weights root {root} is a link to {outside}, outside it"


def plant_code(tmp_path: Path, root: Path) -> str:
    (root / "unet" / "modeling_unet.py").write_text("print('planted')\n")
    return f"unet/modeling_unet.py in the weights root {root} is code"


def test_each_refusal_stops_its_model_naming_the_file_and_the_rest_serve(tmp_path):
    store = tmp_path / "store"
    reference(store, "intact", weights_root(tmp_path / "intact"))
    refusals = {name: broken(tmp_path, store, name, damage) for name, damage in
                {"no_root": remove_root, "changed": fine_tune_unet, "link_out": link_vae_out, "code": plant_code}.items()}
    models = {name: f"{name}.mar" for name in ["intact", *refusals]}
    with TorchServe(tmp_path / "server", store, models).start(300, ready={"intact"}) as server:
        deadline = time.monotonic() + 120
        while any(message not in server.log_since(0) for message in refusals.values()) and time.monotonic() < deadline:
            time.sleep(1)
        log = server.log_since(0)
        for name, message in refusals.items():
            assert message in log, (name, message)
            assert not [worker for worker in server.describe(name)["workers"] if worker["status"] == "READY"], name
            assert re.search(rf"ReferencedWeightsError: .*{re.escape(message)}", log), name
        assert server.predict("intact", json=REQUEST).status_code == 200

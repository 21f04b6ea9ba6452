"""Hub ids are fetched through the Hugging Face cache, once, and build offline from it.

The hub is unreachable here, so each test fills a cache the way huggingface_hub lays one out
(models--owner--name/refs/main naming a snapshot folder) and runs the archiver CLI against it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from devtools import REPO_ROOT
from devtools.harness.torchserve import free_port
from devtools.models.tiny import build_tiny_pipeline
from tests.unit.helpers import served_family

REPO_ID = "tiny-org/tiny-sd"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(hf_home: Path, variant: str | None = None) -> Path:
    repo = hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    pipeline = build_tiny_pipeline(hf_home)
    if variant:
        pipeline = pipeline.to(dtype=torch.float16)
    pipeline.save_pretrained(snapshot, safe_serialization=True, variant=variant)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def archiver(tmp_path: Path, env: dict, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "archiver", "build", "--source", REPO_ID, "--archive-format", "no-archive",
               "--export-path", str(tmp_path / "store"), "--model-name", "hub", *options]
    clean = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    return subprocess.run(command, cwd=REPO_ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=300)


def test_offline_build_reads_the_filled_cache(tmp_path):
    snapshot = fill_cache(tmp_path / "hf")
    result = archiver(tmp_path, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, "--weights", "pack")
    assert result.returncode == 0, result.stderr
    assert f"using {snapshot}" in result.stdout and "offline: HF_HUB_OFFLINE is set" in result.stdout
    archive = tmp_path / "store" / "hub"
    assert json.loads((archive / "built-from.json").read_text())["source"] == REPO_ID
    assert (archive / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        snapshot / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_by_default_a_hub_source_is_referenced_in_the_cache_pinned_to_its_snapshot(tmp_path):
    snapshot = fill_cache(tmp_path / "hf")
    result = archiver(tmp_path, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert f"in {REPO_ID}@{COMMIT} in the Hugging Face cache" in result.stdout
    archive = tmp_path / "store" / "hub"
    manifest = json.loads((archive / "weights.json").read_text())
    assert manifest["hub"] == {"repo_id": REPO_ID, "commit": COMMIT}
    assert manifest["root"] == str((tmp_path / "hf" / "hub").resolve())
    assert not list(archive.rglob("*.safetensors")) and (snapshot / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_an_unreachable_hub_falls_back_to_the_cache_instead_of_downloading_again(tmp_path):
    fill_cache(tmp_path / "hf")
    dead_endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: every request is refused at once
    result = archiver(tmp_path, {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": dead_endpoint})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "store" / "hub" / "weights.json").is_file()


def test_offline_with_an_empty_cache_is_a_clear_error(tmp_path):
    result = archiver(tmp_path, {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert f"could not fetch {REPO_ID!r}" in result.stderr
    assert "HF_HUB_OFFLINE is set, so only models already in the Hugging Face cache" in result.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_a_variant_is_fetched_packed_and_loaded(tmp_path):
    fill_cache(tmp_path / "hf", variant="fp16")
    result = archiver(tmp_path, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, "--variant", "fp16", "--weights", "pack",
                      "--height", "64", "--width", "64", "--num-inference-steps", "2")
    assert result.returncode == 0, result.stderr
    archive = tmp_path / "store" / "hub"
    assert (archive / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    config = yaml.safe_load((archive / "model-config.yaml").read_text())
    assert config["handler"]["variant"] == "fp16"
    served = served_family(archive)
    assert served.service.pipeline.unet.dtype.is_floating_point
    [answer] = served.post({"prompt": "a red square", "output_format": "png", "seed": 1})
    assert answer.status == 200 and answer.body.startswith(b"\x89PNG")


@pytest.mark.parametrize("variant", ["../fp16", "fp 16", "x" * 40])
def test_a_variant_that_is_not_a_plain_name_is_refused_before_anything_is_fetched(tmp_path, variant):
    result = archiver(tmp_path, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, "--variant", variant)
    assert result.returncode == 2
    assert "variant" in result.stderr and "fetching" not in result.stdout


def test_an_offline_build_from_a_full_snapshot_imports_neither_diffusers_nor_torch(tmp_path):
    # Seconds of imports, where the build reads nothing but the cache (bench.py --cold-start times it).
    fill_cache(tmp_path / "hf")
    script = ("import sys; from archiver.cli import main; "
              f"code = main(['build', '--source', {REPO_ID!r}, '--export-path', {str(tmp_path / 'store')!r}]); "
              "print(code, sorted(name for name in ('diffusers', 'torch') if name in sys.modules))")
    clean = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**clean, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.stdout.strip().splitlines()[-1] == "0 []", result.stdout + result.stderr
    assert (tmp_path / "store" / "stable_diffusion.mar").is_file()


def test_an_offline_snapshot_missing_a_component_or_the_variant_is_refused_naming_it(tmp_path):
    snapshot = fill_cache(tmp_path / "hf")
    offline = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = archiver(tmp_path, offline, "--variant", "fp16")
    assert result.returncode == 2 and "holds no fp16 weights (*.fp16.safetensors)" in result.stderr
    shutil.rmtree(snapshot / "vae")
    result = archiver(tmp_path, offline)
    assert result.returncode == 2 and f"could not fetch {REPO_ID!r}" in result.stderr
    assert "lacks vae/, which model_index.json names" in result.stderr

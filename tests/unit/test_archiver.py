import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml

from archiver.build import REPO_ROOT
from archiver.cli import main


def build(tmp_path, *options):
    return main(["build", "--export-path", str(tmp_path / "store"), *options])


def test_archive_holds_pipeline_handler_package_and_model_config(tmp_path, tiny_pipeline_dir, capsys):
    assert build(tmp_path, "--source", str(tiny_pipeline_dir), "--model-name", "m", "--batch-size", "4", "--height", "64") == 0
    output = capsys.readouterr().out
    assert "copying unet/diffusion_pytorch_model.safetensors" in output
    assert f"built {tmp_path / 'store' / 'm.mar'}" in output
    with zipfile.ZipFile(tmp_path / "store" / "m.mar") as archive:
        names = set(archive.namelist())
        config = yaml.safe_load(archive.read("model-config.yaml"))
    assert {"model_index.json", "handler.py", "handlers/request.py", "handlers/metrics.yaml", "MAR-INF/MANIFEST.json"} <= names
    assert config["minWorkers"] == config["maxWorkers"] == 1
    assert config["batchSize"] == 4
    assert {"maxBatchDelay", "responseTimeout", "startupTimeout"} <= set(config)
    handler = config["handler"]
    assert (handler["guidance_scale"], handler["num_inference_steps"], handler["height"], handler["width"]) == (7.5, 50, 64, 768)
    assert handler["torch_dtype"] == handler["batching"] == "auto"
    assert handler["output_format"] == "numpy"
    assert "scheduler" not in handler  # absent: the pipeline's own


def test_no_archive_format_writes_a_directory(tmp_path, tiny_pipeline_dir):
    assert build(tmp_path, "--source", str(tiny_pipeline_dir), "--model-name", "d", "--archive-format", "no-archive") == 0
    assert (tmp_path / "store" / "d" / "model_index.json").is_file()
    assert (tmp_path / "store" / "d" / "handlers" / "handler.py").is_file()


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path, tiny_pipeline_dir, capsys):
    pipeline = tmp_path / "pickled"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    for weights in (pipeline / "vae").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    assert build(tmp_path, "--source", str(pipeline), "--model-name", "p") == 2
    assert "vae" in capsys.readouterr().out and not (tmp_path / "store" / "p.mar").exists()
    assert build(tmp_path, "--source", str(pipeline), "--model-name", "p", "--allow-unsafe-weights") == 0
    with zipfile.ZipFile(tmp_path / "store" / "p.mar") as archive:
        assert yaml.safe_load(archive.read("model-config.yaml"))["handler"]["allow_pickle_weights"] is True


def test_pickle_twins_of_safetensors_are_left_out(tmp_path, tiny_pipeline_dir):
    pipeline = tmp_path / "both"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    (pipeline / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    assert build(tmp_path, "--source", str(pipeline), "--model-name", "b") == 0
    with zipfile.ZipFile(tmp_path / "store" / "b.mar") as archive:
        assert "unet/diffusion_pytorch_model.bin" not in archive.namelist()


def test_unreachable_hub_gives_a_clear_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "archiver", "build", "--source", "someone/some-model", "--export-path", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert "could not download 'someone/some-model'" in result.stdout
    assert "pass the local directory as --source" in result.stdout


def test_a_directory_without_model_index_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert build(tmp_path, "--source", str(tmp_path / "empty")) == 2
    assert "no model_index.json" in capsys.readouterr().out


@pytest.mark.parametrize("arguments", [["--help"], ["build", "--help"]])
def test_the_cli_prints_only_its_own_output(arguments):
    result = subprocess.run(
        [sys.executable, "-m", "archiver", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m archiver")
    assert result.stderr == ""

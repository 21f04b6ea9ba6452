"""The GPU plan runs before a GPU is lent: `bench.py --gpu --dry-run` runs every part of it on the
CPU with the tiny model, through real TorchServe workers, and writes every figure the report needs."""

import json
import subprocess
import sys
import zipfile

import pytest
import torch

from devtools import REPO_ROOT

BENCH = [sys.executable, str(REPO_ROOT / "scripts" / "bench.py")]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-plan")
    finished = subprocess.run([*BENCH, "--gpu", "--dry-run", "--out", str(out), "--models-dir", str(out / "models")],
                              capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return out / "gpu-dry-run"


def part(dry_run, name) -> dict:
    return json.loads((dry_run / f"tiny-{name}.json").read_text())["results"]


def test_the_ladder_measures_every_option_cumulatively(dry_run):
    ladder = part(dry_run, "ladder")
    assert list(ladder) == ["float32", "float32 (SDPA)", "+ fused QKV", "+ channels_last", "+ torch.compile"]
    assert ladder["+ torch.compile"]["settings"] == {
        "torch_dtype": "float32", "fuse_qkv_projections": True, "channels_last": True, "torch_compile": True}
    assert all(rung["latency_s"] > 0 for rung in ladder.values())
    assert part(dry_run, "autotune")["max-autotune"]["settings"]["compile_mode"] == "max-autotune"


@pytest.mark.parametrize("variant", ["eager", "compiled"])
def test_served_parts_measure_batch_1_and_4_through_torchserve(dry_run, variant):
    served = part(dry_run, f"served-{variant}")
    assert served["bare"]["settings"]["torch_compile"] == (variant == "compiled")
    for batch_size in (1, 4):
        figures = served[f"{variant}_b{batch_size}"]
        assert figures["start_to_ready_s"] > 0 and figures["first_request_s"] > 0 and figures["warm_request_s"] > 0
        assert figures["c8"]["throughput_rps"] > 0
        assert figures["peak_memory_bytes"] > 2**20  # the worker's peak resident memory on a CPU


def test_the_step_part_compares_both_modes_on_the_mix_and_checks_every_image_against_its_solo_one(dry_run):
    step = part(dry_run, "step")
    for mode in ("static", "step"):
        figures = step["closed"][mode]
        assert figures["throughput_rps"] > 0 and all(figures[f"p95_s {steps} steps"] > 0 for steps in (4, 25, 50))
    solo = step["solo_difference"]
    assert solo["checked"] == 2 * 8 and solo["max"] <= 2  # two rounds of the plan's 8 requests


def test_served_parts_serve_the_saved_model_where_it_lies(dry_run):
    # --weights reference: the archives hold no weights, so FLUX needs its 34 GB on the disk only once.
    archives = sorted((dry_run / "store").glob("*.mar"))
    assert {archive.stem for archive in archives} >= {"eager_b1", "eager_b4", "compiled_b1", "compiled_b4", "static", "step"}
    for archive in archives:
        names = zipfile.ZipFile(archive).namelist()
        assert "weights.json" in names and not [name for name in names if name.endswith(".safetensors")], archive


def test_the_report_has_every_table_and_target(dry_run):
    report = (dry_run / "gpu.md").read_text()
    for row in ("| + torch.compile |", "| max-autotune |", "| eager_b4 |", "| compiled_b1 |", "| compiled_b4 |"):
        assert row in report
    for target in ("serving overhead", "first request after READY", "batch 4 / batch 1", "p95 latency of 4-step requests"):
        assert target in report
    assert "time total" in (dry_run / "tiny-profile.txt").read_text()  # torch.profiler's table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the message on a machine without CUDA")
def test_gpu_without_cuda_points_at_the_dry_run():
    finished = subprocess.run([*BENCH, "--gpu", "--model", "sdxl"], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 2
    assert "--gpu --dry-run runs the same plan on the CPU" in finished.stderr

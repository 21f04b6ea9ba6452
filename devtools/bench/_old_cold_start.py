"""Full-size cold start on the CPU, in one run: SD 1.5's architecture (4.0 GB of float32 safetensors,
random weights from archiver/sd15.py), from the build to the first image, for our archive in each
format against the pytorch/serve example. `scripts/bench.py --cold-start` calls this.

  build         `python -m archiver build` end to end (the example: zipping model.zip, then
                torch-model-archiver), beside a plain copy of the pipeline directory (page cache warm)
  READY         TorchServe started until its worker is READY (our workers warm up inside that time)
  first / warm  the first request after READY, and the median of three after it (256x256, 1 step); the
                default format starts three times, and reports its median start
  memory        two workers of the default archive: each one's PSS and RSS, and how much the
                machine's memory in use grew for the second

Random weights cost exactly what trained ones cost; the pipeline is built once into --models-dir.
"""

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import torch

from devtools import REPO_ROOT
from devtools.models.sd15 import build_sd15_random_pipeline
from devtools.harness.torchserve import TorchServe
from gpu_bench import timed_predict

SIZE, STEPS = 256, 1
FORMATS = ("zip-store", "no-archive", "default")  # ours: the default first
# The default format starts this many times: this VM's speed drifts by 20 % from minute to minute, and one
# first request against its warm ones is one sample of that.
DEFAULT_STARTS = 3
TARGETS = {"build": "<= 1.5x the copy + 15 s", "ready": "<= 10 s", "first_over_warm": "<= 1.2x"}


def prepare_model(models_dir: Path) -> Path:
    pipeline_dir = models_dir / "sd15-cpu-float32"
    if not (pipeline_dir / "model_index.json").is_file():
        build_sd15_random_pipeline(models_dir / "sd15-work", "cpu", torch.float32).save_pretrained(
            pipeline_dir, safe_serialization=True
        )
    return pipeline_dir


def read_all(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as stream:
                while stream.read(1 << 24):
                    pass


def timed_copy(pipeline_dir: Path, workdir: Path) -> float:
    read_all(pipeline_dir)  # the builds read it from the page cache too
    started = time.perf_counter()
    shutil.copytree(pipeline_dir, workdir / "copy")
    elapsed = time.perf_counter() - started
    shutil.rmtree(workdir / "copy")
    return elapsed


def build_ours(pipeline_dir: Path, store: Path, archive_format: str) -> tuple[str, float]:
    name = "sd15_" + archive_format.replace("-", "_")
    command = [sys.executable, "-m", "archiver", "build", "--source", str(pipeline_dir), "--model-name", name,
               "--archive-format", archive_format, "--export-path", str(store), "--height", str(SIZE),
               "--width", str(SIZE), "--num-inference-steps", str(STEPS), "--force"]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    return name, time.perf_counter() - started


def build_example(pipeline_dir: Path, workdir: Path, store: Path) -> tuple[str, float]:
    """The pytorch/serve example's two steps: its README zips the pipeline, then archives the zip."""
    import zipfile

    from bench import build_baseline_archive

    started = time.perf_counter()
    model_zip = workdir / "model.zip"
    with zipfile.ZipFile(model_zip, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(pipeline_dir.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(pipeline_dir).as_posix())
    build_baseline_archive(workdir, store, "example", 1, model_zip, SimpleNamespace(load_steps=STEPS, size=SIZE))
    elapsed = time.perf_counter() - started
    model_zip.unlink()
    return "example", elapsed


def archive_file(store: Path, name: str) -> str:
    return name if (store / name).is_dir() else f"{name}.mar"


def timed_request(server: TorchServe, name: str, seed: int) -> float:
    return timed_predict(server, name, {"prompt": "a lighthouse", "seed": seed, "output_format": "png"})


def serve_once(workdir: Path, store: Path, name: str, requests_too: bool) -> dict:
    server = TorchServe(workdir / f"ts-{name}", store, {name: archive_file(store, name)})
    started = time.perf_counter()
    server.start(timeout_s=900)
    result = {"ready_s": time.perf_counter() - started}
    try:
        if requests_too:
            result["first_s"] = timed_request(server, name, 0)
            result["warm_s"] = statistics.median(timed_request(server, name, seed) for seed in (1, 2, 3))
    finally:
        server.stop()
    return result


def median_start(starts: list[dict]) -> dict:
    """The start whose first request over its warm ones is the median, with the median time to READY."""
    middle = sorted(starts, key=lambda start: start["first_s"] / start["warm_s"])[len(starts) // 2]
    return {**middle, "ready_s": statistics.median(start["ready_s"] for start in starts)}


def two_workers_memory(workdir: Path, store: Path, name: str) -> dict:
    server = TorchServe(workdir / f"ts-memory-{name}", store, {name: archive_file(store, name)}).start(timeout_s=900)
    try:
        server.predict(name, json={"prompt": "a lighthouse", "output_format": "png"}, timeout=600).raise_for_status()
        used_one = psutil.virtual_memory().used
        server.scale(name, 2, timeout_s=900).raise_for_status()
        server.predict(name, json={"prompt": "a lighthouse", "output_format": "png"}, timeout=600).raise_for_status()
        used_two = psutil.virtual_memory().used
        workers = [process.memory_full_info() for process in server.workers()]
    finally:
        server.stop()
    return {
        "worker_pss_gb": [info.pss / 2**30 for info in workers],
        "worker_rss_gb": [info.rss / 2**30 for info in workers],
        "second_worker_used_gb": (used_two - used_one) / 2**30,
    }


def measure(workdir: Path, models_dir: Path, log) -> dict:
    pipeline_dir = prepare_model(models_dir)
    weights = sum(path.stat().st_size for path in pipeline_dir.rglob("*.safetensors"))
    log(f"SD 1.5 architecture, random weights: {weights / 2**30:.2f} GiB of safetensors in {pipeline_dir}")
    store = workdir / "cold-store"
    results = {"weights_gb": weights / 2**30, "copy_s": timed_copy(pipeline_dir, workdir), "cases": {}}
    log(f"plain copy: {results['copy_s']:.1f} s")
    for archive_format in FORMATS:
        name, build_s = build_ours(pipeline_dir, store, archive_format)
        starts = [serve_once(workdir, store, name, requests_too=True)
                  for _ in range(DEFAULT_STARTS if archive_format == FORMATS[0] else 1)]
        case = {"build_s": build_s, **median_start(starts), "starts": starts}
        results["cases"][f"ours, {archive_format}"] = case
        log(f"ours, {archive_format}: {case}")
        if archive_format != FORMATS[0]:
            shutil.rmtree(store / name, ignore_errors=True)
            (store / f"{name}.mar").unlink(missing_ok=True)
    name, build_s = build_example(pipeline_dir, workdir, store)
    # The example answers only at its fixed 768x768 and 50 steps: minutes per image on this CPU.
    results["cases"]["pytorch/serve example"] = {"build_s": build_s, **serve_once(workdir, store, name, requests_too=False)}
    log(f"pytorch/serve example: {results['cases']['pytorch/serve example']}")
    (store / "example.mar").unlink(missing_ok=True)
    results["memory"] = two_workers_memory(workdir, store, "sd15_zip_store")
    log(f"two workers: {results['memory']}")
    results["verdicts"] = verdicts(results)
    return results


def verdicts(results: dict) -> dict:
    ours = results["cases"][f"ours, {FORMATS[0]}"]
    build_bound = 1.5 * results["copy_s"] + 15
    return {
        "build": (ours["build_s"] <= build_bound, f"{ours['build_s']:.1f} s against {build_bound:.1f} s"),
        "ready": (ours["ready_s"] <= 10, f"{ours['ready_s']:.1f} s"),
        "first_over_warm": (ours["first_s"] <= 1.2 * ours["warm_s"], f"{ours['first_s'] / ours['warm_s']:.2f}x"),
    }


def markdown(results: dict) -> list[str]:
    lines = [
        f"SD 1.5 architecture, {results['weights_gb']:.1f} GiB of float32 safetensors (random weights), this CPU, "
        f"{SIZE}x{SIZE}, {STEPS} step; a plain copy of the pipeline took {results['copy_s']:.1f} s:",
        "",
        "| | build | start to READY | first request / warm one |",
        "|---|---|---|---|",
    ]
    for label, case in results["cases"].items():
        requests_cell = (f"{case['first_s']:.1f} s / {case['warm_s']:.1f} s ({case['first_s'] / case['warm_s']:.2f}x)"
                         if "first_s" in case else "–")
        if len(case.get("starts", [])) > 1:
            label += f" (median of {len(case['starts'])} starts: " + ", ".join(
                f"{start['first_s'] / start['warm_s']:.2f}x" for start in case["starts"]) + ")"
        lines.append(f"| {label} | {case['build_s']:.1f} s | {case['ready_s']:.1f} s | {requests_cell} |")
    memory = results["memory"]
    lines += [
        "",
        "Two workers of the default archive: PSS "
        + ", ".join(f"{pss:.2f}" for pss in memory["worker_pss_gb"]) + " GiB of RSS "
        + ", ".join(f"{rss:.2f}" for rss in memory["worker_rss_gb"])
        + f" GiB; the machine's memory in use grew {memory['second_worker_used_gb']:.2f} GiB for the second.",
        "",
        "| target (default archive) | result |",
        "|---|---|",
    ]
    for name, (met, value) in results["verdicts"].items():
        lines.append(f"| {name} {TARGETS[name]} | {'met' if met else 'MISSED'}: {value} |")
    return lines


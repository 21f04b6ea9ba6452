"""Full-size cold start on the CPU, in one run: SD 1.5's architecture (4.0 GB of float32 safetensors,
random weights), from the build to the first image, for our archive in each format against the
pytorch/serve example. `bench.py --cold-start`, about 15 minutes and 12 GB of disk.

  build         `python -m archiver build` end to end (the example: zipping model.zip, then
                torch-model-archiver), beside a plain copy of the pipeline directory (page cache warm)
  READY         TorchServe started until its worker is READY (our workers warm up inside that time)
  first / warm  the first request after READY, and the median of three after it (256x256, 1 step); the
                default format starts three times, and reports its median start
  memory        two workers of the default archive: each one's PSS and RSS, and how much the
                machine's memory in use grew for the second
"""

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from devtools import REPO_ROOT
from devtools.bench.archives import build_example
from devtools.bench.runner import log, timed
from devtools.bench.targets import Target
from devtools.harness.torchserve import TorchServe
from devtools.models.sd15 import build_sd15_random_pipeline

SIZE, STEPS = 256, 1
FORMATS = ("zip-store", "no-archive", "default")  # ours: the default first
# The default format starts this many times: this VM's speed drifts by 20 % from minute to minute, and one
# first request against its warm ones is one sample of that.
DEFAULT_STARTS = 3
TARGETS = {"ready_s": Target("start to READY, s", "<=", 10), "first_over_warm": Target("first request / warm one", "<=", 1.2)}
BODY = {"prompt": "a lighthouse", "output_format": "png"}


def prepare_model(models_dir: Path) -> Path:
    pipeline_dir = models_dir / "sd15-cpu-float32"
    if not (pipeline_dir / "model_index.json").is_file():
        build_sd15_random_pipeline(models_dir / "sd15-work", "cpu", torch.float32).save_pretrained(
            pipeline_dir, safe_serialization=True)
    return pipeline_dir


def timed_copy(pipeline_dir: Path, workdir: Path) -> float:
    for path in pipeline_dir.rglob("*"):  # the builds read it from the page cache too
        if path.is_file():
            path.read_bytes()
    started = time.perf_counter()
    shutil.copytree(pipeline_dir, workdir / "copy")
    elapsed = time.perf_counter() - started
    shutil.rmtree(workdir / "copy")
    return elapsed


def timed_build(pipeline_dir: Path, store: Path, archive_format: str) -> tuple[str, float]:
    """`python -m archiver build` in its own process, so its imports count."""
    name = "sd15_" + archive_format.replace("-", "_")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "archiver", "build", "--source", str(pipeline_dir), "--model-name", name,
                    "--archive-format", archive_format, "--export-path", str(store), "--height", str(SIZE),
                    "--width", str(SIZE), "--num-inference-steps", str(STEPS), "--force"],
                   cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    return name, time.perf_counter() - started


def archive_file(store: Path, name: str) -> str:
    return name if (store / name).is_dir() else f"{name}.mar"


def serve_once(workdir: Path, store: Path, name: str, requests_too: bool) -> dict:
    started = time.perf_counter()
    with TorchServe(workdir / f"ts-{name}", store, {name: archive_file(store, name)}).start(900) as server:
        result = {"ready_s": time.perf_counter() - started}
        if requests_too:
            send = lambda seed: server.predict(name, json={**BODY, "seed": seed}, timeout=600)  # noqa: E731
            result["first_s"] = timed(lambda: send(0))
            result["warm_s"] = statistics.median(timed(lambda seed=seed: send(seed)) for seed in (1, 2, 3))
    return result


def median_start(starts: list[dict]) -> dict:
    """The start whose first request over its warm ones is the median, with the median time to READY."""
    middle = sorted(starts, key=lambda start: start["first_s"] / start["warm_s"])[len(starts) // 2]
    return {**middle, "ready_s": statistics.median(start["ready_s"] for start in starts)}


def two_workers_memory(workdir: Path, store: Path, name: str) -> dict:
    with TorchServe(workdir / f"ts-memory-{name}", store, {name: archive_file(store, name)}).start(900) as server:
        server.predict(name, json=BODY, timeout=600).raise_for_status()
        used_one = psutil.virtual_memory().used
        server.scale(name, 2, timeout_s=900).raise_for_status()
        server.predict(name, json=BODY, timeout=600).raise_for_status()
        used_two = psutil.virtual_memory().used
        workers = [process.memory_full_info() for process in server.workers()]
    return {"worker_pss_gb": [info.pss / 2**30 for info in workers], "worker_rss_gb": [info.rss / 2**30 for info in workers],
            "second_worker_used_gb": (used_two - used_one) / 2**30}


def measure(workdir: Path, models_dir: Path) -> dict:
    pipeline_dir = prepare_model(models_dir)
    weights = sum(path.stat().st_size for path in pipeline_dir.rglob("*.safetensors"))
    log(f"SD 1.5 architecture, random weights: {weights / 2**30:.2f} GiB of safetensors in {pipeline_dir}")
    store = workdir / "cold-store"
    results = {"weights_gb": weights / 2**30, "copy_s": timed_copy(pipeline_dir, workdir), "cases": {}}
    for archive_format in FORMATS:
        name, build_s = timed_build(pipeline_dir, store, archive_format)
        starts = [serve_once(workdir, store, name, requests_too=True)
                  for _ in range(DEFAULT_STARTS if archive_format == FORMATS[0] else 1)]
        results["cases"][f"ours, {archive_format}"] = {"build_s": build_s, **median_start(starts), "starts": starts}
        log(f"ours, {archive_format}: {results['cases'][f'ours, {archive_format}']}")
    started = time.perf_counter()
    example = build_example(store, "example", pipeline_dir, num_inference_steps=STEPS, height=SIZE, width=SIZE)
    results["cases"]["pytorch/serve example"] = {"build_s": time.perf_counter() - started,
                                                 **serve_once(workdir, store, example.removesuffix(".mar"), False)}
    results["memory"] = two_workers_memory(workdir, store, "sd15_zip_store")
    return results


def markdown(results: dict) -> list[str]:
    lines = [f"SD 1.5 architecture, {results['weights_gb']:.1f} GiB of float32 safetensors (random weights), this CPU, "
             f"{SIZE}x{SIZE}, {STEPS} step; a plain copy of the pipeline took {results['copy_s']:.1f} s:", "",
             "| | build | start to READY | first request / warm one |", "|---|---|---|---|"]
    for label, case in results["cases"].items():
        requests = (f"{case['first_s']:.1f} s / {case['warm_s']:.1f} s ({case['first_s'] / case['warm_s']:.2f}x)"
                    if "first_s" in case else "–")
        if len(case.get("starts", [])) > 1:
            label += f" (median of {len(case['starts'])} starts: " + ", ".join(
                f"{start['first_s'] / start['warm_s']:.2f}x" for start in case["starts"]) + ")"
        lines.append(f"| {label} | {case['build_s']:.1f} s | {case['ready_s']:.1f} s | {requests} |")
    memory = results["memory"]
    ours = results["cases"][f"ours, {FORMATS[0]}"]
    build_target = Target("build, s (1.5x the copy + 15 s)", "<=", 1.5 * results["copy_s"] + 15)
    lines += ["", "Two workers of the default archive: PSS " + ", ".join(f"{pss:.2f}" for pss in memory["worker_pss_gb"])
              + " GiB of RSS " + ", ".join(f"{rss:.2f}" for rss in memory["worker_rss_gb"])
              + f" GiB; the machine's memory in use grew {memory['second_worker_used_gb']:.2f} GiB for the second.",
              "", "| target (default archive) | result |", "|---|---|",
              f"| {build_target.name} | {build_target.verdict(ours['build_s'])} |",
              f"| {TARGETS['ready_s'].name} | {TARGETS['ready_s'].verdict(ours['ready_s'])} |",
              f"| {TARGETS['first_over_warm'].name} | {TARGETS['first_over_warm'].verdict(ours['first_s'] / ours['warm_s'])} |"]
    return lines

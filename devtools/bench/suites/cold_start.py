"""Full-size cold start on the CPU, in one run: SD 1.5's architecture (4.0 GiB of float32 safetensors,
random weights), from the build to the first image, for each way of building our archive, against the
same work done bare and against the pytorch/serve example. `bench.py --cold-start`, about 20 minutes and
12 GB of disk.

  bare          one Python process: import diffusers, from_pretrained from the same files, the same warm-up
                generation our workers run inside initialize: the least a worker can do. Run just before each
                start, and each start divided by its own: this VM's speed drifts by 20 % from minute to minute
  build         `python -m archiver build` end to end, in its own process; imports: a process that only
                imports what this build imports (the archiver, and huggingface_hub, which finds a hub id's
                snapshot in the cache), run just before it
  READY         TorchServe started until its worker is READY (our workers warm up inside that time)
  first / warm  the first request after READY, and the median of three after it (256x256, 1 step); the
                main case starts five times, and reports its median start
  disk          what the start wrote: the bytes under the server's own folder at READY (TorchServe unpacks
                an archive there; the worker's links and logs go there too); the build writes the archive
  memory        two workers of the main case's archive: each one's PSS and RSS, and how much the
                machine's memory in use grew for the second

The model sits in a Hugging Face cache laid out as a download leaves it (devtools/models/hub_cache.py, blobs
hard-linked to the saved pipeline's files), so the main case is what `python -m archiver build --source
<hub id>` does by default: reference the snapshot where it is.
"""

import os
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
from devtools.models.hub_cache import fill_hub_cache
from devtools.models.sd15 import build_sd15_random_pipeline

SIZE, STEPS = 256, 1
HUB_ID, COMMIT = "bench/sd15-random", "5d15000000000000000000000000000000000000"
MAIN = "ours, reference, HF cache"
# Each case: (source, build options); None as the source is the hub id, built from the cache offline.
CASES = {
    MAIN: (None, []),  # --weights auto
    "ours, reference, directory": ("directory", ["--weights", "reference"]),
    "ours, zip-store": ("directory", ["--weights", "pack", "--archive-format", "zip-store"]),
    "ours, no-archive": ("directory", ["--weights", "pack", "--archive-format", "no-archive"]),
    "ours, default (deflated)": ("directory", ["--weights", "pack", "--archive-format", "default"]),
}
MAIN_STARTS = 5  # this VM's speed drifts by 20 % from minute to minute: one first request is one sample of it
BODY = {"prompt": "a lighthouse", "output_format": "png"}
BARE = """
import sys, torch
from diffusers import DiffusionPipeline
pipeline = DiffusionPipeline.from_pretrained(sys.argv[1], dtype=torch.float32, use_safetensors=True)
pipeline.set_progress_bar_config(disable=True)
pipeline("warm-up", height=int(sys.argv[2]), width=int(sys.argv[2]), num_inference_steps=1, guidance_scale=7.5)
print("ready", flush=True)
"""


IMPORTS = "import archiver.cli; from huggingface_hub import snapshot_download; print('ready')"


def targets(imports_s: float, weights_bytes: int) -> dict[str, Target]:
    return {"build_s": Target(f"build, s (2 s + the archiver's imports, {imports_s:.1f} s)", "<=", 2 + imports_s),
            "ready_over_bare": Target("start to READY / bare, the median of each start over the bare run before it",
                                      "<=", 1.2),
            "first_over_warm": Target("first request / warm one", "<=", 1.2),
            "written_gb": Target("written at start, GiB (5 % of the weights)", "<=", 0.05 * weights_bytes / 2**30)}


def prepare_model(models_dir: Path) -> tuple[Path, Path]:
    """The saved pipeline, and the Hugging Face cache holding it as a snapshot (no second copy)."""
    pipeline_dir, cache = models_dir / "sd15-cpu-float32", models_dir / "hub"
    if not (pipeline_dir / "model_index.json").is_file():
        build_sd15_random_pipeline(models_dir / "sd15-work", "cpu", torch.float32).save_pretrained(
            pipeline_dir, safe_serialization=True)
    if not (cache / f"models--{HUB_ID.replace('/', '--')}" / "refs" / "main").is_file():
        fill_hub_cache(pipeline_dir, cache, HUB_ID, COMMIT)
    return pipeline_dir, cache


def until_ready(command: list[str]) -> float:
    """Wall time of a fresh process running command, from its start until it prints "ready" (a worker is
    READY before it exits: the bare process's exit, unmapping 4 GB, is no part of a start)."""
    started = time.perf_counter()
    with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout.readline().strip() == "ready", command
        elapsed = time.perf_counter() - started
        process.wait()
    return elapsed


def timed_build(store: Path, name: str, source: str, options: list[str], env: dict) -> float:
    """`python -m archiver build` in its own process, so its imports count."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "archiver", "build", "--source", source, "--model-name", name,
                    "--export-path", str(store), "--height", str(SIZE), "--width", str(SIZE), "--num-inference-steps",
                    str(STEPS), "--force", *options], cwd=REPO_ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def archive_file(store: Path, name: str) -> str:
    return name if (store / name).is_dir() else f"{name}.mar"


def archive_bytes(store: Path, name: str) -> int:
    path = store / archive_file(store, name)
    return path.stat().st_size if path.is_file() else sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def bytes_under(folder: Path) -> int:
    """What the files under folder hold, links not followed: a link to the weights is not a copy of them."""
    return sum(os.lstat(Path(root) / name).st_size for root, _, files in os.walk(folder) for name in files)


def serve_once(workdir: Path, store: Path, name: str, requests_too: bool) -> dict:
    started = time.perf_counter()
    with TorchServe(workdir, store, {name: archive_file(store, name)}).start(900) as server:
        result = {"ready_s": time.perf_counter() - started, "written_bytes": bytes_under(workdir)}
        if requests_too:
            send = lambda seed: server.predict(name, json={**BODY, "seed": seed}, timeout=600)  # noqa: E731
            result["first_s"] = timed(lambda: send(0))
            result["warm_s"] = statistics.median(timed(lambda seed=seed: send(seed)) for seed in (1, 2, 3))
    shutil.rmtree(workdir, ignore_errors=True)  # TorchServe's unpacked copy: the next case starts on a clean disk
    return result


def measure_case(workdir: Path, store: Path, name: str, source: str, options: list[str], env: dict, starts: int,
                 bare: list[str]) -> dict:
    imports_s = until_ready([sys.executable, "-c", IMPORTS])
    build_s = timed_build(store, name, source, options, env)
    runs = []
    for index in range(starts):
        bare_s = until_ready(bare)
        runs.append({**serve_once(workdir / f"ts-{name}-{index}", store, name, requests_too=True), "bare_s": bare_s})
    middle = sorted(runs, key=lambda start: start["first_s"] / start["warm_s"])[len(runs) // 2]
    archive = archive_bytes(store, name)
    return {**middle, "build_s": build_s, "imports_s": imports_s, "starts": runs, "archive_bytes": archive,
            "ready_s": statistics.median(start["ready_s"] for start in runs),
            "bare_s": statistics.median(start["bare_s"] for start in runs),
            "ready_over_bare": statistics.median(start["ready_s"] / start["bare_s"] for start in runs),
            "written_gb": statistics.median(start["written_bytes"] for start in runs) / 2**30}


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
    pipeline_dir, cache = prepare_model(models_dir)
    weights = sum(path.stat().st_size for path in pipeline_dir.rglob("*.safetensors"))
    log(f"SD 1.5 architecture, random weights: {weights / 2**30:.2f} GiB of safetensors in {pipeline_dir}")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    results = {"weights_bytes": weights, "cases": {}}
    bare = [sys.executable, "-c", BARE, str(pipeline_dir), str(SIZE)]
    store = workdir / "cold-store"
    for index, (label, (source, options)) in enumerate(CASES.items()):
        source_text = HUB_ID if source is None else str(pipeline_dir)
        results["cases"][label] = measure_case(workdir, store, f"sd15_{index}", source_text, options, env,
                                               MAIN_STARTS if label == MAIN else 1, bare)
        log(f"{label}: {results['cases'][label]}")
    started = time.perf_counter()
    example = build_example(store, "example", pipeline_dir, num_inference_steps=STEPS, height=SIZE, width=SIZE)
    build_s, bare_s = time.perf_counter() - started, until_ready(bare)
    served = serve_once(workdir / "ts-example", store, example.removesuffix(".mar"), False)
    results["cases"]["pytorch/serve example"] = {"build_s": build_s, **served, "bare_s": bare_s,
                                                 "ready_over_bare": served["ready_s"] / bare_s}
    results["memory"] = two_workers_memory(workdir, store, "sd15_0")
    return results


def ratios(case: dict) -> dict:
    return {"build_s": case["build_s"], "ready_over_bare": case["ready_over_bare"],
            "first_over_warm": case["first_s"] / case["warm_s"] if "first_s" in case else None,
            "written_gb": case.get("written_gb")}


def markdown(results: dict) -> list[str]:
    lines = [f"SD 1.5 architecture, {results['weights_bytes'] / 2**30:.1f} GiB of float32 safetensors (random weights), "
             f"this CPU, {SIZE}x{SIZE}, {STEPS} step. Bare: import, from_pretrained and the warm-up generation in one "
             "process, run just before each start.", "",
             "| | build | start to READY (bare; ratio) | first request / warm one | archive | written at start |",
             "|---|---|---|---|---|---|"]
    for label, case in results["cases"].items():
        derived = ratios(case)
        requests = (f"{case['first_s']:.1f} s / {case['warm_s']:.1f} s ({derived['first_over_warm']:.2f}x)"
                    if "first_s" in case else "–")
        if len(case.get("starts", [])) > 1:
            label += f" (median of {len(case['starts'])} starts: " + ", ".join(
                f"{start['first_s'] / start['warm_s']:.2f}x" for start in case["starts"]) + ")"
        archive = f"{case['archive_bytes'] / 2**20:.1f} MiB" if "archive_bytes" in case else "–"
        disk = f"{case['written_gb']:.2f} GiB" if "written_gb" in case else "–"
        lines.append(f"| {label} | {case['build_s']:.1f} s | {case['ready_s']:.1f} s ({case['bare_s']:.1f} s; "
                     f"{derived['ready_over_bare']:.2f}x) "
                     f"| {requests} | {archive} | {disk} |")
    memory = results["memory"]
    lines += ["", f"Two workers of `{MAIN}`: PSS " + ", ".join(f"{pss:.2f}" for pss in memory["worker_pss_gb"])
              + " GiB of RSS " + ", ".join(f"{rss:.2f}" for rss in memory["worker_rss_gb"])
              + f" GiB; the machine's memory in use grew {memory['second_worker_used_gb']:.2f} GiB for the second.", ""]
    goals = targets(results["cases"][MAIN]["imports_s"], results["weights_bytes"])
    derived = ratios(results["cases"][MAIN])
    lines += [f"| target (`{MAIN}`) | result |", "|---|---|",
              *(f"| {target.name} | {target.verdict(derived[key])} |" for key, target in goals.items())]
    return lines

#!/usr/bin/env python3
"""Benchmark our handler against the pytorch/serve example (the baseline) and the bare pipeline.

Everything is measured in one run, on one model (the tiny SD-shaped pipeline) and one machine,
and every figure is printed with its ratios ours/baseline and ours/bare. Results go to --out as
results.json, results.csv, results.md and results.png.

  python scripts/bench.py --quick     # under 3 minutes on a 2-core CPU
  python scripts/bench.py             # larger images, more requests
  python scripts/bench.py --gpu --model sd15 --part ladder   # the GPU plan: see scripts/gpu_bench.py
  python scripts/bench.py --gpu --dry-run                    # the whole GPU plan on the CPU, tiny model
  python scripts/bench.py --cold-start                       # full-size SD 1.5 on the CPU: build to first image
"""

import argparse
import csv
import io
import json
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from archiver.build import REPO_ROOT, ServingConfig, build_archive  # noqa: E402
from archiver.cli import main as archiver_main  # noqa: E402
from devtools.harness.torchserve import TorchServe  # noqa: E402
from devtools.models.tiny import build_tiny_pipeline  # noqa: E402
import bentoml_bench  # noqa: E402  (beside this script)
import ray_bench  # noqa: E402  (beside this script)
import cold_start_bench  # noqa: E402
import gpu_bench  # noqa: E402
from handlers.core.codecs import encode_response  # noqa: E402
from handlers.core.pipelines import load_pipeline  # noqa: E402
from handlers.core.request import GenerationRequest  # noqa: E402

BASELINE_HANDLER = REPO_ROOT / "scripts" / "baseline" / "baseline_handler.py"
PROMPT = "a photo of an astronaut riding a horse on mars"
TARGETS = {
    "png_body_vs_baseline": ("<=", 0.10),
    "encode_speedup_vs_baseline": (">=", 10.0),
    "compat_body_vs_baseline": ("<=", 0.50),
    "overhead_vs_bare": ("<=", 0.05),
    "throughput_c8_vs_baseline": (">=", 2.0),
    "scale_up_vs_baseline": ("<=", 0.50),
}


@dataclass
class Plan:
    size: int  # image side for the load and overhead runs
    load_steps: int  # denoising steps in the load runs
    overhead_steps: int  # the serving-overhead comparison runs at 50 steps
    requests_per_level: int
    encode_repeats: int
    dtype: str = "float32"


QUICK = Plan(size=64, load_steps=4, overhead_steps=50, requests_per_level=8, encode_repeats=3)
FULL = Plan(size=128, load_steps=20, overhead_steps=50, requests_per_level=24, encode_repeats=5)


def median_seconds(call, repeats: int, warm_up: bool = True) -> float:
    """Median wall time of call(); the warm-up run absorbs first-call costs (compilation, caches)."""
    if warm_up:
        call()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- archives


def build_archives(workdir: Path, pipeline_dir: Path, plan: Plan) -> Path:
    """Ours (zip and no-archive, batchSize 1 and 4) and the baseline (zip-in-zip), one model store."""
    store = workdir / "model-store"
    handler_defaults = {
        "height": plan.size, "width": plan.size, "num_inference_steps": plan.load_steps, "torch_dtype": plan.dtype
    }
    for name, batch_size, archive_format, batching in (
        ("ours_b1", 1, "zip-store", "auto"),
        ("ours_b4", 4, "zip-store", "combined"),
        ("ours_noarchive", 1, "no-archive", "auto"),
    ):
        serving = ServingConfig(batch_size=batch_size, max_batch_delay_ms=50, handler={**handler_defaults, "batching": batching})
        stage = workdir / f"stage-{name}"
        stage.mkdir()
        build_archive(pipeline_dir, name, store, serving, stage, archive_format=archive_format)
    model_zip = workdir / "model.zip"
    with zipfile.ZipFile(model_zip, "w") as archive:
        for path in sorted(pipeline_dir.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(pipeline_dir).as_posix())
    for name, batch_size in (("baseline_b1", 1), ("baseline_b4", 4)):
        build_baseline_archive(workdir, store, name, batch_size, model_zip, plan)
    return store


def build_baseline_archive(workdir: Path, store: Path, name: str, batch_size: int, model_zip: Path, plan: Plan) -> None:
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    handler = workdir / f"{name}_handler.py"
    fixed = f"dict(guidance_scale=7.5, num_inference_steps={plan.load_steps}, height={plan.size}, width={plan.size})"
    source = BASELINE_HANDLER.read_text()
    handler.write_text(source.replace("dict(guidance_scale=7.5, num_inference_steps=50, height=768, width=768)", fixed))
    config = workdir / f"{name}-config.yaml"
    config.write_text(yaml.safe_dump({"minWorkers": 1, "maxWorkers": 1, "batchSize": batch_size, "maxBatchDelay": 50,
                                      "responseTimeout": 600, "startupTimeout": 600}))
    generate_model_archive(ModelArchiverConfig(
        model_name=name, handler=str(handler), version="1.0", extra_files=str(model_zip),
        export_path=str(store), force=True, config_file=str(config),
    ))


# ---------------------------------------------------------------- measurements


def measure_encoding(pipeline, plan: Plan) -> dict:
    """Server-side encode time and body bytes for one 768x768 image."""
    side = 768
    image = pipeline(PROMPT, height=side, width=side, num_inference_steps=2,
                     generator=torch.Generator().manual_seed(0)).images[0]

    def baseline_encode():
        # What TorchServe does with the baseline's list: json.dumps(..., indent=2).
        return json.dumps(np.array(image).tolist(), indent=2).encode()

    def ours(output_format):
        request = GenerationRequest(prompt=PROMPT, height=side, width=side, seed=0, output_format=output_format)
        def encode():
            body, _ = encode_response(request, [image])
            return body.encode() if isinstance(body, str) else body
        return encode

    results = {"encode_side": side}
    for name, encode in (("baseline", baseline_encode), ("numpy", ours("numpy")), ("png", ours("png")), ("jpeg", ours("jpeg"))):
        results[f"encode_s_{name}"] = median_seconds(encode, plan.encode_repeats, warm_up=False)
        results[f"body_bytes_{name}"] = len(encode())
    return results


def start_server(workdir: Path, store: Path, models: dict[str, str], label: str) -> tuple[TorchServe, float]:
    server = TorchServe(workdir / f"ts-{label}", store, models, extra_config={"max_response_size": str(200 * 2**20)})
    started = time.perf_counter()
    server.start(timeout_s=600)
    return server, time.perf_counter() - started


def scale_time(server: TorchServe, model: str, workers: int) -> float:
    started = time.perf_counter()
    server.scale(model, workers).raise_for_status()
    return time.perf_counter() - started


def measure_cold_start(workdir: Path, store: Path) -> dict:
    results = {}
    for label, archive in (("ours_zip", "ours_b1.mar"), ("ours_noarchive", "ours_noarchive"), ("baseline", "baseline_b1.mar")):
        model = archive.removesuffix(".mar")
        server, startup = start_server(workdir, store, {model: archive}, f"cold-{label}")
        try:
            results[f"cold_start_s_{label}"] = startup
            results[f"scale_up_s_{label}"] = scale_time(server, model, 2)
        finally:
            server.stop()
        log(f"cold start {label}: {startup:.1f} s to READY, {results[f'scale_up_s_{label}']:.1f} s from 1 to 2 workers")
    return results


def ours_body(plan: Plan, steps: int, output_format: str = "numpy") -> dict:
    return {"prompt": PROMPT, "height": plan.size, "width": plan.size, "num_inference_steps": steps, "output_format": output_format}


def run_load(server: TorchServe, model: str, concurrency: int, count: int, request_kwargs) -> dict:
    latencies, sizes = [], []
    lock = threading.Lock()

    def one(index):
        started = time.perf_counter()
        response = server.predict(model, **request_kwargs(index))
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        with lock:
            latencies.append(elapsed)
            sizes.append(len(response.content))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "p50_s": latencies[len(latencies) // 2],
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "throughput_rps": count / wall,
        "body_bytes": statistics.median(sizes),
    }


def measure_load(server: TorchServe, plan: Plan) -> dict:
    results = {}
    kinds = {
        "ours": lambda index: {"json": {**ours_body(plan, plan.load_steps), "seed": index}},
        "baseline": lambda index: {"data": PROMPT.encode()},
    }
    for batch_size in (1, 4):
        for concurrency in (1, 4, 8):
            count = max(plan.requests_per_level, 2 * concurrency)
            for kind, request_kwargs in kinds.items():
                model = f"{kind}_b{batch_size}"
                figures = run_load(server, model, concurrency, count, request_kwargs)
                for key, value in figures.items():
                    results[f"{key}_{kind}_b{batch_size}_c{concurrency}"] = value
                log(f"{model} c={concurrency}: p50 {figures['p50_s']:.3f} s, p95 {figures['p95_s']:.3f} s, "
                    f"{figures['throughput_rps']:.2f} req/s")
    return results


# Not 0: TorchServe 0.12.0 takes a maxBatchDelay of 0 as unset and waits its default 100 ms.
BATCH_DELAYS_MS = (1, 2, 4, 25, 100)
C8_REPEATS = 5  # throughput at concurrency 8 varies by about 10 % run to run on 2 cores


def measure_batch_delay(workdir: Path, count: int) -> dict:
    """serve.sh's archive (digits, batchSize 4) at each maxBatchDelay: the wait of a lone request
    (TorchServe's own "Waiting time ns"), its latency at 1 and 25 steps, and throughput at concurrency 8.

    The concurrency-8 runs go round-robin over the delays, C8_REPEATS times, so that drift in the
    machine's speed falls on every delay alike; each delay's figure is its median.
    """
    store = workdir / "delay-store"
    for delay in BATCH_DELAYS_MS:
        assert archiver_main([
            "build", "--source", "digits", "--model-name", f"delay_{delay}", "--export-path", str(store),
            "--archive-format", "no-archive", "--batch-size", "4", "--max-batch-delay", str(delay),
        ]) == 0
    server, _ = start_server(workdir, store, {f"delay_{delay}": f"delay_{delay}" for delay in BATCH_DELAYS_MS}, "delay")
    results = {}
    try:
        for delay in BATCH_DELAYS_MS:
            model = f"delay_{delay}"
            for steps in (1, 25):
                log_start = server_log_size(server)
                figures = run_load(server, model, 1, count, digits_request(steps))
                results[f"delay_p50_s_{delay}ms_c1_{steps}steps"] = figures["p50_s"]
                if steps == 1:
                    results[f"delay_lone_wait_s_{delay}ms"] = statistics.median(waiting_times(server, model, log_start))
        throughputs = {delay: [] for delay in BATCH_DELAYS_MS}
        batches = {delay: [] for delay in BATCH_DELAYS_MS}
        for _ in range(C8_REPEATS):
            for delay in BATCH_DELAYS_MS:
                batches_start = model_log_size(server)
                throughputs[delay].append(run_load(server, f"delay_{delay}", 8, 2 * count, digits_request(25))["throughput_rps"])
                batches[delay] += batch_sizes(server, batches_start)
        for delay in BATCH_DELAYS_MS:
            results[f"delay_rps_{delay}ms_c8"] = statistics.median(throughputs[delay])
            results[f"delay_mean_batch_{delay}ms_c8"] = statistics.mean(batches[delay])
            log(f"maxBatchDelay {delay} ms: lone wait {results[f'delay_lone_wait_s_{delay}ms'] * 1000:.1f} ms, "
                f"c=1 p50 {results[f'delay_p50_s_{delay}ms_c1_1steps'] * 1000:.0f} ms (1 step) / "
                f"{results[f'delay_p50_s_{delay}ms_c1_25steps'] * 1000:.0f} ms (25 steps), c=8 "
                f"{', '.join(f'{value:.2f}' for value in throughputs[delay])} req/s, "
                f"mean batch {results[f'delay_mean_batch_{delay}ms_c8']:.2f}")
    finally:
        server.stop()
    return results


def measure_compile_scale(workdir: Path) -> dict:
    """Scaling from 1 to 2 workers, eager against torch.compile, on serve.sh's model: the new compiled
    worker should load the first worker's graphs from inductor's cache instead of compiling them."""
    store = workdir / "compile-store"
    variants = {
        "eager": [],
        "compiled": ["--set", "torch_compile=true"],
        "regions": ["--set", "torch_compile=true", "--set", "compile_regions=true"],
    }
    for name, options in variants.items():
        assert archiver_main(["build", "--source", "digits", "--model-name", name, "--export-path", str(store),
                              "--archive-format", "no-archive", *options]) == 0
    server, _ = start_server(workdir, store, {name: name for name in variants}, "compile")
    try:
        results = {}
        for name in variants:
            log_start = model_log_size(server)
            results[f"compile_scale_s_{name}"] = scale_time(server, name, 2)
            if name == "eager":
                continue
            with open(server.workdir / "logs" / "model_log.log", "rb") as stream:
                stream.seek(log_start)
                text = stream.read().decode(errors="replace")
            [(seconds, compiled, loaded)] = re.findall(
                r"warm-up generation took ([\d.]+) s: (\d+) graphs compiled, (\d+) loaded", text)
            results |= {f"compile_warm_up_s_{name}": float(seconds), f"compile_graphs_new_worker_{name}": int(compiled),
                        f"compile_loaded_new_worker_{name}": int(loaded),
                        f"compile_scale_vs_eager_{name}": results[f"compile_scale_s_{name}"] / results["compile_scale_s_eager"]}
            log(f"scale 1 to 2 workers, {name}: {results[f'compile_scale_s_{name}']:.1f} s against eager's "
                f"{results['compile_scale_s_eager']:.1f} s ({results[f'compile_scale_vs_eager_{name}']:.2f}x); the new "
                f"worker's warm-up took {seconds} s: {compiled} graphs compiled, {loaded} loaded from the cache")
        return results
    finally:
        server.stop()


# The digits model's default is DDIM at 25 steps; each setting is a request's fields or a handler option.
SPEED_SAMPLERS = {
    "DDIM 25 (default)": {},
    **{f"DPM++ 2M {steps}": {"scheduler": "dpmpp_2m", "num_inference_steps": steps} for steps in (2, 3, 4, 6, 10, 15)},
    **{f"UniPC {steps}": {"scheduler": "unipc", "num_inference_steps": steps} for steps in (4, 6, 10)},
    **{f"Euler {steps}": {"scheduler": "euler", "num_inference_steps": steps} for steps in (4, 8, 15)},
}
SPEED_OPTIONS = {
    "attention slicing": {"attention_slicing": "auto"},
    "VAE slicing": {"vae_slicing": True},
    "channels_last": {"channels_last": True},
    "fused QKV": {"fuse_qkv_projections": True},
    "bfloat16": {"torch_dtype": "bfloat16"},
    "torch.compile": {"torch_compile": True},
    "torch.compile, regions": {"torch_compile": True, "compile_regions": True},
    "torch.compile + DPM++ 2M 4": {"torch_compile": True, "scheduler": "dpmpp_2m", "num_inference_steps": 4},
}
SPEED_TARGET = (0.9, 0.25)  # accuracy at least, time per image at most this share of the default's


def measure_speed_settings(workdir: Path, count: int) -> dict:
    """Time per image end to end (c=1, through TorchServe, serve.sh's archive settings) and digits accuracy, per setting."""
    from devtools.models.digits import DigitsOracle

    store = workdir / "speed-store"
    archives = {"speed_default": {}}
    archives |= {f"speed_option_{index}": option for index, option in enumerate(SPEED_OPTIONS.values())}
    for name, option in archives.items():
        options = [argument for key, value in option.items() for argument in ("--set", f"{key}={json.dumps(value)}")]
        assert archiver_main(["build", "--source", "digits", "--model-name", name, "--export-path", str(store),
                              "--archive-format", "no-archive", "--batch-size", "4", *options]) == 0
    oracle = DigitsOracle()
    settings = {label: ("speed_default", fields) for label, fields in SPEED_SAMPLERS.items()}
    settings |= {label: (f"speed_option_{index}", {}) for index, label in enumerate(SPEED_OPTIONS)}
    server, _ = start_server(workdir, store, {name: name for name in archives}, "speed")
    results = {}
    try:
        for label, (model, fields) in settings.items():
            latencies, images = [], []
            for index in range(count):
                body = {"prompt": f"digit {index % 10}", "seed": 500 + index, "output_format": "png", **fields}
                started = time.perf_counter()
                response = server.predict(model, json=body)
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()
                images.append(Image.open(io.BytesIO(response.content)))
            labels = oracle.labels(images)
            results[f"speed_s_per_image_{label}"] = statistics.median(latencies)
            results[f"speed_accuracy_{label}"] = sum(predicted == index % 10 for index, predicted in enumerate(labels)) / count
            log(f"{label}: {results[f'speed_s_per_image_{label}'] * 1000:.0f} ms per image, "
                f"accuracy {results[f'speed_accuracy_{label}']:.0%}")
    finally:
        server.stop()
    return results


def speed_verdict(results: dict) -> str:
    """The fastest setting that keeps the target accuracy, against the default's time."""
    accuracy_floor, time_share = SPEED_TARGET
    default = results["speed_s_per_image_DDIM 25 (default)"]
    labels = [key.removeprefix("speed_accuracy_") for key in results if key.startswith("speed_accuracy_")]
    keeping = [label for label in labels if results[f"speed_accuracy_{label}"] >= accuracy_floor]
    if not keeping:
        return f"MISSED: no setting keeps {accuracy_floor:.0%} accuracy"
    fastest = min(keeping, key=lambda label: results[f"speed_s_per_image_{label}"])
    share = results[f"speed_s_per_image_{fastest}"] / default
    met = "met" if share <= time_share else "MISSED"
    return (f"{met}: {fastest} keeps {results[f'speed_accuracy_{fastest}']:.0%} accuracy at {share:.2f} of the "
            f"default's time per image (target: >= {accuracy_floor:.0%} at <= {time_share})")


def markdown_speed(results: dict) -> list[str]:
    default = results["speed_s_per_image_DDIM 25 (default)"]
    lines = ["| setting | time per image (c=1, end to end) | share of default | digits accuracy |", "|---|---|---|---|"]
    for label in [*SPEED_SAMPLERS, *SPEED_OPTIONS]:
        seconds = results[f"speed_s_per_image_{label}"]
        lines.append(f"| {label} | {seconds * 1000:.0f} ms | {seconds / default:.2f} | {results[f'speed_accuracy_{label}']:.0%} |")
    return [*lines, "", speed_verdict(results)]


def save_speed_plot(results: dict, path: Path) -> str:
    try:
        import matplotlib
    except ImportError:
        return f"no {path.name}: matplotlib is missing (pip install -e '.[bench]')"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 6))
    for label in [*SPEED_SAMPLERS, *SPEED_OPTIONS]:
        x, y = results[f"speed_s_per_image_{label}"] * 1000, results[f"speed_accuracy_{label}"] * 100
        axes.scatter(x, y, color="C1" if label in SPEED_OPTIONS else "C0")
        # Most settings keep every digit, so their labels share one line: slant them apart.
        axes.annotate(label, (x, y), fontsize=7, xytext=(2, 4), textcoords="offset points", rotation=60)
    accuracy_floor, time_share = SPEED_TARGET
    axes.axhline(accuracy_floor * 100, color="grey", linestyle=":")
    axes.axvline(results["speed_s_per_image_DDIM 25 (default)"] * 1000 * time_share, color="grey", linestyle=":")
    axes.set_xlabel("time per image, ms (end to end through TorchServe, concurrency 1)")
    axes.set_ylabel("digits accuracy, %")
    axes.set_ylim(top=112)  # room for the slanted labels
    axes.set_title("Speed settings on the digits model: faster should not mean wrong")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return f"plot in {path}"


def digits_request(steps: int):
    return lambda index: {"json": {"prompt": f"digit {index % 10}", "seed": index, "num_inference_steps": steps,
                                   "output_format": "png"}}


def server_log_size(server: TorchServe) -> int:
    log_file = server.workdir / "logs" / "ts_log.log"
    return log_file.stat().st_size if log_file.exists() else 0


def model_log_size(server: TorchServe) -> int:
    log_file = server.workdir / "logs" / "model_log.log"
    return log_file.stat().st_size if log_file.exists() else 0


def batch_sizes(server: TorchServe, since: int) -> list[int]:
    """The size of every batch the handler received since the offset (its "batch of N requests" lines)."""
    with open(server.workdir / "logs" / "model_log.log", "rb") as stream:
        stream.seek(since)
        text = stream.read().decode(errors="replace")
    return [int(size) for size in re.findall(r"batch of (\d+) requests", text)]


def waiting_times(server: TorchServe, model: str, since: int) -> list[float]:
    """Seconds each request waited between arrival and its batch going to the worker (queue + batch wait)."""
    with open(server.workdir / "logs" / "ts_log.log", "rb") as stream:
        stream.seek(since)
        text = stream.read().decode(errors="replace")
    pattern = rf"W-\d+-{re.escape(model)}_[\d.]+ \S+ - Waiting time ns: (\d+)"
    return [int(nanoseconds) / 1e9 for nanoseconds in re.findall(pattern, text)]


def measure_end_to_end_bodies(server: TorchServe, plan: Plan) -> dict:
    results = {}
    for output_format in ("numpy", "png", "jpeg"):
        response = server.predict("ours_b1", json=ours_body(plan, plan.load_steps, output_format))
        response.raise_for_status()
        results[f"e2e_body_bytes_{output_format}"] = len(response.content)
    response = server.predict("baseline_b1", data=PROMPT.encode())
    response.raise_for_status()
    results["e2e_body_bytes_baseline"] = len(response.content)
    return results


def measure_overhead(server: TorchServe, pipeline, plan: Plan) -> dict:
    """End-to-end latency over a bare in-process pipeline call, both at 50 steps, median of 7."""
    def bare():
        pipeline(PROMPT, height=plan.size, width=plan.size, num_inference_steps=plan.overhead_steps,
                 generator=torch.Generator().manual_seed(0))

    def served():
        response = server.predict("ours_b1", json={**ours_body(plan, plan.overhead_steps, "png"), "seed": 0})
        response.raise_for_status()

    return {f"latency_50_steps_s_{name}": median_seconds(call, 7) for name, call in (("bare", bare), ("served", served))}


def peak_rss(server: TorchServe, models: list[str]) -> dict:
    """Peak resident memory (VmHWM) of each model's worker processes."""
    results = {}
    for model in models:
        peaks = [peak for worker in server.describe(model)["workers"] if (peak := gpu_bench.worker_hwm(worker["pid"]))]
        results[f"peak_rss_bytes_{model}"] = max(peaks) if peaks else None
    return results


# ---------------------------------------------------------------- report


def ratios(results: dict) -> dict:
    def ratio(numerator, denominator):
        top, bottom = results.get(numerator), results.get(denominator)
        return top / bottom if top is not None and bottom else None

    derived = {
        "png_body_vs_baseline": ratio("body_bytes_png", "body_bytes_baseline"),
        "jpeg_body_vs_baseline": ratio("body_bytes_jpeg", "body_bytes_baseline"),
        "compat_body_vs_baseline": ratio("body_bytes_numpy", "body_bytes_baseline"),
        "encode_speedup_vs_baseline": ratio("encode_s_baseline", "encode_s_png"),
        "compat_encode_speedup_vs_baseline": ratio("encode_s_baseline", "encode_s_numpy"),
        "overhead_vs_bare": (ratio("latency_50_steps_s_served", "latency_50_steps_s_bare") or 1.0) - 1.0,
        "throughput_c8_vs_baseline": ratio("throughput_rps_ours_b4_c8", "throughput_rps_baseline_b1_c8"),
        "throughput_c8_b1_vs_baseline": ratio("throughput_rps_ours_b1_c8", "throughput_rps_baseline_b1_c8"),
        "scale_up_vs_baseline": ratio("scale_up_s_ours_zip", "scale_up_s_baseline"),
        "cold_start_zip_vs_baseline": ratio("cold_start_s_ours_zip", "cold_start_s_baseline"),
        "cold_start_noarchive_vs_baseline": ratio("cold_start_s_ours_noarchive", "cold_start_s_baseline"),
        "peak_rss_vs_baseline": ratio("peak_rss_bytes_ours_b1", "peak_rss_bytes_baseline_b1"),
    }
    for batch_size in (1, 4):
        for concurrency in (1, 4, 8):
            suffix = f"b{batch_size}_c{concurrency}"
            derived[f"p50_{suffix}_vs_baseline"] = ratio(f"p50_s_ours_{suffix}", f"p50_s_baseline_{suffix}")
            derived[f"throughput_{suffix}_vs_baseline"] = ratio(f"throughput_rps_ours_{suffix}", f"throughput_rps_baseline_{suffix}")
    return derived


def verdicts(derived: dict) -> dict:
    out = {}
    for name, (direction, bound) in TARGETS.items():
        value = derived.get(name)
        if value is None:
            out[name] = "not measured"
        else:
            met = value <= bound if direction == "<=" else value >= bound
            out[name] = f"{'met' if met else 'MISSED'} ({value:.3g} {direction} {bound})"
    return out


def markdown(results: dict, derived: dict, plan: Plan, machine: str) -> str:
    def fmt(value, unit=""):
        if value is None:
            return "-"
        if unit == "MB":
            return f"{value / 1e6:.2f} MB"
        if unit == "ms":
            return f"{value * 1000:.1f} ms"
        if unit == "s":
            return f"{value:.2f} s"
        return f"{value:.3g}"

    side = results["encode_side"]
    lines = [
        f"Machine: {machine}. Model: tiny SD-shaped pipeline (random weights, 8x VAE). "
        f"Load runs: {plan.size}x{plan.size}, {plan.load_steps} steps, {plan.requests_per_level}+ requests per level.",
        "",
        f"| per {side}x{side} image (encode only) | body | encode time | body ours/baseline | encode speedup vs baseline |",
        "|---|---|---|---|---|",
        f"| baseline (`tolist()`, indent=2) | {fmt(results['body_bytes_baseline'], 'MB')} | {fmt(results['encode_s_baseline'], 'ms')} | 1 | 1 |",
    ]
    for name in ("numpy", "png", "jpeg"):
        lines.append(
            f"| ours {name} | {fmt(results[f'body_bytes_{name}'], 'MB')} | {fmt(results[f'encode_s_{name}'], 'ms')} | "
            f"{fmt(results[f'body_bytes_{name}'] / results['body_bytes_baseline'])} | "
            f"{fmt(results['encode_s_baseline'] / results[f'encode_s_{name}'])} |"
        )
    lines += [
        "",
        f"| end to end, {plan.size}x{plan.size} | body | ours/baseline |",
        "|---|---|---|",
        f"| baseline | {fmt(results['e2e_body_bytes_baseline'], 'MB')} | 1 |",
    ]
    for name in ("numpy", "png", "jpeg"):
        lines.append(f"| ours {name} | {fmt(results[f'e2e_body_bytes_{name}'], 'MB')} | "
                     f"{fmt(results[f'e2e_body_bytes_{name}'] / results['e2e_body_bytes_baseline'])} |")
    lines += [
        "",
        "| batchSize | concurrency | p50 ours / baseline | p95 ours / baseline | req/s ours / baseline | p50 ratio | req/s ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch_size in (1, 4):
        for concurrency in (1, 4, 8):
            s = f"b{batch_size}_c{concurrency}"
            lines.append(
                f"| {batch_size} | {concurrency} | {fmt(results[f'p50_s_ours_{s}'], 's')} / {fmt(results[f'p50_s_baseline_{s}'], 's')} | "
                f"{fmt(results[f'p95_s_ours_{s}'], 's')} / {fmt(results[f'p95_s_baseline_{s}'], 's')} | "
                f"{fmt(results[f'throughput_rps_ours_{s}'])} / {fmt(results[f'throughput_rps_baseline_{s}'])} | "
                f"{fmt(derived[f'p50_{s}_vs_baseline'])} | {fmt(derived[f'throughput_{s}_vs_baseline'])} |"
            )
    lines += [
        "",
        "| serving overhead, 50 steps | latency | ours/bare |",
        "|---|---|---|",
        f"| bare pipeline call | {fmt(results['latency_50_steps_s_bare'], 's')} | 1 |",
        f"| ours, end to end (png) | {fmt(results['latency_50_steps_s_served'], 's')} | "
        f"{fmt(1 + derived['overhead_vs_bare'])} |",
        "",
        "| cold start | start to READY | scale 1 to 2 workers | start ours/baseline | scale ours/baseline |",
        "|---|---|---|---|---|",
    ]
    for label in ("baseline", "ours_zip", "ours_noarchive"):
        lines.append(
            f"| {label} | {fmt(results[f'cold_start_s_{label}'], 's')} | {fmt(results[f'scale_up_s_{label}'], 's')} | "
            f"{fmt(results[f'cold_start_s_{label}'] / results['cold_start_s_baseline'])} | "
            f"{fmt(results[f'scale_up_s_{label}'] / results['scale_up_s_baseline'])} |"
        )
    lines += ["", "| peak RSS per worker | bytes | ours/baseline |", "|---|---|---|"]
    for model in ("baseline_b1", "ours_b1", "ours_b4"):
        value = results.get(f"peak_rss_bytes_{model}")
        base = results.get("peak_rss_bytes_baseline_b1")
        lines.append(f"| {model} | {fmt(value, 'MB')} | {fmt(value / base if value and base else None)} |")
    lines += ["", *markdown_targets(derived)]
    return "\n".join(lines) + "\n"


def markdown_batch_delay(results: dict) -> list[str]:
    lines = [
        "| maxBatchDelay | lone request's wait | c=1 p50, 1 step | c=1 p50, 25 steps | c=8 req/s, 25 steps | c=8 vs 100 ms | mean batch at c=8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for delay in BATCH_DELAYS_MS:
        lines.append(
            f"| {delay} ms | {results[f'delay_lone_wait_s_{delay}ms'] * 1000:.1f} ms | "
            f"{results[f'delay_p50_s_{delay}ms_c1_1steps'] * 1000:.0f} ms | {results[f'delay_p50_s_{delay}ms_c1_25steps'] * 1000:.0f} ms | "
            f"{results[f'delay_rps_{delay}ms_c8']:.2f} | {results[f'delay_rps_{delay}ms_c8'] / results['delay_rps_100ms_c8']:.3f} | "
            f"{results[f'delay_mean_batch_{delay}ms_c8']:.2f} |"
        )
    return lines


def markdown_targets(derived: dict) -> list[str]:
    lines = ["| target | result |", "|---|---|"]
    lines += [f"| {name} | {verdict} |" for name, verdict in verdicts(derived).items()]
    # The throughput target sets our batchSize 4 against the example's batchSize 1; the same batch
    # size on both sides shows what our handler, rather than batching itself, adds.
    same_batch = derived.get("throughput_b4_c8_vs_baseline")
    lines.append(
        "| throughput at concurrency 8, both at batchSize 4 (reported beside the target) | "
        f"{'-' if same_batch is None else f'{same_batch:.3g}'} |"
    )
    return lines


def save_plot(results: dict, path: Path) -> str:
    """Draw the figures into path; without the bench extra, say how to get them rather than fail after the run."""
    try:
        import matplotlib
    except ImportError:
        return f"no {path.name}: matplotlib is missing (pip install -e '.[bench]'); the tables and data are written"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bodies, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["baseline", "numpy", "png", "jpeg"]
    bodies.bar(names, [results[f"body_bytes_{name}"] / 1e6 for name in names], color=["grey", "C0", "C1", "C2"])
    bodies.set_ylabel("MB per image")
    bodies.set_title(f"Response body, {results['encode_side']}x{results['encode_side']}")
    levels = [1, 4, 8]
    for offset, (kind, batch_size) in enumerate((("baseline", 1), ("baseline", 4), ("ours", 1), ("ours", 4))):
        values = [results[f"throughput_rps_{kind}_b{batch_size}_c{level}"] for level in levels]
        throughput.bar(np.arange(3) + offset * 0.2, values, width=0.2, label=f"{kind} batchSize {batch_size}")
    throughput.set_xticks(np.arange(3) + 0.3, [f"concurrency {level}" for level in levels])
    throughput.set_ylabel("requests / s")
    throughput.set_title("Throughput")
    throughput.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return f"plot in {path}"


def machine_description() -> str:
    import os
    import platform

    return f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, Python {platform.python_version()}"


# ---------------------------------------------------------------- main


def build_model(workdir: Path) -> Path:
    pipeline_dir = workdir / "pipeline"
    build_tiny_pipeline(workdir).save_pretrained(pipeline_dir, safe_serialization=True)
    return pipeline_dir


def in_workdir(measure) -> dict:
    """measure(workdir) in a temporary directory that is removed afterwards, whatever happens."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        return measure(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_gpu_plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    parts = args.part or list(gpu_bench.PARTS)
    if args.dry_run:
        plan, device, out = gpu_bench.DRY_RUN, torch.device("cpu"), args.out / "gpu-dry-run"
    elif not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device; --gpu --dry-run runs the same plan on the CPU")
    else:
        plan, device, out = gpu_bench.MODELS[args.model], torch.device("cuda:0"), args.out / "gpu"
    report = gpu_bench.run_parts(plan, parts, device, out, args.models_dir / device.type)
    print(report.read_text())
    log(f"report in {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small images and few requests: under 3 minutes on 2 CPU cores")
    mode.add_argument("--gpu", action="store_true",
                      help="CUDA: full-size SD 1.5, SDXL or FLUX.1-dev with random weights, one part per command "
                           "(scripts/gpu_bench.py)")
    mode.add_argument("--compile-scale", action="store_true",
                      help="only scaling 1 to 2 workers, eager against torch.compile (about 2 minutes on 2 CPU cores)")
    mode.add_argument("--speed", action="store_true",
                      help="only the speed settings against digits accuracy (about 5 minutes on 2 CPU cores)")
    mode.add_argument("--bentoml", action="store_true",
                      help="only ours against BentoML: digits, then tiny SD at 256x256 and 512x512 (about 10 minutes)")
    mode.add_argument("--engine", choices=["ray"],
                      help="only Ray Serve against TorchServe on the digits model (a few minutes; needs root)")
    mode.add_argument("--batch-delay", action="store_true",
                      help="only the maxBatchDelay sweep on serve.sh's archive (a few minutes on 2 CPU cores)")
    mode.add_argument("--cold-start", action="store_true",
                      help="only the full-size cold start on the CPU: SD 1.5 (4 GB), build to first image, each archive "
                           "format against the pytorch/serve example (about 15 minutes, 12 GB of disk)")
    gpu = parser.add_argument_group("--gpu and --cold-start")
    gpu.add_argument("--model", choices=sorted(gpu_bench.MODELS), default="sd15")
    gpu.add_argument("--part", choices=gpu_bench.PARTS, action="append",
                     help="repeatable; default: every part (a full-size model needs several commands of 10 minutes)")
    gpu.add_argument("--dry-run", action="store_true",
                     help="every part on the CPU with the tiny model, in a few minutes: proves the plan before a GPU")
    gpu.add_argument("--models-dir", type=Path, default=REPO_ROOT / "bench-results" / "models",
                     help="where the random-weight pipelines are saved once and reused (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results", help="results folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.bentoml:
        results = in_workdir(lambda workdir: bentoml_bench.measure(workdir, (bentoml_bench.DIGITS, *bentoml_bench.LARGER), log))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bentoml.json").write_text(json.dumps(results, indent=2))
        print("\n".join(bentoml_bench.markdown(results)))
        return 0
    if args.cold_start:
        results = in_workdir(lambda workdir: cold_start_bench.measure(workdir, args.models_dir, log))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cold-start.json").write_text(json.dumps(results, indent=2))
        print("\n".join(cold_start_bench.markdown(results)))
        return 0
    if args.engine == "ray":
        results = in_workdir(lambda workdir: ray_bench.measure(workdir, run_load, log))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ray.json").write_text(json.dumps(results, indent=2))
        print("\n".join(ray_bench.markdown(results)))
        return 0
    if args.batch_delay:
        results = in_workdir(lambda workdir: measure_batch_delay(workdir, count=20))
        print("\n".join(markdown_batch_delay(results)))
        return 0
    if args.compile_scale:
        results = in_workdir(measure_compile_scale)
        for name in ("compiled", "regions"):
            ratio, graphs = results[f"compile_scale_vs_eager_{name}"], results[f"compile_graphs_new_worker_{name}"]
            verdict = "met" if ratio <= 1.5 and graphs == 0 else "MISSED"
            print(f"{name}: scale-up {ratio:.2f}x eager's, the new worker compiled {graphs} graphs: {verdict} "
                  "(target: <= 1.5x, 0 graphs)")
        return 0
    if args.speed:
        results = in_workdir(lambda workdir: measure_speed_settings(workdir, count=50))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "speed.json").write_text(json.dumps(results, indent=2))
        print("\n".join(markdown_speed(results)))
        log(save_speed_plot(results, args.out / "speed.png"))
        return 0
    if args.dry_run and not args.gpu:
        parser.error("--dry-run goes with --gpu")
    if args.gpu:
        return run_gpu_plan(parser, args)
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        log(f"building the model and archives in {workdir}")
        pipeline_dir = build_model(workdir)
        store = build_archives(workdir, pipeline_dir, plan)
        pipeline = load_pipeline(pipeline_dir, getattr(torch, plan.dtype))

        log("encoding micro-benchmark")
        results = measure_encoding(pipeline, plan)
        log("cold starts")
        results |= measure_cold_start(workdir, store)

        models = {name: f"{name}.mar" for name in ("ours_b1", "ours_b4", "baseline_b1", "baseline_b4")}
        server, _ = start_server(workdir, store, models, "load")
        try:
            log("end-to-end bodies")
            results |= measure_end_to_end_bodies(server, plan)
            log("serving overhead at 50 steps")
            results |= measure_overhead(server, pipeline, plan)
            log("latency and throughput")
            results |= measure_load(server, plan)
            results |= peak_rss(server, list(models))
        finally:
            server.stop()
        log("ours against BentoML")
        cases = (bentoml_bench.DIGITS,) if args.quick else (bentoml_bench.DIGITS, *bentoml_bench.LARGER)
        against_bentoml = bentoml_bench.measure(workdir, cases, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    derived = ratios(results)
    machine = machine_description()
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown(results, derived, plan, machine) + "\n" + "\n".join(bentoml_bench.markdown(against_bentoml)) + "\n"
    (args.out / "results.md").write_text(report)
    (args.out / "results.json").write_text(json.dumps(
        {"machine": machine, "plan": plan.__dict__, "results": results, "ratios": derived, "targets": verdicts(derived),
         "bentoml": against_bentoml},
        indent=2))
    with open(args.out / "results.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["metric", "value"])
        writer.writerows(sorted({**results, **derived}.items()))
    print(report)
    log(save_plot(results, args.out / "results.png"))
    log(f"done in {time.perf_counter() - started:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ours against the pytorch/serve example (the baseline, devtools/baselines/example_handler.py) and the bare
pipeline, on the tiny SD-shaped model, in one run: answer bodies and encoding, the serving overhead,
latency and throughput at batchSize 1 and 4 and concurrency 1, 4 and 8, cold start and scale-up, and peak
memory. `bench.py --quick` (under 3 minutes on 2 cores) and `bench.py`; example_report.py writes it up."""

import json
import time
from pathlib import Path

import numpy as np
import torch

from devtools.archives import model_dir
from devtools.bench.archives import build_example, build_ours
from devtools.bench.runner import log, median_seconds, run_load
from devtools.bench.workload import Workload
from devtools.harness.torchserve import TorchServe, worker_hwm
from handlers.core.answers import Generation, encode_body
from handlers.core.pipelines import load_pipeline
from handlers.core.schema import GenerationRequest

QUICK = Workload("quick", ("--source", "tiny"), size=64, steps=4, requests=8, rounds=3)
FULL = Workload("full", ("--source", "tiny"), size=128, steps=20, requests=24, rounds=5)
PROMPT = "a photo of an astronaut riding a horse on mars"
OVERHEAD_STEPS = 50
ENCODE_SIDE = 768
MODELS = ("ours_b1", "ours_b4", "baseline_b1", "baseline_b4")


def build_store(store: Path, workload: Workload) -> dict[str, str]:
    """Ours (zip and no-archive, batchSize 1 and 4) and the baseline's, in one model store."""
    pipeline_dir = model_dir("tiny")
    common = ["--source", str(pipeline_dir), "--height", str(workload.size), "--width", str(workload.size),
              "--num-inference-steps", str(workload.steps), "--torch-dtype", workload.dtype, "--max-batch-delay", "50"]
    archives = {
        "ours_b1": build_ours(store, "ours_b1", *common),
        "ours_b4": build_ours(store, "ours_b4", *common, "--batch-size", "4", "--batching", "combined"),
        "ours_noarchive": build_ours(store, "ours_noarchive", *common, "--archive-format", "no-archive"),
    }
    for batch_size in (1, 4):
        archives[f"baseline_b{batch_size}"] = build_example(
            store, f"baseline_b{batch_size}", pipeline_dir, batch_size, guidance_scale=7.5,
            num_inference_steps=workload.steps, height=workload.size, width=workload.size)
    return archives


def start(workdir: Path, store: Path, models: dict[str, str], label: str) -> TorchServe:
    return TorchServe(workdir / f"ts-{label}", store, models, extra_config={"max_response_size": str(200 * 2**20)}).start(600)


def measure_encoding(repeats: int) -> dict:
    """Server-side encode time and body bytes for one 768x768 image."""
    pipeline = load_pipeline(model_dir("tiny"), torch.float32)
    image = pipeline(PROMPT, height=ENCODE_SIDE, width=ENCODE_SIDE, num_inference_steps=2,
                     generator=torch.Generator().manual_seed(0)).images[0]

    def ours(output_format: str):
        request = GenerationRequest(prompt=PROMPT, height=ENCODE_SIDE, width=ENCODE_SIDE, seed=0, output_format=output_format)
        return lambda: encode_body(request, Generation([image], 0.0))[0]

    encoders = {"baseline": lambda: json.dumps(np.array(image).tolist(), indent=2),  # what TorchServe does with its list
                **{name: ours(name) for name in ("numpy", "png", "jpeg")}}
    results = {}
    for name, encode in encoders.items():
        body = encode()
        results[name] = {"seconds": median_seconds(encode, repeats, warm_up=False),
                         "bytes": len(body.encode() if isinstance(body, str) else body)}
    return results


def measure_cold_starts(workdir: Path, store: Path, archives: dict[str, str]) -> dict:
    """Start to READY, and scaling from 1 to 2 workers, each archive alone."""
    results = {}
    for label, model in (("ours_zip", "ours_b1"), ("ours_noarchive", "ours_noarchive"), ("baseline", "baseline_b1")):
        started = time.perf_counter()
        server = start(workdir, store, {model: archives[model]}, f"cold-{label}")
        ready = time.perf_counter() - started
        try:
            started = time.perf_counter()
            server.scale(model, 2).raise_for_status()
            results[label] = {"ready_s": ready, "scale_up_s": time.perf_counter() - started}
        finally:
            server.stop()
        log(f"cold start {label}: {ready:.1f} s to READY, {results[label]['scale_up_s']:.1f} s from 1 to 2 workers")
    return results


def body_of(kind: str, workload: Workload, steps: int | None = None, output_format: str = "numpy"):
    if kind == "baseline":
        return lambda index: {"data": PROMPT.encode()}
    fields = {"prompt": PROMPT, "height": workload.size, "width": workload.size,
              "num_inference_steps": steps or workload.steps, "output_format": output_format}
    return lambda index: {"json": {**fields, "seed": index}}


def measure_served(server: TorchServe, workload: Workload) -> dict:
    """Bodies end to end, the overhead over a bare call, latency and throughput, and peak memory."""
    results = {"bodies": {name: len(server.predict("ours_b1", **body_of("ours", workload, output_format=name)(0)).content)
                          for name in ("numpy", "png", "jpeg")}}
    results["bodies"]["baseline"] = len(server.predict("baseline_b1", **body_of("baseline", workload)(0)).content)
    pipeline = load_pipeline(model_dir("tiny"), getattr(torch, workload.dtype))
    bare = lambda: pipeline(PROMPT, height=workload.size, width=workload.size, num_inference_steps=OVERHEAD_STEPS,  # noqa: E731
                            generator=torch.Generator().manual_seed(0))
    served_png = body_of("ours", workload, OVERHEAD_STEPS, "png")
    served = lambda: server.predict("ours_b1", **served_png(0)).raise_for_status()  # noqa: E731
    results["overhead"] = {"bare_s": median_seconds(bare, 7), "served_s": median_seconds(served, 7)}
    results["load"] = {}
    for batch_size in (1, 4):
        for concurrency in (1, 4, 8):
            count = max(workload.requests, 2 * concurrency)
            for kind in ("ours", "baseline"):
                model, send = f"{kind}_b{batch_size}", body_of(kind, workload)
                load = run_load(lambda index: server.predict(model, **send(index)), concurrency, count)
                results["load"][f"{model}_c{concurrency}"] = load.as_dict()
                log(f"{model} c={concurrency}: p50 {load.p50_s:.3f} s, p95 {load.p95_s:.3f} s, {load.throughput_rps:.2f} req/s")
    results["peak_rss_bytes"] = {model: max((worker_hwm(worker["pid"]) for worker in server.describe(model)["workers"]),
                                            default=None) for model in MODELS}
    return results


def measure(workdir: Path, workload: Workload) -> dict:
    store = workdir / "model-store"
    log(f"building the archives in {store}")
    archives = build_store(store, workload)
    log("encoding micro-benchmark")
    results = {"workload": workload.name, "encoding": measure_encoding(workload.rounds)}
    log("cold starts")
    results["cold_start"] = measure_cold_starts(workdir, store, archives)
    server = start(workdir, store, {model: archives[model] for model in MODELS}, "load")
    try:
        log("bodies, overhead, latency and throughput")
        results |= measure_served(server, workload)
    finally:
        server.stop()
    return results

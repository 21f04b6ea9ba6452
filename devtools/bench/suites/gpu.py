"""The GPU plan of `bench.py --gpu`: full-size SD 1.5, SDXL and FLUX.1-dev with random weights (they cost
exactly what trained ones cost). Every part fits the device's 10-minute limit per command and writes
<out>/<model>-<part>.json; gpu_report.py rebuilds <out>/gpu.md from every part found there.

  bench.py --gpu --model sd15 --part ladder            dtype, fused QKV, channels_last, compile
  bench.py --gpu --model sd15 --part autotune          compile mode max-autotune (CUDA graphs)
  bench.py --gpu --model sd15 --part served-eager      bare, then TorchServe at batch 1 and 4
  bench.py --gpu --model sd15 --part served-compiled   the same with the torch_compile option
  bench.py --gpu --model sd15 --part profile           torch.profiler over one compiled call
  bench.py --gpu --model sd15 --part step              step-level against static batching, mixed traffic
  bench.py --gpu --dry-run                             every part, tiny model, CPU: proves the plan

Disk: the served parts build archives that reference the saved model where it is (`--weights reference`):
no second copy at the build or at the start, so FLUX.1-dev in bf16 needs its 34 GB once, on the disk.
Every setting goes through the handler's own code (HandlerConfig, apply_memory_options, compile_denoiser).
"""

import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from devtools.archives import model_dir as tiny_model_dir
from devtools.bench.archives import build_ours
from devtools.bench.runner import interleaved, log, run_load, timed
from devtools.bench.workload import Workload
from devtools.harness.memory import MemoryPeak
from devtools.harness.torchserve import TorchServe
from devtools.models.fullsize import BUILDERS
from handlers.core.config import HandlerConfig
from handlers.core.pipelines import DTYPES, apply_memory_options, compile_denoiser, load_pipeline

PROMPT = "a photo of an astronaut riding a horse on mars"
PARTS = ("ladder", "autotune", "served-eager", "served-compiled", "profile", "step")
MODELS = {
    "sd15": Workload("sd15", size=512, steps=50, dtype="float16", guidance=7.5, requests=16, target_s=0.6,
                     anchors="A100: diffusers fp16+SDPA 1.59 s, compiled 1.07 s; TensorRT 0.82 s"),
    "sdxl": Workload("sdxl", size=1024, steps=30, dtype="float16", guidance=7.5, requests=8, target_s=1.5,
                     anchors="A100: diffusers compiled 2.43-2.54 s; H100: TensorRT 1.47 s"),
    "flux": Workload("flux", size=1024, steps=28, dtype="bfloat16", guidance=3.5, requests=8, target_s=4.5,
                     anchors="H100: diffusers with torch.compile, 4.5 s"),
}
DRY_RUN = Workload("tiny", size=64, steps=2, dtype="float32", guidance=7.5, requests=8,
                   anchors="none: the dry run proves the plan, not the speed")


@dataclass
class Run:
    """Where one part runs: the workload, the device, and the folders it uses."""

    workload: Workload
    device: torch.device
    out: Path
    models_dir: Path


def model_dir(run: Run) -> Path:
    """The random-weight pipeline, saved once in its half precision and reused by every later part."""
    if run.workload.name == "tiny":
        return tiny_model_dir("tiny")
    target = run.models_dir / run.workload.name
    if not (target / ".complete").exists():
        log(f"building {run.workload.name} with random weights in {target}")
        pipeline = BUILDERS[run.workload.name](run.models_dir, device=run.device, dtype=DTYPES[run.workload.dtype])
        pipeline.save_pretrained(target, safe_serialization=True)
        (target / ".complete").touch()  # written last: a half-saved model is built again
        del pipeline
        release(run.device)
    return target


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def generate(pipeline, run: Run) -> None:
    workload = run.workload
    pipeline(PROMPT, height=workload.size, width=workload.size, num_inference_steps=workload.steps,
             guidance_scale=workload.guidance, generator=torch.Generator().manual_seed(0))
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)


def bare(run: Run, settings: dict, repeats: int = 3) -> dict:
    """Load with the handler's options, warm up (compiling, if asked), then the median of `repeats` calls."""
    config = HandlerConfig(**settings)
    dtype = DTYPES[config.torch_dtype if config.torch_dtype != "auto" else run.workload.dtype]
    pipeline = load_pipeline(model_dir(run), dtype)
    apply_memory_options(pipeline, config, run.device)
    if config.torch_compile:
        compile_denoiser(pipeline, config)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    first = timed_call(lambda: generate(pipeline, run))
    latency = statistics.median(timed_call(lambda: generate(pipeline, run)) for _ in range(repeats))
    peak = torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else None
    del pipeline
    release(run.device)
    return {"settings": settings, "first_call_s": first, "latency_s": latency, "peak_memory_bytes": peak}


def timed_call(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure_ladder(run: Run) -> dict:
    """Cumulative, in the order of PyTorch's "accelerating generative AI" posts (FLUX in fp32 would be 67 GB)."""
    half = run.workload.dtype
    rungs = [] if run.workload.name == "flux" else [("float32", {"torch_dtype": "float32"})]
    settings = {"torch_dtype": half}
    rungs.append((f"{half} (SDPA)", dict(settings)))
    for label, option in (("+ fused QKV", "fuse_qkv_projections"), ("+ channels_last", "channels_last"),
                          ("+ torch.compile", "torch_compile")):
        settings[option] = True
        rungs.append((label, dict(settings)))
    results = {}
    for label, rung in rungs:
        results[label] = bare(run, rung)
        log(f"{label}: {results[label]['latency_s']:.3f} s per image")
    return results


def measure_autotune(run: Run) -> dict:
    settings = {"torch_dtype": run.workload.dtype, "fuse_qkv_projections": True, "channels_last": True,
                "torch_compile": True, "compile_mode": "max-autotune"}
    return {"max-autotune": bare(run, settings)}


def measure_served(run: Run, compiled: bool) -> dict:
    """The bare call with the same settings, then one TorchServe worker at batch 1, then at batch 4."""
    workload = run.workload
    settings = {"torch_dtype": workload.dtype, "torch_compile": compiled}
    results = {"bare": bare(run, settings)}
    store = run.out / "store"
    body = lambda seed: {"json": {"prompt": PROMPT, "height": workload.size, "width": workload.size, "seed": seed,  # noqa: E731
                                  "num_inference_steps": workload.steps, "guidance_scale": workload.guidance,
                                  "output_format": "png"}, "timeout": 600}
    for batch_size in (1, 4):
        name = f"{'compiled' if compiled else 'eager'}_b{batch_size}"
        # The model's defaults are the workload's, as a user would set them: the warm-up runs at the default size.
        # Each compiled worker compiles into its own empty cache, so start to READY includes a cold compile.
        options = ["--source", str(model_dir(run)), "--weights", "reference", "--batch-size", str(batch_size),
                   "--height", str(workload.size), "--width", str(workload.size), "--num-inference-steps",
                   str(workload.steps), "--guidance-scale", str(workload.guidance), "--batching", "combined",
                   "--torch-dtype", workload.dtype, "--set", f"torch_compile={str(compiled).lower()}",
                   *(["--set", f"compile_cache_dir={run.out / f'inductor-{name}'}"] if compiled else [])]
        server = TorchServe(run.out / f"ts-{name}", store, {name: build_ours(store, name, *options)})
        with MemoryPeak(run.device, server) as memory:
            started = time.perf_counter()
            with server.start(timeout_s=900):
                figures = {"start_to_ready_s": time.perf_counter() - started}
                send = lambda seed: server.predict(name, **body(seed))  # noqa: E731
                figures["first_request_s"] = timed(lambda: send(0))
                figures["warm_request_s"] = statistics.median(timed(lambda seed=seed: send(seed)) for seed in (1, 2, 3))
                run_load(send, 8, 8)  # warm-up: batch shapes seen once (compiling, if compiled)
                load = run_load(send, 8, workload.requests)
                figures["c8"] = {"throughput_rps": load.throughput_rps, "p50_s": load.p50_s}
        figures["peak_memory_bytes"] = memory.worker_bytes
        results[name] = figures
        log(f"{name}: {figures}")
    return results


def measure_profile(run: Run) -> dict:
    """Where the milliseconds of one served-compiled call go: the top operators by device time."""
    from torch.profiler import ProfilerActivity, profile

    config = HandlerConfig(torch_dtype=run.workload.dtype, torch_compile=True)
    pipeline = load_pipeline(model_dir(run), DTYPES[run.workload.dtype])
    apply_memory_options(pipeline, config, run.device)
    compile_denoiser(pipeline, config)
    generate(pipeline, run)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        generate(pipeline, run)
    sort_by = "cuda_time_total" if run.device.type == "cuda" else "cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=25)
    (run.out / f"{run.workload.name}-profile.txt").write_text(table)
    del pipeline
    release(run.device)
    return {"top_operators": table.splitlines()[:30]}


def measure_step(run: Run) -> dict:
    """bench.py --step's mixed workload (4 steps with dpmpp_2m, 25, 50; guidance 1 to 7) at the model's size,
    closed loop at concurrency 8, static batching (combined, batchSize 4) against step-level, interleaved;
    then every step-batched image against the same request run alone through the pipeline."""
    from devtools.bench.suites import step

    workload, store = run.workload, run.out / "store"
    common = ["--source", str(model_dir(run)), "--weights", "reference", "--batch-size", "4",
              "--height", str(workload.size), "--width", str(workload.size), "--torch-dtype", workload.dtype]
    models = {"static": build_ours(store, "static", *common, "--batching", "combined"),
              "step": build_ours(store, "step", *common, "--batching", "step")}
    bodies = step.workload(workload.requests, seed=1, size=workload.size)
    with TorchServe(run.out / "ts-step", store, models).start(timeout_s=900) as server:
        for mode in step.MODES:  # warm-up: the shapes and samplers seen once
            step.send_all(server, mode, bodies[:4], concurrency=4)
        runs = interleaved({mode: (lambda mode=mode: step.send_all(server, mode, bodies, step.CONCURRENCY))
                            for mode in step.MODES}, rounds=2)
    step_images = [image for measured in runs["step"] for image in measured["images"]]
    gpu_id = 0 if run.device.type == "cuda" else None
    solo = step.solo_difference(bodies * 2, step_images, model_dir(run), gpu_id, torch_dtype=workload.dtype)
    release(run.device)
    return {"closed": {mode: step.summary(step.merged(runs[mode])) for mode in step.MODES}, "solo_difference": solo}


MEASURES = {
    "ladder": measure_ladder,
    "autotune": measure_autotune,
    "served-eager": lambda run: measure_served(run, compiled=False),
    "served-compiled": lambda run: measure_served(run, compiled=True),
    "profile": measure_profile,
    "step": measure_step,
}

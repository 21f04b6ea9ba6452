"""The GPU plan of `scripts/bench.py --gpu`: full-size SD 1.5, SDXL and FLUX.1-dev with random weights.

Random weights cost exactly what trained ones cost. Every part fits the device's 10-minute limit
per command, and writes <out>/<model>-<part>.json; the report (<out>/gpu.md) is rebuilt from every
part found there, so parts may run in separate commands, on one machine:

  python scripts/bench.py --gpu --model sd15 --part ladder            # dtype, fused QKV, channels_last, compile
  python scripts/bench.py --gpu --model sd15 --part autotune          # compile mode max-autotune (CUDA graphs)
  python scripts/bench.py --gpu --model sd15 --part served-eager      # bare, then TorchServe at batch 1 and 4
  python scripts/bench.py --gpu --model sd15 --part served-compiled   # the same with the torch_compile option
  python scripts/bench.py --gpu --model sd15 --part profile           # torch.profiler over one compiled call
  python scripts/bench.py --gpu --dry-run                             # every part, tiny model, CPU: proves the plan

Disk: a served part copies the model into a no-archive store, so it needs twice the model's size
(FLUX.1-dev in bf16: 2 x 34 GB). On a 64 GB disk, keep the saved models in memory instead:
`--models-dir /dev/shm/models`.

Every setting goes through the handler's own code (HandlerConfig, apply_memory_options,
compile_denoiser), so what is measured here is what a `handler:` section gets.
"""

import gc
import json
import platform
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from archiver.build import ServingConfig, build_archive
from devtools.models.fullsize import BUILDERS
from devtools.harness.torchserve import TorchServe
from devtools.models.tiny import build_tiny_pipeline
from handlers.core.config import HandlerConfig
from handlers.core.pipelines import DTYPES, apply_memory_options, compile_denoiser, load_pipeline

PROMPT = "a photo of an astronaut riding a horse on mars"
PARTS = ("ladder", "autotune", "served-eager", "served-compiled", "profile")


@dataclass(frozen=True)
class ModelPlan:
    name: str
    size: int
    steps: int
    dtype: str  # the half precision its model card uses
    guidance: float
    requests_c8: int  # requests per concurrency-8 run
    target_s: float | None  # served end to end on an H100, batch 1, concurrency 1
    anchors: str


MODELS = {
    "sd15": ModelPlan("sd15", 512, 50, "float16", 7.5, 16, 0.6,
                      "A100: diffusers fp16+SDPA 1.59 s, compiled 1.07 s; TensorRT 0.82 s"),
    "sdxl": ModelPlan("sdxl", 1024, 30, "float16", 7.5, 8, 1.5,
                      "A100: diffusers compiled 2.43-2.54 s; H100: TensorRT 1.47 s"),
    "flux": ModelPlan("flux", 1024, 28, "bfloat16", 3.5, 8, 4.5, "H100: diffusers with torch.compile, 4.5 s"),
}
DRY_RUN = ModelPlan("tiny", 64, 2, "float32", 7.5, 8, None, "none: the dry run proves the plan, not the speed")
TARGETS = {"overhead": 0.03, "batch4_vs_batch1_c8": 1.3, "first_vs_warm": 1.2}


@dataclass
class Run:
    """Where one part runs: the model plan, the device, and the folders it uses."""

    plan: ModelPlan
    device: torch.device
    out: Path
    models_dir: Path

    @property
    def half(self) -> str:
        return self.plan.dtype


def log(message: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_dir(run: Run) -> Path:
    """The random-weight pipeline, saved once in half precision and reused by every later part."""
    target = run.models_dir / run.plan.name
    if (target / ".complete").exists():
        return target
    log(f"building {run.plan.name} with random weights in {target}")
    if run.plan.name == "tiny":
        pipeline = build_tiny_pipeline(run.models_dir)
    else:
        pipeline = BUILDERS[run.plan.name](run.models_dir, device=run.device, dtype=DTYPES[run.half])
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
    pipeline(
        PROMPT, height=run.plan.size, width=run.plan.size, num_inference_steps=run.plan.steps,
        guidance_scale=run.plan.guidance, generator=torch.Generator().manual_seed(0),
    )
    synchronize(run.device)


def bare(run: Run, settings: dict, repeats: int = 3) -> dict:
    """Load with the handler's options, warm up (compiling, if asked), then the median of `repeats` calls."""
    config = HandlerConfig(**settings)
    pipeline = load_pipeline(model_dir(run), DTYPES[config.torch_dtype if config.torch_dtype != "auto" else run.half])
    apply_memory_options(pipeline, config, run.device)
    if config.torch_compile:
        compile_denoiser(pipeline, config)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    started = time.perf_counter()
    generate(pipeline, run)
    first = time.perf_counter() - started
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        generate(pipeline, run)
        timings.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else None
    del pipeline
    release(run.device)
    return {"first_call_s": first, "latency_s": statistics.median(timings), "peak_memory_bytes": peak}


def ladder_rungs(run: Run) -> list[tuple[str, dict]]:
    """Cumulative, in the order of PyTorch's "accelerating generative AI" posts."""
    rungs = [] if run.plan.name == "flux" else [("float32", {"torch_dtype": "float32"})]  # FLUX in fp32: 67 GB
    settings = {"torch_dtype": run.half}
    rungs.append((f"{run.half} (SDPA)", dict(settings)))
    for label, option in (("+ fused QKV", "fuse_qkv_projections"), ("+ channels_last", "channels_last"),
                          ("+ torch.compile", "torch_compile")):
        settings[option] = True
        rungs.append((label, dict(settings)))
    return rungs


def measure_ladder(run: Run) -> dict:
    results = {}
    for label, settings in ladder_rungs(run):
        results[label] = {"settings": settings, **bare(run, settings)}
        log(f"{label}: {results[label]['latency_s']:.3f} s per image")
    return results


def measure_autotune(run: Run) -> dict:
    settings = {"torch_dtype": run.half, "fuse_qkv_projections": True, "channels_last": True,
                "torch_compile": True, "compile_mode": "max-autotune"}
    results = {"max-autotune": {"settings": settings, **bare(run, settings)}}
    log(f"max-autotune: {results['max-autotune']['latency_s']:.3f} s per image, "
        f"compiling took {results['max-autotune']['first_call_s']:.0f} s")
    return results


def served_settings(run: Run, compiled: bool) -> dict:
    return {"torch_dtype": run.half, "torch_compile": compiled}


def cold_compile_cache(run: Run, name: str) -> dict:
    """Each served worker compiles into its own empty cache, so start to READY includes a cold compile."""
    return {"compile_cache_dir": str(run.out / f"inductor-{name}")}


class MemoryPeak:
    """The peak memory a worker adds to the device, sampled while it serves (one worker at a time)."""

    def __init__(self, run: Run, server: TorchServe):
        self.run, self.server = run, server
        self.baseline = self.used()
        self.peak = self.baseline
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def used(self) -> int:
        if self.run.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.run.device)
            return total - free
        workers = self.server.workers()
        return max((worker_hwm(process.pid) for process in workers), default=0)

    def sample(self) -> None:
        while not self.stopped.wait(0.2):
            self.peak = max(self.peak, self.used())

    def __enter__(self) -> "MemoryPeak":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        self.thread.join()

    @property
    def worker_bytes(self) -> int:
        return self.peak - self.baseline if self.run.device.type == "cuda" else self.peak


def worker_hwm(pid: int) -> int:
    """A process's peak resident memory (VmHWM), the CPU stand-in for GPU memory in the dry run."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM")), 0)


def request_body(run: Run, seed: int) -> dict:
    return {"prompt": PROMPT, "height": run.plan.size, "width": run.plan.size, "seed": seed,
            "num_inference_steps": run.plan.steps, "guidance_scale": run.plan.guidance, "output_format": "png"}


def timed_predict(server: TorchServe, model: str, body: dict) -> float:
    started = time.perf_counter()
    response = server.predict(model, json=body, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - started


def concurrency_8(server: TorchServe, model: str, run: Run, count: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        latencies = sorted(pool.map(lambda seed: timed_predict(server, model, request_body(run, seed)), range(count)))
    return {"throughput_rps": count / (time.perf_counter() - started), "p50_s": latencies[len(latencies) // 2]}


def measure_served(run: Run, compiled: bool) -> dict:
    """The bare call with the same settings, then one TorchServe worker at batch 1, then at batch 4."""
    settings = served_settings(run, compiled)
    results = {"bare": {"settings": settings, **bare(run, settings)}}
    log(f"bare: {results['bare']['latency_s']:.3f} s per image")
    store = run.out / "store"
    for batch_size in (1, 4):
        name = f"{'compiled' if compiled else 'eager'}_b{batch_size}"
        stage = run.out / f"stage-{name}"
        stage.mkdir(parents=True, exist_ok=True)
        # The model's defaults are the plan's, as a user would set them: the warm-up runs at the default size.
        defaults = {"height": run.plan.size, "width": run.plan.size, "num_inference_steps": run.plan.steps,
                    "guidance_scale": run.plan.guidance}
        handler = {**settings, **defaults, "batching": "combined", **(cold_compile_cache(run, name) if compiled else {})}
        serving = ServingConfig(batch_size=batch_size, handler=handler)
        build_archive(model_dir(run), name, store, serving, stage, archive_format="no-archive")
        server = TorchServe(run.out / f"ts-{name}", store, {name: name})
        with MemoryPeak(run, server) as memory:
            started = time.perf_counter()
            server.start(timeout_s=900)
            try:
                figures = {"start_to_ready_s": time.perf_counter() - started}
                figures["first_request_s"] = timed_predict(server, name, request_body(run, 0))
                figures["warm_request_s"] = statistics.median(
                    timed_predict(server, name, request_body(run, seed)) for seed in (1, 2, 3))
                concurrency_8(server, name, run, 8)  # warm-up: batch shapes seen once (compiling, if compiled)
                figures["c8"] = concurrency_8(server, name, run, run.plan.requests_c8)
            finally:
                server.stop()
        figures["peak_memory_bytes"] = memory.worker_bytes
        results[name] = figures
        log(f"{name}: READY in {figures['start_to_ready_s']:.1f} s, first {figures['first_request_s']:.3f} s, "
            f"warm {figures['warm_request_s']:.3f} s, c=8 {figures['c8']['throughput_rps']:.2f} req/s")
        shutil.rmtree(store / name, ignore_errors=True)  # a copy of the weights: FLUX's is 24 GB
    return results


def measure_profile(run: Run) -> dict:
    """Where the milliseconds of one served-compiled call go: the top operators by device time."""
    from torch.profiler import ProfilerActivity, profile

    config = HandlerConfig(**served_settings(run, compiled=True))
    pipeline = load_pipeline(model_dir(run), DTYPES[run.half])
    apply_memory_options(pipeline, config, run.device)
    compile_denoiser(pipeline, config)
    generate(pipeline, run)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        generate(pipeline, run)
    sort_by = "cuda_time_total" if run.device.type == "cuda" else "cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=25)
    (run.out / f"{run.plan.name}-profile.txt").write_text(table)
    del pipeline
    release(run.device)
    return {"top_operators": table.splitlines()[:30]}


MEASURES = {
    "ladder": measure_ladder,
    "autotune": measure_autotune,
    "served-eager": lambda run: measure_served(run, compiled=False),
    "served-compiled": lambda run: measure_served(run, compiled=True),
    "profile": measure_profile,
}


def machine(device: torch.device) -> dict:
    import diffusers

    described = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        described["device"] = torch.cuda.get_device_name(device)
        try:
            described["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30,
            ).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            described["driver"] = "unknown"
        described["cuda"] = torch.version.cuda
    else:
        described["device"] = f"{platform.machine()} CPU (dry run)"
    return described


def run_parts(plan: ModelPlan, parts: list[str], device: torch.device, out: Path, models_dir: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    run = Run(plan, device, out, models_dir)
    for part in parts:
        log(f"{plan.name}: {part}")
        started = time.perf_counter()
        results = MEASURES[part](run)
        record = {"model": asdict(plan), "part": part, "machine": machine(device),
                  "seconds": time.perf_counter() - started, "results": results}
        (out / f"{plan.name}-{part}.json").write_text(json.dumps(record, indent=2))
    report = out / "gpu.md"
    report.write_text(markdown(out))
    return report


# ---------------------------------------------------------------- report


def verdicts(parts: dict) -> list[tuple[str, float | None, str]]:
    """(what, value, verdict) for each target that the parts present can decide."""
    out = []
    plan = parts.get("plan")
    compiled = parts.get("served-compiled", {})
    if "compiled_b1" in compiled:
        served, bare_call = compiled["compiled_b1"], compiled["bare"]
        if plan and plan["target_s"] is not None:
            out.append((f"served, compiled, batch 1, c=1 <= {plan['target_s']} s", served["warm_request_s"],
                        "met" if served["warm_request_s"] <= plan["target_s"] else "MISSED"))
        overhead = served["warm_request_s"] / bare_call["latency_s"] - 1
        out.append((f"serving overhead over the bare compiled call <= {TARGETS['overhead']:.0%}", overhead,
                    "met" if overhead <= TARGETS["overhead"] else "MISSED"))
        first = served["first_request_s"] / served["warm_request_s"]
        out.append((f"first request after READY / warm <= {TARGETS['first_vs_warm']}", first,
                    "met" if first <= TARGETS["first_vs_warm"] else "MISSED"))
        if "compiled_b4" in compiled:
            gain = compiled["compiled_b4"]["c8"]["throughput_rps"] / served["c8"]["throughput_rps"]
            out.append((f"batch 4 / batch 1 throughput at c=8 >= {TARGETS['batch4_vs_batch1_c8']}", gain,
                        "met" if gain >= TARGETS["batch4_vs_batch1_c8"] else "MISSED"))
    return out


def gib(value) -> str:
    return "n/a" if value is None else f"{value / 2**30:.1f} GiB"


def markdown(out: Path) -> str:
    by_model: dict[str, dict] = {}
    described = {}
    for path in sorted(out.glob("*.json")):
        record = json.loads(path.read_text())
        model = by_model.setdefault(record["model"]["name"], {"plan": record["model"]})
        model[record["part"]] = record["results"]
        described = record["machine"]
    lines = ["# GPU benchmark (ours: measured by scripts/bench.py --gpu)", ""]
    lines.append(", ".join(f"{key} {value}" for key, value in described.items()))
    for name, parts in by_model.items():
        plan = parts["plan"]
        lines += ["", f"## {name}: {plan['size']}x{plan['size']}, {plan['steps']} steps, {plan['dtype']}",
                  "", f"Anchors (published, not ours): {plan['anchors']}", ""]
        rungs = {**parts.get("ladder", {}), **parts.get("autotune", {})}
        if rungs:
            lines += ["| bare pipeline, cumulative | s per image | first call (compiles) | peak memory |", "|---|---|---|---|"]
            lines += [f"| {label} | {r['latency_s']:.3f} | {r['first_call_s']:.1f} s | {gib(r['peak_memory_bytes'])} |"
                      for label, r in rungs.items()]
            lines.append("")
        for variant in ("served-eager", "served-compiled"):
            if variant not in parts:
                continue
            served = parts[variant]
            lines += [f"| {variant} | start to READY | first request | warm request (c=1) | c=8 req/s | c=8 p50 "
                      "| peak memory per worker |", "|---|---|---|---|---|---|---|",
                      f"| bare call | | {served['bare']['first_call_s']:.3f} s | {served['bare']['latency_s']:.3f} s "
                      f"| | | {gib(served['bare']['peak_memory_bytes'])} |"]
            for key, figures in served.items():
                if key == "bare":
                    continue
                lines.append(
                    f"| {key} | {figures['start_to_ready_s']:.1f} s | {figures['first_request_s']:.3f} s "
                    f"| {figures['warm_request_s']:.3f} s | {figures['c8']['throughput_rps']:.2f} "
                    f"| {figures['c8']['p50_s']:.3f} s | {gib(figures['peak_memory_bytes'])} |")
            lines.append("")
        targets = verdicts(parts)
        if targets:
            lines += ["| target | ours | verdict |", "|---|---|---|"]
            lines += [f"| {what} | {value:.3g} | {verdict} |" for what, value, verdict in targets]
        if "profile" in parts:
            lines += ["", f"Profile of one compiled call: {name}-profile.txt"]
    return "\n".join(lines) + "\n"

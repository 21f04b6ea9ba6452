"""The GPU plan's runs and report: each part's JSON, and <out>/gpu.md rebuilt from every part found there."""

import json
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch

from devtools.bench.runner import log
from devtools.bench.suites.gpu import MEASURES, Run
from devtools.bench.targets import Target
from devtools.bench.workload import Workload

OVERHEAD = Target("serving overhead over the bare compiled call", "<=", 0.03)
FIRST_OVER_WARM = Target("first request after READY / warm", "<=", 1.2)
BATCH_GAIN = Target("batch 4 / batch 1 throughput at c=8", ">=", 1.3)


def machine(device: torch.device) -> dict:
    import diffusers

    described = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()}
    if device.type != "cuda":
        return {**described, "device": f"{platform.machine()} CPU (dry run)"}
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "unknown"
    return {**described, "device": torch.cuda.get_device_name(device), "driver": driver, "cuda": torch.version.cuda}


def run_parts(workload: Workload, parts: list[str], device: torch.device, out: Path, models_dir: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    run = Run(workload, device, out, models_dir)
    for part in parts:
        log(f"{workload.name}: {part}")
        started = time.perf_counter()
        results = MEASURES[part](run)
        record = {"model": asdict(workload), "part": part, "machine": machine(device),
                  "seconds": time.perf_counter() - started, "results": results}
        (out / f"{workload.name}-{part}.json").write_text(json.dumps(record, indent=2))
    report = out / "gpu.md"
    report.write_text(markdown(out))
    return report


def verdicts(parts: dict) -> list[tuple[str, float, str]]:
    """(what, value, verdict) for each target that the parts present can decide."""
    compiled = parts.get("served-compiled", {})
    if "compiled_b1" not in compiled:
        return []
    served, out = compiled["compiled_b1"], []
    plan = parts.get("plan")
    if plan and plan["target_s"] is not None:
        latency = Target(f"served, compiled, batch 1, c=1 <= {plan['target_s']} s", "<=", plan["target_s"])
        out.append((latency.name, served["warm_request_s"], latency))
    out.append((f"{OVERHEAD.name} <= {OVERHEAD.bound:.0%}", served["warm_request_s"] / compiled["bare"]["latency_s"] - 1,
                OVERHEAD))
    out.append((f"{FIRST_OVER_WARM.name} <= {FIRST_OVER_WARM.bound}", served["first_request_s"] / served["warm_request_s"],
                FIRST_OVER_WARM))
    if "compiled_b4" in compiled:
        gain = compiled["compiled_b4"]["c8"]["throughput_rps"] / served["c8"]["throughput_rps"]
        out.append((f"{BATCH_GAIN.name} >= {BATCH_GAIN.bound}", gain, BATCH_GAIN))
    return [(what, value, "met" if target.met(value) else "MISSED") for what, value, target in out]


def gib(value) -> str:
    return "n/a" if value is None else f"{value / 2**30:.1f} GiB"


def markdown(out: Path) -> str:
    by_model: dict[str, dict] = {}
    described = {}
    for path in sorted(out.glob("*.json")):
        record = json.loads(path.read_text())
        by_model.setdefault(record["model"]["name"], {"plan": record["model"]})[record["part"]] = record["results"]
        described = record["machine"]
    lines = ["# GPU benchmark (ours: measured by scripts/bench.py --gpu)", "",
             ", ".join(f"{key} {value}" for key, value in described.items())]
    for name, parts in by_model.items():
        plan = parts["plan"]
        lines += ["", f"## {name}: {plan['size']}x{plan['size']}, {plan['steps']} steps, {plan['dtype']}", "",
                  f"Anchors (published, not ours): {plan['anchors']}", ""]
        rungs = {**parts.get("ladder", {}), **parts.get("autotune", {})}
        if rungs:
            lines += ["| bare pipeline, cumulative | s per image | first call (compiles) | peak memory |", "|---|---|---|---|"]
            lines += [f"| {label} | {r['latency_s']:.3f} | {r['first_call_s']:.1f} s | {gib(r['peak_memory_bytes'])} |"
                      for label, r in rungs.items()]
            lines.append("")
        for variant in ("served-eager", "served-compiled"):
            if variant in parts:
                lines += served_table(variant, parts[variant])
        targets = verdicts(parts)
        if targets:
            lines += ["| target | ours | verdict |", "|---|---|---|"]
            lines += [f"| {what} | {value:.3g} | {verdict} |" for what, value, verdict in targets]
        if "step" in parts:
            lines += ["", *step_lines(parts["step"])]
        if "profile" in parts:
            lines += ["", f"Profile of one compiled call: {name}-profile.txt"]
    return "\n".join(lines) + "\n"


def served_table(variant: str, served: dict) -> list[str]:
    lines = [f"| {variant} | start to READY | first request | warm request (c=1) | c=8 req/s | c=8 p50 "
             "| peak memory per worker |", "|---|---|---|---|---|---|---|",
             f"| bare call | | {served['bare']['first_call_s']:.3f} s | {served['bare']['latency_s']:.3f} s "
             f"| | | {gib(served['bare']['peak_memory_bytes'])} |"]
    for key, figures in served.items():
        if key != "bare":
            lines.append(f"| {key} | {figures['start_to_ready_s']:.1f} s | {figures['first_request_s']:.3f} s "
                         f"| {figures['warm_request_s']:.3f} s | {figures['c8']['throughput_rps']:.2f} "
                         f"| {figures['c8']['p50_s']:.3f} s | {gib(figures['peak_memory_bytes'])} |")
    return [*lines, ""]


def step_lines(results: dict) -> list[str]:
    from devtools.bench.suites import step

    ratio = {name: results["closed"]["step"][key] / results["closed"]["static"][key] for name, key in
             [("4-step p95", "p95_s 4 steps"), ("throughput", "throughput_rps"), ("50-step p95", "p95_s 50 steps")]}
    targets = [(step.TARGETS[0], ratio["4-step p95"]), (step.TARGETS[1], ratio["throughput"]), (step.TARGETS[3], ratio["50-step p95"])]
    return ["Step-level against static batching (mixed: 4, 25 and 50 steps):", "", *step.closed_table(results["closed"]),
            "", step.solo_line(results["solo_difference"]), "", "| target | verdict |", "|---|---|",
            *(f"| {target.name} | {target.verdict(value)} |" for target, value in targets), ""]

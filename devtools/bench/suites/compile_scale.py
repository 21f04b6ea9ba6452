"""Scaling serve.sh's model from 1 to 2 workers, eager against torch.compile: the new compiled worker should
load the first worker's graphs from inductor's cache instead of compiling them. `bench.py --compile-scale`,
about 2 minutes on 2 cores."""

import re
import time
from pathlib import Path

from devtools.bench.archives import build_ours
from devtools.bench.runner import log
from devtools.bench.targets import Target
from devtools.harness.torchserve import TorchServe

VARIANTS = {
    "eager": [],
    "compiled": ["--set", "torch_compile=true"],
    "regions": ["--set", "torch_compile=true", "--set", "compile_regions=true"],
}
SCALE_TARGET = Target("scale-up against eager's", "<=", 1.5)
GRAPHS_TARGET = Target("graphs the new worker compiled", "<=", 0)


def measure(workdir: Path) -> dict:
    store = workdir / "compile-store"
    models = {name: build_ours(store, name, "--source", "digits", "--archive-format", "no-archive", *options)
              for name, options in VARIANTS.items()}
    results = {}
    with TorchServe(workdir / "ts-compile", store, models) as server:
        for name in VARIANTS:
            log_start = server.log_size()
            started = time.perf_counter()
            server.scale(name, 2).raise_for_status()
            results[name] = {"scale_s": time.perf_counter() - started}
            if name == "eager":
                continue
            [(seconds, compiled, loaded)] = re.findall(
                r"warm-up generation took ([\d.]+) s: (\d+) graphs compiled, (\d+) loaded", server.log_since(log_start))
            results[name] |= {"warm_up_s": float(seconds), "graphs_compiled": int(compiled), "graphs_loaded": int(loaded),
                              "vs_eager": results[name]["scale_s"] / results["eager"]["scale_s"]}
            log(f"scale 1 to 2 workers, {name}: {results[name]}")
    return results


def markdown(results: dict) -> list[str]:
    lines = ["| scaling 1 to 2 workers | time | against eager | new worker's warm-up | graphs compiled / loaded |",
             "|---|---|---|---|---|", f"| eager | {results['eager']['scale_s']:.1f} s | 1 | none | - |"]
    for name in ("compiled", "regions"):
        figures = results[name]
        lines.append(f"| {name} | {figures['scale_s']:.1f} s | {figures['vs_eager']:.2f}x | {figures['warm_up_s']:.1f} s "
                     f"| {figures['graphs_compiled']} / {figures['graphs_loaded']} |")
    lines.append("")
    for name in ("compiled", "regions"):
        lines.append(f"{name}: {SCALE_TARGET.name} {SCALE_TARGET.verdict(results[name]['vs_eager'])}; "
                     f"{GRAPHS_TARGET.name} {GRAPHS_TARGET.verdict(results[name]['graphs_compiled'])}")
    return lines

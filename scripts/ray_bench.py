"""Ray Serve against TorchServe, on the same model and machine, in one run (`scripts/bench.py --engine ray`):
the shipped digits model at its native 64x64, 25 steps, batchSize 4, one TorchServe worker against one
Ray Serve replica with the machine's CPUs.

  latency     p50 / p95 at concurrency 1 and 8
  throughput  requests per second at concurrency 1 and 8
  start       from starting the engine until the model answers (TorchServe: READY; Ray: `ray start`
              and the app's deployment)
  memory      PSS and RSS of the TorchServe worker and of the Ray Serve replica

Target: Ray's overhead over TorchServe at concurrency 8 (TorchServe's throughput over Ray's, minus 1)
at most 10 %. Ray runs in a loopback-only network namespace (tests/harness/ray_cluster.py), so this
needs root.
"""

import os
import time
from pathlib import Path

import psutil

from archiver.cli import main as archiver_main
from tests.harness.ray_cluster import RayServeCluster
from tests.harness.torchserve import TorchServe

MODEL = "digits"
CONCURRENCIES = (1, 8)
TARGET_OVERHEAD = 0.10


def body(index: int) -> dict:
    return {"json": {"prompt": f"digit {index % 10}", "seed": index, "num_inference_steps": 25, "output_format": "png"}}


def memory(processes: list[psutil.Process]) -> dict:
    info = [process.memory_full_info() for process in processes]
    return {"pss_bytes": sum(item.pss for item in info), "rss_bytes": sum(item.rss for item in info)}


def measure_engine(server, processes, run_load, count: int, log) -> dict:
    figures = {}
    for concurrency in CONCURRENCIES:
        run_load(server, MODEL, concurrency, 2 * concurrency, body)  # warm
        load = run_load(server, MODEL, concurrency, count, body)
        for key, value in load.items():
            figures[f"{key}_c{concurrency}"] = value
        log(f"  c={concurrency}: p50 {load['p50_s']:.3f} s, p95 {load['p95_s']:.3f} s, {load['throughput_rps']:.2f} req/s")
    figures.update(memory(processes()))
    return figures


def measure(workdir: Path, run_load, log, count: int = 40) -> dict:
    store = workdir / "store"
    assert archiver_main(["build", "--source", "digits", "--model-name", MODEL, "--export-path", str(store),
                          "--batch-size", "4"]) == 0
    results = {}
    log("TorchServe: one worker")
    started = time.perf_counter()
    with TorchServe(workdir / "torchserve", store, {MODEL: f"{MODEL}.mar"}) as torchserve:
        results["torchserve"] = {"start_s": time.perf_counter() - started}
        results["torchserve"].update(measure_engine(torchserve, torchserve.workers, run_load, count, log))
    log("Ray Serve: one replica")
    started = time.perf_counter()
    cpus = os.cpu_count()
    with RayServeCluster(workdir / "ray", {MODEL: store / f"{MODEL}.mar"}, cpus_per_node=cpus,
                         deploy_options=("--num-cpus", str(cpus))) as cluster:
        results["ray"] = {"start_s": time.perf_counter() - started}
        replicas = lambda: [p for p in cluster.processes() if p.name().startswith("ray::ServeReplica")]  # noqa: E731
        results["ray"].update(measure_engine(cluster, replicas, run_load, count, log))
    ours, ray = results["torchserve"], results["ray"]
    results["ray_overhead_c8"] = ours["throughput_rps_c8"] / ray["throughput_rps_c8"] - 1
    return results


def markdown(results: dict) -> list[str]:
    ours, ray = results["torchserve"], results["ray"]
    rows = [
        ("p50 latency, c=1", "p50_s_c1", "s"), ("p95 latency, c=1", "p95_s_c1", "s"),
        ("p50 latency, c=8", "p50_s_c8", "s"), ("p95 latency, c=8", "p95_s_c8", "s"),
        ("throughput, c=1", "throughput_rps_c1", "req/s"), ("throughput, c=8", "throughput_rps_c8", "req/s"),
        ("start to answering", "start_s", "s"),
        ("memory per worker / replica (PSS)", "pss_bytes", "GiB"), ("memory per worker / replica (RSS)", "rss_bytes", "GiB"),
    ]
    lines = ["| digits, 64x64, 25 steps | TorchServe | Ray Serve | Ray / TorchServe |", "|---|---|---|---|"]
    for label, key, unit in rows:
        scale = 2**30 if unit == "GiB" else 1
        a, b = ours[key] / scale, ray[key] / scale
        lines.append(f"| {label} | {a:.3f} {unit} | {b:.3f} {unit} | {b / a:.2f}x |")
    overhead = results["ray_overhead_c8"]
    verdict = "met" if overhead <= TARGET_OVERHEAD else "MISSED"
    lines.append("")
    lines.append(f"Ray's overhead at concurrency 8: {overhead:+.1%} (target <= {TARGET_OVERHEAD:.0%}): {verdict}")
    return lines

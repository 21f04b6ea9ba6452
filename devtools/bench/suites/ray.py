"""Ray Serve against TorchServe, on the same model and machine, in one run: the shipped digits model at
its native 64x64, 25 steps, batchSize 4, one TorchServe worker against one Ray Serve replica with the
machine's CPUs, both running, measured in alternating rounds (medians of 3). `bench.py --engine ray`;
Ray runs in a loopback-only network namespace (devtools/harness/ray_cluster.py), so this needs root.

  latency     p50 / p95 at concurrency 1 and 8
  throughput  requests per second at concurrency 1 and 8
  start       from starting the engine until the model answers
  memory      PSS and RSS of the TorchServe worker and of the Ray Serve replica; PSS of each engine whole
"""

import os
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import psutil

from devtools.bench.archives import build_ours
from devtools.bench.runner import interleaved, log, median_load, run_load
from devtools.bench.targets import Target
from devtools.bench.workload import Workload
from devtools.harness.ray_cluster import RayServeCluster
from devtools.harness.torchserve import TorchServe

WORKLOAD = Workload("digits", ("--source", "digits", "--batch-size", "4"), rounds=3)
COUNTS = {1: 16, 8: 32}  # requests per round, by concurrency
# Ray's overhead: TorchServe's throughput over Ray's at concurrency 8, minus 1, the median of the rounds.
TARGET = Target("Ray's overhead at concurrency 8", "<=", 0.10)


def body(index: int) -> dict:
    return {"json": {"prompt": f"digit {index % 10}", "seed": index, "num_inference_steps": 25, "output_format": "png"}}


def memory(processes: list[psutil.Process]) -> dict:
    info = [process.memory_full_info() for process in processes]
    return {"pss_bytes": sum(item.pss for item in info), "rss_bytes": sum(item.rss for item in info)}


def measure(workdir: Path) -> dict:
    store = workdir / "store"
    archive = build_ours(store, WORKLOAD.name, *WORKLOAD.archiver_args)
    cpus = os.cpu_count()
    with ExitStack() as stack:
        started = time.perf_counter()
        torchserve = stack.enter_context(TorchServe(workdir / "torchserve", store, {WORKLOAD.name: archive}))
        starts = {"torchserve": time.perf_counter() - started}
        started = time.perf_counter()
        cluster = stack.enter_context(RayServeCluster(workdir / "ray", {WORKLOAD.name: store / archive},
                                                      cpus_per_node=cpus, app_args={"num_cpus": cpus}))
        starts["ray"] = time.perf_counter() - started
        # The model's replicas are the deployment named after the model (handlers/ray/app.py's build_app).
        replica = f"ray::ServeReplica:{WORKLOAD.name}:{WORKLOAD.name}"
        engines = {"torchserve": (torchserve, torchserve.workers, torchserve.processes),
                   "ray": (cluster, lambda: [p for p in cluster.processes() if p.name() == replica], cluster.processes)}
        for server, _, _ in engines.values():
            for concurrency in COUNTS:  # warm
                run_load(lambda index: server.predict(WORKLOAD.name, **body(index)), concurrency, 2 * concurrency)
        rounds = interleaved({(name, concurrency): (lambda server=server, concurrency=concurrency: run_load(
            lambda index: server.predict(WORKLOAD.name, **body(index)), concurrency, COUNTS[concurrency]))
            for concurrency in COUNTS for name, (server, _, _) in engines.items()}, WORKLOAD.rounds)
        results = {name: {"start_s": starts[name]} for name in engines}
        for (name, concurrency), loads in rounds.items():
            for key, value in median_load(loads).as_dict().items():
                results[name][f"{key}_c{concurrency}"] = value
            log(f"{name}, c={concurrency}: {[load.throughput_rps for load in loads]} req/s")
        for name, (_, workers, processes) in engines.items():
            results[name] |= memory(workers()) | {"engine_pss_bytes": memory(processes())["pss_bytes"]}
    # Each round's engines ran a minute apart at most: their ratio is the comparison, its median the result.
    results["ray_overhead_c8"] = statistics.median(
        ours.throughput_rps / ray.throughput_rps - 1 for ours, ray in zip(rounds[("torchserve", 8)], rounds[("ray", 8)]))
    return results


def markdown(results: dict) -> list[str]:
    ours, ray = results["torchserve"], results["ray"]
    rows = [
        ("p50 latency, c=1", "p50_s_c1", "s"), ("p95 latency, c=1", "p95_s_c1", "s"),
        ("p50 latency, c=8", "p50_s_c8", "s"), ("p95 latency, c=8", "p95_s_c8", "s"),
        ("throughput, c=1", "throughput_rps_c1", "req/s"), ("throughput, c=8", "throughput_rps_c8", "req/s"),
        ("start to answering", "start_s", "s"),
        ("memory per worker / replica (PSS)", "pss_bytes", "GiB"), ("memory per worker / replica (RSS)", "rss_bytes", "GiB"),
        ("memory of the whole engine (PSS)", "engine_pss_bytes", "GiB"),
    ]
    lines = ["| digits, 64x64, 25 steps (medians of 3 alternating rounds) | TorchServe | Ray Serve | Ray / TorchServe |",
             "|---|---|---|---|"]
    for label, key, unit in rows:
        scale = 2**30 if unit == "GiB" else 1
        a, b = ours[key] / scale, ray[key] / scale
        lines.append(f"| {label} | {a:.3f} {unit} | {b:.3f} {unit} | {b / a:.2f}x |")
    return [*lines, "", f"{TARGET.name}: {TARGET.verdict(results['ray_overhead_c8'])}"]

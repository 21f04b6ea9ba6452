"""Ray Serve against TorchServe, on the same model and machine, in one run (`scripts/bench.py --engine ray`):
the shipped digits model at its native 64x64, 25 steps, batchSize 4, one TorchServe worker against one
Ray Serve replica with the machine's CPUs, both running, measured in alternating rounds (medians of 3).

  latency     p50 / p95 at concurrency 1 and 8
  throughput  requests per second at concurrency 1 and 8
  start       from starting the engine until the model answers (TorchServe: READY; Ray: `ray start`
              and the app's deployment)
  memory      PSS and RSS of the TorchServe worker and of the Ray Serve replica; PSS of each engine as
              a whole (TorchServe: the Java frontend and the worker; Ray: every process of the cluster,
              its HTTP proxy, controller, HTTP ingress, raylet and GCS included)

Target: Ray's overhead over TorchServe at concurrency 8 (TorchServe's throughput over Ray's, minus 1,
in each round; the median of the rounds) at most 10 %. Ray runs in a loopback-only network namespace (tests/harness/ray_cluster.py), so this
needs root.
"""

import os
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import psutil

from archiver.cli import main as archiver_main
from devtools.harness.ray_cluster import RayServeCluster
from devtools.harness.torchserve import TorchServe

MODEL = "digits"
CONCURRENCIES = (1, 8)
COUNTS = {1: 16, 8: 32}  # requests per round
ROUNDS = 3
TARGET_OVERHEAD = 0.10


def body(index: int) -> dict:
    return {"json": {"prompt": f"digit {index % 10}", "seed": index, "num_inference_steps": 25, "output_format": "png"}}


def memory(processes: list[psutil.Process]) -> dict:
    info = [process.memory_full_info() for process in processes]
    return {"pss_bytes": sum(item.pss for item in info), "rss_bytes": sum(item.rss for item in info)}


def measure(workdir: Path, run_load, log, rounds: int = ROUNDS) -> dict:
    """Both engines run side by side, idle but for the one measured; rounds alternate between them so
    that the machine's drift (this 2-core VM's speed varies by 20 % from minute to minute) falls on both."""
    store = workdir / "store"
    assert archiver_main(["build", "--source", "digits", "--model-name", MODEL, "--export-path", str(store),
                          "--batch-size", "4"]) == 0
    cpus = os.cpu_count()
    with ExitStack() as stack:
        started = time.perf_counter()
        torchserve = stack.enter_context(TorchServe(workdir / "torchserve", store, {MODEL: f"{MODEL}.mar"}))
        ts_start = time.perf_counter() - started
        started = time.perf_counter()
        cluster = stack.enter_context(RayServeCluster(workdir / "ray", {MODEL: store / f"{MODEL}.mar"},
                                                      cpus_per_node=cpus, deploy_options=("--num-cpus", str(cpus))))
        ray_start = time.perf_counter() - started
        # The model's replicas are the deployment named after the model (handlers/ray_serve.py's build_app).
        replicas = lambda: [p for p in cluster.processes() if p.name() == f"ray::ServeReplica:{MODEL}:{MODEL}"]  # noqa: E731
        engines = {"torchserve": (torchserve, torchserve.workers, torchserve.processes),
                   "ray": (cluster, replicas, cluster.processes)}
        loads = {name: {concurrency: [] for concurrency in CONCURRENCIES} for name in engines}
        for server, _, _ in engines.values():
            for concurrency in CONCURRENCIES:
                run_load(server, MODEL, concurrency, 2 * concurrency, body)  # warm
        for round_number in range(1, rounds + 1):
            for concurrency in CONCURRENCIES:
                for name, (server, _, _) in engines.items():
                    load = run_load(server, MODEL, concurrency, COUNTS[concurrency], body)
                    loads[name][concurrency].append(load)
                    log(f"round {round_number}, {name}, c={concurrency}: p50 {load['p50_s']:.3f} s, "
                        f"p95 {load['p95_s']:.3f} s, {load['throughput_rps']:.2f} req/s")
        results = {"torchserve": {"start_s": ts_start}, "ray": {"start_s": ray_start}}
        for name, (_, processes, engine_processes) in engines.items():
            for concurrency, runs in loads[name].items():
                for key in runs[0]:
                    results[name][f"{key}_c{concurrency}"] = statistics.median(run[key] for run in runs)
            results[name].update(memory(processes()))
            results[name]["engine_pss_bytes"] = memory(engine_processes())["pss_bytes"]
    # Each round's engines ran a minute apart at most: their ratio is the comparison, its median the result.
    results["ray_overhead_c8"] = statistics.median(
        ours["throughput_rps"] / ray["throughput_rps"] - 1 for ours, ray in zip(loads["torchserve"][8], loads["ray"][8])
    )
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
    overhead = results["ray_overhead_c8"]
    verdict = "met" if overhead <= TARGET_OVERHEAD else "MISSED"
    lines.append("")
    lines.append(f"Ray's overhead at concurrency 8: {overhead:+.1%} (target <= {TARGET_OVERHEAD:.0%}): {verdict}")
    return lines

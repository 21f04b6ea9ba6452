"""serve.sh's archive (digits, batchSize 4) at each maxBatchDelay: the wait of a lone request (TorchServe's
own "Waiting time ns"), its latency at 1 and 25 steps, and throughput and mean batch size at concurrency 8.
`bench.py --batch-delay`, a few minutes on 2 cores."""

import re
import statistics
from pathlib import Path

from devtools.bench.archives import build_ours
from devtools.bench.runner import interleaved, log, run_load
from devtools.harness.torchserve import TorchServe

# Not 0: TorchServe 0.12.0 takes a maxBatchDelay of 0 as unset and waits its default 100 ms.
BATCH_DELAYS_MS = (1, 2, 4, 25, 100)
C8_ROUNDS = 5  # throughput at concurrency 8 varies by about 10 % run to run on 2 cores
COUNT = 20


def digits_request(steps: int):
    return lambda index: {"json": {"prompt": f"digit {index % 10}", "seed": index, "num_inference_steps": steps,
                                   "output_format": "png"}}


def batch_sizes(log_text: str) -> list[int]:
    """The size of every batch the handler received (its "batch of N requests" lines)."""
    return [int(size) for size in re.findall(r"batch of (\d+) requests", log_text)]


def waiting_times(log_text: str, model: str) -> list[float]:
    """Seconds each request waited between arrival and its batch going to the worker (queue + batch wait)."""
    pattern = rf"W-\d+-{re.escape(model)}_[\d.]+ \S+ - Waiting time ns: (\d+)"
    return [int(nanoseconds) / 1e9 for nanoseconds in re.findall(pattern, log_text)]


def measure(workdir: Path) -> dict:
    store = workdir / "delay-store"
    models = {f"delay_{delay}": build_ours(store, f"delay_{delay}", "--source", "digits", "--archive-format", "no-archive",
                                           "--batch-size", "4", "--max-batch-delay", str(delay))
              for delay in BATCH_DELAYS_MS}
    results = {delay: {} for delay in BATCH_DELAYS_MS}
    with TorchServe(workdir / "ts-delay", store, models) as server:
        for delay in BATCH_DELAYS_MS:
            model = f"delay_{delay}"
            send = {steps: digits_request(steps) for steps in (1, 25)}
            start = server.log_size("ts_log.log")
            for steps in (1, 25):
                load = run_load(lambda index: server.predict(model, **send[steps](index)), 1, COUNT)
                results[delay][f"c1_p50_s_{steps}_steps"] = load.p50_s
            results[delay]["lone_wait_s"] = statistics.median(waiting_times(server.log_since(start, "ts_log.log"), model))

        def c8(delay: int):
            start = server.log_size()
            send = digits_request(25)
            load = run_load(lambda index: server.predict(f"delay_{delay}", **send(index)), 8, 2 * COUNT)
            return load.throughput_rps, batch_sizes(server.log_since(start))

        rounds = interleaved({delay: (lambda delay=delay: c8(delay)) for delay in BATCH_DELAYS_MS}, C8_ROUNDS)
        for delay, runs in rounds.items():
            results[delay]["c8_rps"] = statistics.median(rps for rps, _ in runs)
            results[delay]["c8_mean_batch"] = statistics.mean(size for _, sizes in runs for size in sizes)
            log(f"maxBatchDelay {delay} ms: {results[delay]}")
    return results


def markdown(results: dict) -> list[str]:
    slowest = results[max(results)]
    lines = ["| maxBatchDelay | lone request's wait | c=1 p50, 1 step | c=1 p50, 25 steps | c=8 req/s, 25 steps | "
             f"c=8 vs {max(results)} ms | mean batch at c=8 |", "|---|---|---|---|---|---|---|"]
    for delay, figures in results.items():
        lines.append(f"| {delay} ms | {figures['lone_wait_s'] * 1000:.1f} ms | {figures['c1_p50_s_1_steps'] * 1000:.0f} ms "
                     f"| {figures['c1_p50_s_25_steps'] * 1000:.0f} ms | {figures['c8_rps']:.2f} | "
                     f"{figures['c8_rps'] / slowest['c8_rps']:.3f} | {figures['c8_mean_batch']:.2f} |")
    return lines

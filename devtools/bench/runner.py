"""The one load runner: concurrent requests, their latencies and throughput, and rounds interleaved
between the things compared, so that this machine's drift (20 % from minute to minute on the 2-core VM)
falls on all of them alike."""

import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import requests

Send = Callable[[int], requests.Response]  # sends request number i, answers its response


@dataclass
class Load:
    p50_s: float
    p95_s: float
    throughput_rps: float
    body_bytes: float

    def as_dict(self) -> dict:
        return asdict(self)


def run_load(send: Send, concurrency: int, count: int) -> Load:
    """count requests from concurrency clients; every response must be 200."""
    latencies, sizes = [], []
    lock = threading.Lock()

    def one(index: int) -> None:
        started = time.perf_counter()
        response = send(index)
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
    return Load(p50_s=latencies[len(latencies) // 2],
                p95_s=latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
                throughput_rps=count / wall, body_bytes=statistics.median(sizes))


def interleaved(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list]:
    """Each run once per round, round-robin: what each measured, in order."""
    measured = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            measured[name].append(run())
    return measured


def median_load(loads: list[Load]) -> Load:
    return Load(**{key: statistics.median(getattr(load, key) for load in loads) for key in asdict(loads[0])})


def timed(send: Callable[[], requests.Response]) -> float:
    """Seconds one request takes; it must be answered 200."""
    started = time.perf_counter()
    send().raise_for_status()
    return time.perf_counter() - started


def median_seconds(call: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
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

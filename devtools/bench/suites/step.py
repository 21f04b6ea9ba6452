"""Step-level batching against static batching (`bench.py --step`): one TorchServe serving the digits model
twice, as serve.sh builds it (batchSize 4, the shipped defaults: combined batching) and the same with
`--batching step`, measured in interleaved rounds on the same mixed traffic:

- closed loop at concurrency 8; open loop at fixed arrival rates, as fractions of static batching's
  closed-loop throughput, up to past its saturation (the same seeded arrival schedule for both);
- the mix: a third each at 4 steps (dpmpp_2m), 25 and 50 steps, random seeds, guidance between 1 and 7;
- a lone request; the digits oracle on the step mode's images, and each one's difference from the same
  request run alone through the pipeline.
"""

import io
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from archiver.sources import DIGITS_DIR
from devtools.bench.archives import build_ours
from devtools.bench.runner import interleaved, log, timed
from devtools.bench.targets import Target, targets_table
from devtools.harness.torchserve import TorchServe

MODES = ("static", "step")
MIX = ({"num_inference_steps": 4, "scheduler": "dpmpp_2m"}, {"num_inference_steps": 25}, {"num_inference_steps": 50})
CLASSES = ("4 steps", "25 steps", "50 steps")
CONCURRENCY = 8
CLOSED_COUNT = 96  # a p95 over 32 requests of each class per round; 16 moved it by 10 % from run to run
ROUNDS = 3
RATES = (0.5, 0.8, 1.0, 1.25, 1.5)  # x static batching's closed-loop throughput
OPEN_COUNT = 60  # at rates both modes keep up with, the last answer's latency moved the ratio by 1 % at 36
# A lone request's latency drifted by 30 % between rounds a minute apart; pairs taken back to back, in
# alternating order, cancel the drift, and their median ratio is the figure.
LONE_PAIRS = 30
SOLO_CHECKS = 24
TARGETS = [
    Target("p95 latency of 4-step requests, c=8 (step / static)", "<=", 0.4),
    Target("throughput, c=8 (step / static)", ">=", 1.15),
    Target("lowest throughput ratio over the arrival rates (step / static)", ">=", 1.0),
    Target("p95 latency of 50-step requests, c=8 (step / static)", "<=", 1.1),
    Target("lone request's latency (step / static)", "<=", 1.05),
    Target("digits the oracle reads correctly, step mode (%)", ">=", 90),
]


def workload(count: int, seed: int, size: int | None = None) -> list[dict]:
    """count requests, a third of each class in a shuffled order, each with its own seed and guidance (and
    the size, where the model's default is not the one to measure)."""
    rng = random.Random(seed)
    bodies = []
    for index in range(count):
        digit = rng.randrange(10)
        bodies.append({"prompt": f"digit {digit}", "seed": rng.randrange(2**31), "output_format": "png",
                       "guidance_scale": round(rng.uniform(1, 7), 2), **MIX[index % len(MIX)],
                       **({"height": size, "width": size} if size else {})})
    rng.shuffle(bodies)
    return bodies


def class_of(body: dict) -> str:
    return f"{body['num_inference_steps']} steps"


def p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


def send_all(server: TorchServe, model: str, bodies: list[dict], concurrency: int | None = None,
             arrivals: list[float] | None = None) -> dict:
    """Every body answered (closed loop with concurrency clients, or open loop at the arrival times, seconds
    from the start): latencies by class, throughput, and the images."""
    latencies = {name: [] for name in CLASSES}
    images = [None] * len(bodies)
    lock = threading.Lock()
    start = time.perf_counter()

    def one(index: int) -> None:
        if arrivals is not None:
            time.sleep(max(0.0, start + arrivals[index] - time.perf_counter()))
        sent = time.perf_counter()
        response = server.predict(model, json=bodies[index])
        response.raise_for_status()
        with lock:
            latencies[class_of(bodies[index])].append(time.perf_counter() - sent)
            images[index] = response.content

    with ThreadPoolExecutor(concurrency or len(bodies)) as pool:
        list(pool.map(one, range(len(bodies))))
    return {"latencies": latencies, "throughput_rps": len(bodies) / (time.perf_counter() - start), "images": images}


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    at, arrivals = 0.0, []
    for _ in range(count):
        at += rng.expovariate(rate)
        arrivals.append(at)
    return arrivals


def measure(workdir: Path) -> dict:
    store = workdir / "step-store"
    common = ("--source", "digits", "--archive-format", "no-archive", "--batch-size", "4")
    models = {"static": build_ours(store, "static", *common), "step": build_ours(store, "step", *common, "--batching", "step")}
    with TorchServe(workdir / "ts-step", store, models) as server:
        lone = lone_latencies(server)
        closed = interleaved({mode: (lambda mode=mode: send_all(server, mode, workload(CLOSED_COUNT, 1), CONCURRENCY))
                              for mode in MODES}, ROUNDS)
        static_rps = statistics.median(run["throughput_rps"] for run in closed["static"])
        log(f"closed loop: {({mode: summary(merged(closed[mode])) for mode in MODES})}")
        open_loop = {}
        for rate in RATES:
            arrivals = poisson_arrivals(OPEN_COUNT, rate * static_rps, seed=int(rate * 100))
            runs = interleaved({mode: (lambda mode=mode: send_all(server, mode, workload(OPEN_COUNT, 2), arrivals=arrivals))
                                for mode in MODES}, 1)
            open_loop[rate] = {mode: summary(runs[mode][0]) for mode in MODES}
            log(f"open loop at {rate}x: {open_loop[rate]}")
    step_images = [image for run in closed["step"] for image in run["images"]]
    step_bodies = workload(CLOSED_COUNT, 1) * ROUNDS
    return {
        "lone": lone,
        "closed": {mode: summary(merged(closed[mode])) for mode in MODES},
        "static_rps": static_rps,
        "open": open_loop,
        "oracle_percent": oracle_percent(step_bodies, step_images),
        "solo_difference": solo_difference(step_bodies[:SOLO_CHECKS], step_images[:SOLO_CHECKS]),
    }


def lone_latencies(server: TorchServe) -> dict:
    """A lone 25-step request on each model, in pairs: the median latency of each, and the median ratio."""
    body = {"prompt": "digit 3", "seed": 3, "num_inference_steps": 25, "output_format": "png"}
    send = {mode: (lambda mode=mode: server.predict(mode, json=body)) for mode in MODES}
    for mode in MODES:
        timed(send[mode])  # warm
    pairs = []
    for index in range(LONE_PAIRS):
        order = MODES if index % 2 == 0 else MODES[::-1]
        pairs.append({mode: timed(send[mode]) for mode in order})
    return {**{f"{mode}_s": statistics.median(pair[mode] for pair in pairs) for mode in MODES},
            "ratio": statistics.median(pair["step"] / pair["static"] for pair in pairs)}


def merged(runs: list[dict]) -> dict:
    """The rounds of one mode together: all latencies, the median throughput."""
    return {"latencies": {name: [value for run in runs for value in run["latencies"][name]] for name in CLASSES},
            "throughput_rps": statistics.median(run["throughput_rps"] for run in runs)}


def summary(run: dict) -> dict:
    return {"throughput_rps": run["throughput_rps"],
            **{f"p95_s {name}": p95(run["latencies"][name]) for name in CLASSES},
            **{f"p50_s {name}": statistics.median(run["latencies"][name]) for name in CLASSES}}


def oracle_percent(bodies: list[dict], pngs: list[bytes]) -> float:
    from devtools.models.digits import DigitsOracle

    labels = DigitsOracle().labels([Image.open(io.BytesIO(png)) for png in pngs])
    asked = [int(body["prompt"].split()[-1]) for body in bodies]
    return 100 * sum(label == digit for label, digit in zip(labels, asked)) / len(asked)


def solo_difference(bodies: list[dict], pngs: list[bytes], model_dir: Path = DIGITS_DIR, gpu_id: int | None = None,
                    **settings) -> dict:
    """Grey levels between each served image and the same request run alone through diffusers' pipeline call.
    settings: the served model's handler settings that change pixels (torch_dtype)."""
    from handlers.core.config import HandlerConfig
    from handlers.core.schema import GenerationRequest
    from handlers.core.service import DiffusionService

    config = HandlerConfig(height=64, width=64, batching="per_request", warm_up=False, **settings)
    service = DiffusionService(model_dir, config, gpu_id)
    differences = []
    for body, png in zip(bodies, pngs):
        fields = {"height": 64, "width": 64, **{key: value for key, value in body.items() if key != "output_format"}}
        [alone] = service.generate([GenerationRequest(**fields)])
        served = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        differences.append(int(np.abs(served - np.asarray(alone.images[0]).astype(int)).max()))
    return {"max": max(differences), "mean": statistics.mean(differences), "identical": differences.count(0),
            "checked": len(differences)}


def ratios(results: dict) -> dict[str, float]:
    static, step = results["closed"]["static"], results["closed"]["step"]
    return {
        TARGETS[0].name: step["p95_s 4 steps"] / static["p95_s 4 steps"],
        TARGETS[1].name: step["throughput_rps"] / static["throughput_rps"],
        TARGETS[2].name: min(run["step"]["throughput_rps"] / run["static"]["throughput_rps"]
                             for run in results["open"].values()),
        TARGETS[3].name: step["p95_s 50 steps"] / static["p95_s 50 steps"],
        TARGETS[4].name: results["lone"]["ratio"],
        TARGETS[5].name: results["oracle_percent"],
    }


def closed_table(closed: dict) -> list[str]:
    static, step = closed["static"], closed["step"]
    lines = ["| closed loop, c=8 | static | step | step / static |", "|---|---|---|---|"]
    for key, label in [("throughput_rps", "throughput (req/s)"), *((f"p50_s {name}", f"p50, {name} (s)") for name in CLASSES),
                       *((f"p95_s {name}", f"p95, {name} (s)") for name in CLASSES)]:
        lines.append(f"| {label} | {static[key]:.3f} | {step[key]:.3f} | {step[key] / static[key]:.2f}x |")
    return lines


def solo_line(solo: dict) -> str:
    levels = "grey level" if solo["max"] == 1 else "grey levels"
    return (f"Against the same request run alone: at most {solo['max']} {levels} (mean {solo['mean']:.2f}; "
            f"{solo['identical']} of {solo['checked']} identical).")


def markdown(results: dict) -> list[str]:
    lines = closed_table(results["closed"])
    lone = results["lone"]
    lines.append(f"| lone 25-step request (s; ratio: the median of {LONE_PAIRS} pairs) | {lone['static_s']:.3f} | "
                 f"{lone['step_s']:.3f} | {lone['ratio']:.2f}x |")
    lines += ["", "| open loop: arrivals (x static capacity) | static req/s | step req/s | ratio | "
              "static p95, 4 steps | step p95, 4 steps |", "|---|---|---|---|---|---|"]
    for rate, run in results["open"].items():
        lines.append(f"| {rate} ({rate * results['static_rps']:.2f}/s) | {run['static']['throughput_rps']:.3f} | "
                     f"{run['step']['throughput_rps']:.3f} | {run['step']['throughput_rps'] / run['static']['throughput_rps']:.2f}x "
                     f"| {run['static']['p95_s 4 steps']:.3f} s | {run['step']['p95_s 4 steps']:.3f} s |")
    lines += ["", solo_line(results["solo_difference"]), ""]
    return lines + targets_table(TARGETS, ratios(results))

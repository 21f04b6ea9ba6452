"""Ours against BentoML, side by side in one run: `scripts/bench.py` calls this (--quick: the digits
model; the full run and --bentoml add the tiny SD model at 256x256 and 512x512).

Ours is the archive that `serve.sh` builds (the archiver's defaults, batchSize 4); BentoML is the
service in baseline/bentoml_service.py, written the way BentoML's diffusers documentation writes
one, on the same pipeline directory. Both bind to 127.0.0.1, both answer PNG, and the client is the
same. The c=1 requests alternate between the engines and the c=8 runs go round-robin, so drift in
the machine's speed falls on both alike; every figure is a median.
"""

import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import requests
import yaml

from devtools import REPO_ROOT
from archiver.cli import main as archiver_main
from devtools.harness.torchserve import OwnedServer, TorchServe, free_port

SERVICE_DIR = REPO_ROOT / "scripts" / "baseline"
TARGETS = {"c1_1_step": ("<=", 1.1), "c1_25_steps": ("<=", 1.1), "c8_25_steps": (">=", 2.0)}


@dataclass(frozen=True)
class Case:
    name: str
    archiver_args: tuple[str, ...]  # beside serve.sh's own: --batch-size 4
    size: int
    guidance: float
    c1_requests: int  # per engine and step count
    c8_requests: int  # per run
    c8_runs: int  # per engine, round-robin
    has_targets: bool


DIGITS = Case("digits", ("--source", "digits"), 64, 4.0, 30, 16, 3, True)
LARGER = (
    Case("tiny SD 256", ("--source", "tiny", "--height", "256", "--width", "256"), 256, 7.5, 5, 8, 1, False),
    Case("tiny SD 512", ("--source", "tiny", "--height", "512", "--width", "512"), 512, 7.5, 3, 8, 1, False),
)


class BentoMLService(OwnedServer):
    """`bentoml serve` on loopback, in its own process group, stopped with everything it started."""

    def __init__(self, workdir: Path, pipeline_dir: Path):
        self.workdir, self.pipeline_dir = workdir, pipeline_dir
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = None

    def start(self, timeout_s: float = 300) -> "BentoMLService":
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "BENTO_PIPELINE_DIR": str(self.pipeline_dir), "BENTOML_HOME": str(self.workdir / "home"),
               "BENTOML_DO_NOT_TRACK": "true"}
        bentoml = Path(sys.executable).with_name("bentoml")
        if not bentoml.exists():
            raise SystemExit(f"BentoML is not installed beside {sys.executable}: pip install -e '.[bench]'")
        self.log = open(self.workdir / "bentoml.out", "wb")
        self.process = subprocess.Popen(
            [str(bentoml), "serve", "bentoml_service:DiffusersService", "--host", "127.0.0.1",
             "--port", self.url.rsplit(":", 1)[1]],
            cwd=SERVICE_DIR, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"BentoML did not become ready:\n{(self.workdir / 'bentoml.out').read_text()[-3000:]}")
            time.sleep(0.5)
        return self

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def predict(self, body: dict) -> requests.Response:
        return requests.post(f"{self.url}/txt2img", json=body, timeout=600)


def timed(call) -> tuple[float, int]:
    started = time.perf_counter()
    response = call()
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, len(response.content)


def throughput(call, requests_count: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda index: timed(lambda: call(index)), range(requests_count)))
    return requests_count / (time.perf_counter() - started)


# TorchServe's frontend is Java: its request path runs interpreted until the JIT has seen it some
# hundred times (a refused request: 18 ms at first, 11 ms after 400 requests). A serving process is
# warm; so both engines get the same warm-up before anything is timed.
WARM_UP_REQUESTS = 400
REFUSED = {"prompt": "digit 7", "num_inference_steps": 0}  # a 400 on both engines: no generation


def fixed_costs(ours: TorchServe, name: str, bento: BentoMLService, count: int) -> dict:
    """Warm both engines up, then time what each costs a request that does no work."""
    calls = {"ours": lambda: ours.predict(name, json=REFUSED), "bentoml": lambda: bento.predict(REFUSED)}
    for _ in range(WARM_UP_REQUESTS):
        for call in calls.values():
            call()
    timings = {engine: [] for engine in calls}
    for _ in range(count):
        for engine, call in calls.items():
            started = time.perf_counter()
            status = call().status_code
            timings[engine].append(time.perf_counter() - started)
            assert status == 400, f"{engine} answered {status} to a request with 0 steps"
    return {f"{engine}_refused_s": statistics.median(values) for engine, values in timings.items()}


def compare(workdir: Path, case: Case, log) -> dict:
    store = workdir / "bento-store"
    name = "ours_" + case.name.replace(" ", "_")
    assert archiver_main(["build", *case.archiver_args, "--batch-size", "4", "--model-name", name,
                          "--export-path", str(store), "--archive-format", "no-archive"]) == 0
    model_dir = store / name  # the pipeline's files sit at its root: BentoML loads the same directory
    ours = TorchServe(workdir / f"ts-{name}", store, {name: name}).start(timeout_s=600)
    bento = None
    try:
        bento = BentoMLService(workdir / f"bento-{name}", model_dir).start()
        batching = yaml.safe_load((model_dir / "model-config.yaml").read_text())["handler"]["batching"]

        def body(steps: int, seed: int) -> dict:
            return {"prompt": "digit 7" if case is DIGITS else "a red square", "num_inference_steps": steps,
                    "guidance_scale": case.guidance, "height": case.size, "width": case.size}

        engines = {
            "ours": lambda steps, seed: ours.predict(name, json={**body(steps, seed), "seed": seed, "output_format": "png"}),
            "bentoml": lambda steps, seed: bento.predict(body(steps, seed)),
        }
        results = {"batching": batching, **fixed_costs(ours, name, bento, case.c1_requests)}
        for steps in (1, 25):
            latencies = {engine: [] for engine in engines}
            sizes = {engine: [] for engine in engines}
            for engine, call in engines.items():
                call(steps, 0).raise_for_status()  # first requests pay one-time costs on both sides
            for seed in range(case.c1_requests):
                for engine, call in engines.items():
                    elapsed, size = timed(lambda: call(steps, seed))
                    latencies[engine].append(elapsed)
                    sizes[engine].append(size)
            for engine in engines:
                results[f"{engine}_c1_{steps}_steps_s"] = statistics.median(latencies[engine])
                results[f"{engine}_body_bytes"] = statistics.median(sizes[engine])
        rates = {engine: [] for engine in engines}
        for _ in range(case.c8_runs):
            for engine, call in engines.items():
                rates[engine].append(throughput(lambda seed: call(25, seed), case.c8_requests))
        for engine in engines:
            results[f"{engine}_c8_25_steps_rps"] = statistics.median(rates[engine])
    finally:
        if bento is not None:
            bento.stop()
        ours.stop()
    results["c1_1_step"] = results["ours_c1_1_steps_s"] / results["bentoml_c1_1_steps_s"]
    results["c1_25_steps"] = results["ours_c1_25_steps_s"] / results["bentoml_c1_25_steps_s"]
    results["c8_25_steps"] = results["ours_c8_25_steps_rps"] / results["bentoml_c8_25_steps_rps"]
    log(f"{case.name}: c=1 {results['c1_1_step']:.2f}x (1 step), {results['c1_25_steps']:.2f}x (25 steps) of "
        f"BentoML's latency; c=8 {results['c8_25_steps']:.2f}x its throughput; batching: {batching}")
    return results


def measure(workdir: Path, cases: tuple[Case, ...], log) -> dict:
    return {case.name: compare(workdir, case, log) for case in cases}


def verdict(name: str, value: float) -> str:
    direction, bound = TARGETS[name]
    met = value <= bound if direction == "<=" else value >= bound
    return f"{'met' if met else 'MISSED'} ({value:.2f} {direction} {bound})"


def markdown(results: dict) -> list[str]:
    lines = [
        f"Ours (TorchServe {version('torchserve')}, serve.sh's archive: the archiver's defaults, batchSize 4) against "
        f"BentoML {version('bentoml')}, same pipeline directory, PNG, loopback:",
        "",
        "| model | c=1, 1 step | c=1, 25 steps | c=8, 25 steps (images/s) | PNG body | a refused request (fixed cost, warm) | our batching |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['ours_c1_1_steps_s'] * 1000:.0f} ms against {r['bentoml_c1_1_steps_s'] * 1000:.0f} ms "
            f"({r['c1_1_step']:.2f}x) | {r['ours_c1_25_steps_s'] * 1000:.0f} ms against "
            f"{r['bentoml_c1_25_steps_s'] * 1000:.0f} ms ({r['c1_25_steps']:.2f}x) | {r['ours_c8_25_steps_rps']:.2f} "
            f"against {r['bentoml_c8_25_steps_rps']:.2f} ({r['c8_25_steps']:.2f}x) | {r['ours_body_bytes']:.0f} B "
            f"against {r['bentoml_body_bytes']:.0f} B | {r['ours_refused_s'] * 1000:.1f} ms against "
            f"{r['bentoml_refused_s'] * 1000:.1f} ms | {r['batching']} |"
        )
    if DIGITS.name in results:
        lines += ["", "| target (digits model, default settings) | result |", "|---|---|"]
        lines += [f"| {name}: ours/BentoML | {verdict(name, results[DIGITS.name][name])} |" for name in TARGETS]
    return lines

"""Ours against BentoML, side by side in one run: serve.sh's archive (the archiver's defaults, batchSize 4)
against the service in devtools/baselines/bentoml_service.py, written the way BentoML's diffusers
documentation writes one, on the same pipeline directory. Both bind to 127.0.0.1, both answer PNG, and the
client is the same. The c=1 requests alternate between the engines and the c=8 runs go round-robin.
`bench.py --bentoml` (digits, then the tiny model at 256x256 and 512x512; about 10 minutes)."""

import statistics
import time
from importlib.metadata import version
from pathlib import Path

import yaml

from devtools.bench.archives import build_ours
from devtools.bench.runner import interleaved, log, run_load, timed
from devtools.bench.targets import Target, targets_table
from devtools.bench.workload import Workload
from devtools.harness.bentoml import BentoMLService
from devtools.harness.torchserve import TorchServe

DIGITS = Workload("digits", ("--source", "digits"), size=64, guidance=4.0, requests=30, rounds=3)
LARGER = (
    Workload("tiny SD 256", ("--source", "tiny", "--height", "256", "--width", "256"), size=256, requests=5, rounds=1),
    Workload("tiny SD 512", ("--source", "tiny", "--height", "512", "--width", "512"), size=512, requests=3, rounds=1),
)
TARGETS = [Target("c1_1_step", "<=", 1.1), Target("c1_25_steps", "<=", 1.1), Target("c8_25_steps", ">=", 2.0)]
C8_REQUESTS = 16
# TorchServe's frontend is Java: its request path runs interpreted until the JIT has seen it some hundred
# times (a refused request: 18 ms at first, 11 ms after 400). A serving process is warm, so both engines
# get the same warm-up before anything is timed.
WARM_UP_REQUESTS = 400
REFUSED = {"prompt": "digit 7", "num_inference_steps": 0}  # a 400 on both engines: no generation


def compare(workdir: Path, workload: Workload) -> dict:
    store = workdir / "bento-store"
    name = "ours_" + workload.name.replace(" ", "_")
    build_ours(store, name, *workload.archiver_args, "--batch-size", "4", "--archive-format", "no-archive")
    with TorchServe(workdir / f"ts-{name}", store, {name: name}) as ours, \
            BentoMLService(workdir / f"bento-{name}", store / name) as bento:  # the archive's root is the pipeline
        def body(steps: int) -> dict:
            return {"prompt": "digit 7" if workload is DIGITS else "a red square", "num_inference_steps": steps,
                    "guidance_scale": workload.guidance, "height": workload.size, "width": workload.size}

        engines = {"ours": lambda steps, seed: ours.predict(name, json={**body(steps), "seed": seed, "output_format": "png"}),
                   "bentoml": lambda steps, seed: bento.predict(body(steps))}
        refused = {"ours": lambda: ours.predict(name, json=REFUSED), "bentoml": lambda: bento.predict(REFUSED)}
        for _ in range(WARM_UP_REQUESTS):
            for call in refused.values():
                call()
        fixed = interleaved({engine: lambda call=call: timed_refusal(call) for engine, call in refused.items()},
                            workload.requests)
        results = {"batching": yaml.safe_load((store / name / "model-config.yaml").read_text())["handler"]["batching"]}
        results |= {f"{engine}_refused_s": statistics.median(times) for engine, times in fixed.items()}
        for steps in (1, 25):
            for call in engines.values():
                call(steps, 0).raise_for_status()  # first requests pay one-time costs on both sides
            latencies = interleaved({engine: lambda call=call: timed(lambda: call(steps, 0)) for engine, call in engines.items()},
                                    workload.requests)
            results |= {f"{engine}_c1_{steps}_steps_s": statistics.median(times) for engine, times in latencies.items()}
        results |= {f"{engine}_body_bytes": len(call(25, 0).content) for engine, call in engines.items()}
        rates = interleaved({engine: lambda call=call: run_load(lambda seed: call(25, seed), 8, C8_REQUESTS).throughput_rps
                             for engine, call in engines.items()}, workload.rounds)
        results |= {f"{engine}_c8_25_steps_rps": statistics.median(values) for engine, values in rates.items()}
    results["c1_1_step"] = results["ours_c1_1_steps_s"] / results["bentoml_c1_1_steps_s"]
    results["c1_25_steps"] = results["ours_c1_25_steps_s"] / results["bentoml_c1_25_steps_s"]
    results["c8_25_steps"] = results["ours_c8_25_steps_rps"] / results["bentoml_c8_25_steps_rps"]
    log(f"{workload.name}: {', '.join(f'{target.name} {results[target.name]:.2f}' for target in TARGETS)}")
    return results


def timed_refusal(call) -> float:
    """Seconds a refused request takes; it must be refused with 400 (no generation)."""
    started = time.perf_counter()
    status = call().status_code
    assert status == 400, f"a request with 0 steps was answered {status}"
    return time.perf_counter() - started


def measure(workdir: Path, workloads: tuple[Workload, ...]) -> dict:
    return {workload.name: compare(workdir, workload) for workload in workloads}


def markdown(results: dict) -> list[str]:
    lines = [f"Ours (TorchServe {version('torchserve')}, serve.sh's archive: the archiver's defaults, batchSize 4) "
             f"against BentoML {version('bentoml')}, same pipeline directory, PNG, loopback:", "",
             "| model | c=1, 1 step | c=1, 25 steps | c=8, 25 steps (images/s) | PNG body | a refused request "
             "(fixed cost, warm) | our batching |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['ours_c1_1_steps_s'] * 1000:.0f} ms against {r['bentoml_c1_1_steps_s'] * 1000:.0f} ms "
            f"({r['c1_1_step']:.2f}x) | {r['ours_c1_25_steps_s'] * 1000:.0f} ms against "
            f"{r['bentoml_c1_25_steps_s'] * 1000:.0f} ms ({r['c1_25_steps']:.2f}x) | {r['ours_c8_25_steps_rps']:.2f} "
            f"against {r['bentoml_c8_25_steps_rps']:.2f} ({r['c8_25_steps']:.2f}x) | {r['ours_body_bytes']:.0f} B "
            f"against {r['bentoml_body_bytes']:.0f} B | {r['ours_refused_s'] * 1000:.1f} ms against "
            f"{r['bentoml_refused_s'] * 1000:.1f} ms | {r['batching']} |")
    if DIGITS.name in results:
        lines += ["", *targets_table(TARGETS, results[DIGITS.name], "target (digits, default settings): ours/BentoML")]
    return lines

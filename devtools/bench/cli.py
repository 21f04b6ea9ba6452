"""`scripts/bench.py`: the benchmarks' command line. Every figure is measured in one run, on one machine,
beside the baseline it is compared to, and printed with its ratios; results go to --out.

  python scripts/bench.py --quick     # ours against the pytorch/serve example and BentoML, under 5 minutes on 2 cores
  python scripts/bench.py             # the same with larger images and more requests
  python scripts/bench.py --gpu --model sd15 --part ladder   # the GPU plan (devtools/bench/suites/gpu.py)
  python scripts/bench.py --gpu --dry-run                    # the whole GPU plan on the CPU, tiny model
  python scripts/bench.py --cold-start                       # full-size SD 1.5 on the CPU: build to first image
  python scripts/bench.py --step                             # step-level against static batching, mixed traffic
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from devtools import REPO_ROOT
from devtools.bench import report
from devtools.bench.runner import log
from devtools.bench.suites import batch_delay, bentoml, cold_start, compile_scale, example, example_report, gpu, speed, step


def in_workdir(measure):
    """measure(workdir) in a temporary directory that is removed afterwards, whatever happens."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        return measure(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_example(args) -> None:
    workload = example.QUICK if args.quick else example.FULL
    results = in_workdir(lambda workdir: example.measure(workdir, workload))
    report.save(args.out, "results", results, example_report.markdown(results, workload, report.machine()))
    log(example_report.save_plot(results, args.out / "results.png"))
    run_bentoml(args, (bentoml.DIGITS,) if args.quick else (bentoml.DIGITS, *bentoml.LARGER))


def run_bentoml(args, workloads=(bentoml.DIGITS, *bentoml.LARGER)) -> None:
    results = in_workdir(lambda workdir: bentoml.measure(workdir, workloads))
    report.save(args.out, "bentoml", results, bentoml.markdown(results))


def run_ray(args) -> None:
    from devtools.bench.suites import ray  # needs the ray extra

    run_suite(args, "ray", ray.measure, ray.markdown)


def run_speed(args) -> None:
    results = in_workdir(speed.measure)
    report.save(args.out, "speed", results, speed.markdown(results))
    log(speed.save_plot(results, args.out / "speed.png"))


def run_gpu(parser: argparse.ArgumentParser, args) -> None:
    from devtools.bench.suites import gpu_report

    if args.dry_run:
        workload, device, out = gpu.DRY_RUN, torch.device("cpu"), args.out / "gpu-dry-run"
    elif not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device; --gpu --dry-run runs the same plan on the CPU")
    else:
        workload, device, out = gpu.MODELS[args.model], torch.device("cuda:0"), args.out / "gpu"
    path = gpu_report.run_parts(workload, args.part or list(gpu.PARTS), device, out, args.models_dir / device.type)
    print(path.read_text())
    log(f"report in {path}")


def run_suite(args, name: str, measure, markdown) -> None:
    results = in_workdir(measure)
    report.save(args.out, name, results, markdown(results))


SUITES = {
    "bentoml": run_bentoml,
    "batch_delay": lambda args: run_suite(args, "batch-delay", batch_delay.measure, batch_delay.markdown),
    "compile_scale": lambda args: run_suite(args, "compile-scale", compile_scale.measure, compile_scale.markdown),
    "speed": run_speed,
    "step": lambda args: run_suite(args, "step", step.measure, step.markdown),
    "cold_start": lambda args: run_suite(args, "cold-start", lambda workdir: cold_start.measure(workdir, args.models_dir),
                                         cold_start.markdown),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small images and few requests")
    mode.add_argument("--gpu", action="store_true", help="CUDA: full-size SD 1.5, SDXL or FLUX.1-dev, one part per command")
    mode.add_argument("--compile-scale", action="store_true", help="only scaling 1 to 2 workers, eager against torch.compile")
    mode.add_argument("--speed", action="store_true", help="only the speed settings against digits accuracy")
    mode.add_argument("--bentoml", action="store_true", help="only ours against BentoML (digits, tiny SD at 256 and 512)")
    mode.add_argument("--engine", choices=["ray"], help="only Ray Serve against TorchServe on digits (needs root)")
    mode.add_argument("--batch-delay", action="store_true", help="only the maxBatchDelay sweep on serve.sh's archive")
    mode.add_argument("--cold-start", action="store_true", help="only the full-size cold start on the CPU (SD 1.5, 4 GB)")
    mode.add_argument("--step", action="store_true", help="only step-level against static batching, mixed traffic on digits")
    gpu_options = parser.add_argument_group("--gpu and --cold-start")
    gpu_options.add_argument("--model", choices=sorted(gpu.MODELS), default="sd15")
    gpu_options.add_argument("--part", choices=gpu.PARTS, action="append", help="repeatable; default: every part")
    gpu_options.add_argument("--dry-run", action="store_true", help="every GPU part on the CPU with the tiny model")
    gpu_options.add_argument("--models-dir", type=Path, default=REPO_ROOT / "bench-results" / "models",
                             help="where random-weight pipelines are saved once and reused (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-results", help="results folder (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dry_run and not args.gpu:
        parser.error("--dry-run goes with --gpu")
    chosen = next((name for name in SUITES if getattr(args, name, False)), None)
    if args.gpu:
        run_gpu(parser, args)
    elif args.engine == "ray":
        run_ray(args)
    elif chosen:
        SUITES[chosen](args)
    else:
        run_example(args)
    return 0

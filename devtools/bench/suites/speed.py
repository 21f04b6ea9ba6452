"""Speed settings against the picture: time per image end to end (concurrency 1, through TorchServe,
serve.sh's archive settings) and the digits oracle's accuracy, for samplers at few steps and for each
speed option. `bench.py --speed`, about 5 minutes on 2 cores."""

import io
import json
import statistics
import time
from pathlib import Path

from PIL import Image

from devtools.bench.archives import build_ours
from devtools.bench.runner import log
from devtools.bench.targets import Target
from devtools.harness.torchserve import TorchServe
from devtools.models.digits import DigitsOracle

DEFAULT = "DDIM 25 (default)"  # the digits model's own sampler and steps
SAMPLERS = {
    DEFAULT: {},
    **{f"DPM++ 2M {steps}": {"scheduler": "dpmpp_2m", "num_inference_steps": steps} for steps in (2, 3, 4, 6, 10, 15)},
    **{f"UniPC {steps}": {"scheduler": "unipc", "num_inference_steps": steps} for steps in (4, 6, 10)},
    **{f"Euler {steps}": {"scheduler": "euler", "num_inference_steps": steps} for steps in (4, 8, 15)},
}
OPTIONS = {
    "attention slicing": {"attention_slicing": "auto"},
    "VAE slicing": {"vae_slicing": True},
    "channels_last": {"channels_last": True},
    "fused QKV": {"fuse_qkv_projections": True},
    "bfloat16": {"torch_dtype": "bfloat16"},
    "torch.compile": {"torch_compile": True},
    "torch.compile, regions": {"torch_compile": True, "compile_regions": True},
    "torch.compile + DPM++ 2M 4": {"torch_compile": True, "scheduler": "dpmpp_2m", "num_inference_steps": 4},
}
ACCURACY_FLOOR = 0.9  # the settings that count keep this much of the digits right
# The fastest of those, its time per image as a share of the default's.
TARGET = Target("the fastest setting's share of the default's time per image", "<=", 0.25)
COUNT = 50


def measure(workdir: Path) -> dict:
    store = workdir / "speed-store"
    archives = {"speed_default": build_ours(store, "speed_default", "--source", "digits", "--archive-format", "no-archive",
                                            "--batch-size", "4")}
    for index, option in enumerate(OPTIONS.values()):
        sets = [argument for key, value in option.items() for argument in ("--set", f"{key}={json.dumps(value)}")]
        archives[f"speed_option_{index}"] = build_ours(store, f"speed_option_{index}", "--source", "digits",
                                                       "--archive-format", "no-archive", "--batch-size", "4", *sets)
    settings = {label: ("speed_default", fields) for label, fields in SAMPLERS.items()}
    settings |= {label: (f"speed_option_{index}", {}) for index, label in enumerate(OPTIONS)}
    oracle, results = DigitsOracle(), {}
    with TorchServe(workdir / "ts-speed", store, archives) as server:
        for label, (model, fields) in settings.items():
            latencies, images = [], []
            for index in range(COUNT):
                started = time.perf_counter()
                response = server.predict(model, json={"prompt": f"digit {index % 10}", "seed": 500 + index,
                                                       "output_format": "png", **fields})
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()
                images.append(Image.open(io.BytesIO(response.content)))
            right = sum(label_ == index % 10 for index, label_ in enumerate(oracle.labels(images)))
            results[label] = {"s_per_image": statistics.median(latencies), "accuracy": right / COUNT}
            log(f"{label}: {results[label]}")
    return results


def verdict(results: dict) -> str:
    """The fastest setting that keeps the target accuracy, against the default's time."""
    keeping = [label for label, figures in results.items() if figures["accuracy"] >= ACCURACY_FLOOR]
    if not keeping:
        return f"MISSED: no setting keeps {ACCURACY_FLOOR:.0%} accuracy"
    fastest = min(keeping, key=lambda label: results[label]["s_per_image"])
    share = results[fastest]["s_per_image"] / results[DEFAULT]["s_per_image"]
    return (f"{fastest} keeps {results[fastest]['accuracy']:.0%} of the digits (at least {ACCURACY_FLOOR:.0%} wanted): "
            f"{TARGET.name} {TARGET.verdict(share)}")


def markdown(results: dict) -> list[str]:
    default = results[DEFAULT]["s_per_image"]
    lines = ["| setting | time per image (c=1, end to end) | share of default | digits accuracy |", "|---|---|---|---|"]
    lines += [f"| {label} | {figures['s_per_image'] * 1000:.0f} ms | {figures['s_per_image'] / default:.2f} | "
              f"{figures['accuracy']:.0%} |" for label, figures in results.items()]
    return [*lines, "", verdict(results)]


def save_plot(results: dict, path: Path) -> str:
    try:
        import matplotlib
    except ImportError:
        return f"no {path.name}: matplotlib is missing (pip install -e '.[bench]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 6))
    for label, figures in results.items():
        x, y = figures["s_per_image"] * 1000, figures["accuracy"] * 100
        axes.scatter(x, y, color="C1" if label in OPTIONS else "C0")
        # Most settings keep every digit, so their labels share one line: slant them apart.
        axes.annotate(label, (x, y), fontsize=7, xytext=(2, 4), textcoords="offset points", rotation=60)
    axes.axhline(ACCURACY_FLOOR * 100, color="grey", linestyle=":")
    axes.axvline(results[DEFAULT]["s_per_image"] * 1000 * TARGET.bound, color="grey", linestyle=":")
    axes.set_xlabel("time per image, ms (end to end through TorchServe, concurrency 1)")
    axes.set_ylabel("digits accuracy, %")
    axes.set_ylim(top=112)  # room for the slanted labels
    axes.set_title("Speed settings on the digits model: faster should not mean wrong")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return f"plot in {path}"

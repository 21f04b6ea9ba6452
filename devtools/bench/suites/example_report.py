"""The example suite's ratios, targets and tables (docs/benchmarks.md, "Against the pytorch/serve example")."""

from pathlib import Path

from devtools.bench.targets import Target, targets_table
from devtools.bench.workload import Workload

TARGETS = [
    Target("png_body_vs_baseline", "<=", 0.10),
    Target("encode_speedup_vs_baseline", ">=", 10.0),
    Target("compat_body_vs_baseline", "<=", 0.50),
    Target("overhead_vs_bare", "<=", 0.05),
    Target("throughput_c8_vs_baseline", ">=", 2.0),
    Target("scale_up_vs_baseline", "<=", 0.50),
]


def ratios(results: dict) -> dict[str, float]:
    encoding, load, cold = results["encoding"], results["load"], results["cold_start"]
    derived = {
        "png_body_vs_baseline": encoding["png"]["bytes"] / encoding["baseline"]["bytes"],
        "jpeg_body_vs_baseline": encoding["jpeg"]["bytes"] / encoding["baseline"]["bytes"],
        "compat_body_vs_baseline": encoding["numpy"]["bytes"] / encoding["baseline"]["bytes"],
        "encode_speedup_vs_baseline": encoding["baseline"]["seconds"] / encoding["png"]["seconds"],
        "compat_encode_speedup_vs_baseline": encoding["baseline"]["seconds"] / encoding["numpy"]["seconds"],
        "overhead_vs_bare": results["overhead"]["served_s"] / results["overhead"]["bare_s"] - 1,
        "throughput_c8_vs_baseline": load["ours_b4_c8"]["throughput_rps"] / load["baseline_b1_c8"]["throughput_rps"],
        "scale_up_vs_baseline": cold["ours_zip"]["scale_up_s"] / cold["baseline"]["scale_up_s"],
        "cold_start_zip_vs_baseline": cold["ours_zip"]["ready_s"] / cold["baseline"]["ready_s"],
    }
    for batch_size in (1, 4):
        for concurrency in (1, 4, 8):
            ours, baseline = load[f"ours_b{batch_size}_c{concurrency}"], load[f"baseline_b{batch_size}_c{concurrency}"]
            derived[f"p50_b{batch_size}_c{concurrency}_vs_baseline"] = ours["p50_s"] / baseline["p50_s"]
            derived[f"throughput_b{batch_size}_c{concurrency}_vs_baseline"] = ours["throughput_rps"] / baseline["throughput_rps"]
    return derived


def mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f} MB"


def markdown(results: dict, workload: Workload, machine: str) -> list[str]:
    derived = ratios(results)
    encoding, bodies, load = results["encoding"], results["bodies"], results["load"]
    lines = [f"Machine: {machine}. Model: tiny SD-shaped pipeline (random weights, 8x VAE). Load runs: "
             f"{workload.size}x{workload.size}, {workload.steps} steps, {workload.requests}+ requests per level.", "",
             "| per 768x768 image (encode only) | body | encode time | body ours/baseline | encode speedup |",
             "|---|---|---|---|---|"]
    for name, figures in encoding.items():
        lines.append(f"| {'baseline (`tolist()`, indent=2)' if name == 'baseline' else f'ours {name}'} | "
                     f"{mb(figures['bytes'])} | {figures['seconds'] * 1000:.1f} ms | "
                     f"{figures['bytes'] / encoding['baseline']['bytes']:.3g} | "
                     f"{encoding['baseline']['seconds'] / figures['seconds']:.3g} |")
    lines += ["", f"| end to end, {workload.size}x{workload.size} | body | ours/baseline |", "|---|---|---|"]
    lines += [f"| {name} | {mb(size)} | {size / bodies['baseline']:.3g} |" for name, size in bodies.items()]
    lines += ["", "| batchSize | concurrency | p50 ours / baseline | p95 ours / baseline | req/s ours / baseline | p50 ratio "
              "| req/s ratio |", "|---|---|---|---|---|---|---|"]
    for batch_size in (1, 4):
        for concurrency in (1, 4, 8):
            ours, baseline = load[f"ours_b{batch_size}_c{concurrency}"], load[f"baseline_b{batch_size}_c{concurrency}"]
            suffix = f"b{batch_size}_c{concurrency}_vs_baseline"
            lines.append(f"| {batch_size} | {concurrency} | {ours['p50_s']:.2f} s / {baseline['p50_s']:.2f} s | "
                         f"{ours['p95_s']:.2f} s / {baseline['p95_s']:.2f} s | {ours['throughput_rps']:.3g} / {baseline['throughput_rps']:.3g} | "
                         f"{derived['p50_' + suffix]:.3g} | {derived['throughput_' + suffix]:.3g} |")
    overhead = results["overhead"]
    lines += ["", "| serving overhead, 50 steps | latency | ours/bare |", "|---|---|---|",
              f"| bare pipeline call | {overhead['bare_s']:.2f} s | 1 |",
              f"| ours, end to end (png) | {overhead['served_s']:.2f} s | {1 + derived['overhead_vs_bare']:.3g} |",
              "", "| cold start | start to READY | scale 1 to 2 workers | start ours/baseline | scale ours/baseline |",
              "|---|---|---|---|---|"]
    cold = results["cold_start"]
    for label, figures in cold.items():
        lines.append(f"| {label} | {figures['ready_s']:.2f} s | {figures['scale_up_s']:.2f} s | "
                     f"{figures['ready_s'] / cold['baseline']['ready_s']:.3g} | "
                     f"{figures['scale_up_s'] / cold['baseline']['scale_up_s']:.3g} |")
    peaks = results["peak_rss_bytes"]
    lines += ["", "| peak RSS per worker | bytes | ours/baseline |", "|---|---|---|"]
    lines += [f"| {model} | {mb(peak)} | {peak / peaks['baseline_b1']:.3g} |" for model, peak in peaks.items() if peak]
    lines += ["", *targets_table(TARGETS, derived),
              # The target sets our batchSize 4 against the example's 1; the same batch size on both sides
              # shows what our handler, rather than batching itself, adds.
              f"| throughput at concurrency 8, both at batchSize 4 (beside the target) | "
              f"{derived['throughput_b4_c8_vs_baseline']:.3g} |"]
    return lines


def save_plot(results: dict, path: Path) -> str:
    """Bodies and throughput; without the bench extra, say how to get the plot rather than fail after the run."""
    try:
        import matplotlib
    except ImportError:
        return f"no {path.name}: matplotlib is missing (pip install -e '.[bench]'); the tables and data are written"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bodies, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results["encoding"])
    bodies.bar(names, [results["encoding"][name]["bytes"] / 1e6 for name in names], color=["grey", "C0", "C1", "C2"])
    bodies.set_ylabel("MB per image")
    bodies.set_title("Response body, 768x768")
    for offset, model in enumerate(("baseline_b1", "baseline_b4", "ours_b1", "ours_b4")):
        values = [results["load"][f"{model}_c{level}"]["throughput_rps"] for level in (1, 4, 8)]
        throughput.bar([level + offset * 0.2 for level in range(3)], values, width=0.2, label=model)
    throughput.set_xticks([level + 0.3 for level in range(3)], [f"concurrency {level}" for level in (1, 4, 8)])
    throughput.set_ylabel("requests / s")
    throughput.set_title("Throughput")
    throughput.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return f"plot in {path}"

"""The benchmark's arithmetic and model builder; its timings are reported, never asserted."""

import sys

import pytest
import torch

from devtools.bench.runner import run_load
from devtools.bench.suites import bentoml, cold_start, example, example_report, gpu_report, step
from devtools.bench.targets import Target
from devtools.models.fullsize import flux_dev_components, sdxl_components
from devtools.models.sd15 import sd15_components
from devtools.models.tiny import build_tokenizer

COMPONENTS = {"sd15": sd15_components, "sdxl": sdxl_components, "flux": flux_dev_components}


# Parameter counts of the published checkpoints (their safetensors headers).
PUBLISHED_PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    "flux": {"transformer": 11_901_408_320, "vae": 83_819_683, "text_encoder": 123_060_480,
             "text_encoder_2": 4_762_310_656},
}


@pytest.mark.parametrize("model", PUBLISHED_PARAMETERS)
def test_full_size_architectures_have_the_published_parameter_counts(model, tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    with torch.device("meta"):  # shapes only: FLUX would need 48 GB to initialise in float32
        components = COMPONENTS[model](tokenizer)
    counts = {name: sum(parameter.numel() for parameter in components[name].parameters())
              for name in PUBLISHED_PARAMETERS[model]}
    assert counts == PUBLISHED_PARAMETERS[model]


def test_a_target_says_met_or_missed_against_its_bound():
    assert Target("x", "<=", 0.1).verdict(0.05) == "met (0.05 <= 0.1)"
    assert Target("x", ">=", 2.0).verdict(1.5) == "MISSED (1.5 >= 2)"
    assert Target("x", ">=", 2.0).verdict(None) == "not measured"


def example_results(**load_overrides) -> dict:
    load = {f"{kind}_b{batch}_c{level}": {"p50_s": 1.0, "p95_s": 1.0, "throughput_rps": 1.0, "body_bytes": 1.0}
            for kind in ("ours", "baseline") for batch in (1, 4) for level in (1, 4, 8)}
    load |= load_overrides
    return {
        "encoding": {"baseline": {"seconds": 2.0, "bytes": 20.0}, "numpy": {"seconds": 0.5, "bytes": 8.0},
                     "png": {"seconds": 0.1, "bytes": 1.0}, "jpeg": {"seconds": 0.1, "bytes": 0.5}},
        "bodies": {"numpy": 8.0, "png": 1.0, "jpeg": 0.5, "baseline": 20.0},
        "overhead": {"bare_s": 1.0, "served_s": 1.04},
        "load": load,
        "cold_start": {"ours_zip": {"ready_s": 5.0, "scale_up_s": 4.0}, "ours_noarchive": {"ready_s": 4.0, "scale_up_s": 4.0},
                       "baseline": {"ready_s": 6.0, "scale_up_s": 5.0}},
        "peak_rss_bytes": {"ours_b1": 2e8, "ours_b4": 2e8, "baseline_b1": 3e8, "baseline_b4": 3e8},
    }


def test_the_example_suites_ratios_and_verdicts():
    results = example_results(ours_b4_c8={"p50_s": 1.0, "p95_s": 1.0, "throughput_rps": 3.0, "body_bytes": 1.0})
    derived = example_report.ratios(results)
    assert derived["png_body_vs_baseline"] == 0.05
    assert derived["encode_speedup_vs_baseline"] == 20.0
    assert abs(derived["overhead_vs_bare"] - 0.04) < 1e-9
    verdicts = {target.name: target.verdict(derived[target.name]) for target in example_report.TARGETS}
    assert verdicts["png_body_vs_baseline"].startswith("met")
    assert verdicts["compat_body_vs_baseline"].startswith("met")
    assert verdicts["scale_up_vs_baseline"].startswith("MISSED")
    assert verdicts["throughput_c8_vs_baseline"].startswith("met")
    lines = example_report.markdown(results, example.QUICK, "a machine")
    assert "| throughput_c8_vs_baseline | met (3 >= 2) |" in lines
    assert "| throughput at concurrency 8, both at batchSize 4 (beside the target) | 3 |" in lines


def test_without_matplotlib_the_plot_is_a_hint_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets without the extra
    message = example_report.save_plot(example_results(), tmp_path / "results.png")
    assert "pip install -e '.[bench]'" in message
    assert not (tmp_path / "results.png").exists()


def test_gpu_targets_are_decided_from_the_served_parts():
    served = {"warm_request_s": 0.5, "first_request_s": 0.55, "c8": {"throughput_rps": 2.0}}
    parts = {
        "plan": {"target_s": 0.6},
        "served-compiled": {"bare": {"latency_s": 0.49}, "compiled_b1": served,
                            "compiled_b4": {**served, "c8": {"throughput_rps": 2.4}}},
    }
    verdicts = {what.split(" <= ")[0].split(" >= ")[0]: (round(value, 3), verdict)
                for what, value, verdict in gpu_report.verdicts(parts)}
    assert verdicts == {
        "served, compiled, batch 1, c=1": (0.5, "met"),
        "serving overhead over the bare compiled call": (0.02, "met"),
        "first request after READY / warm": (1.1, "met"),
        "batch 4 / batch 1 throughput at c=8": (1.2, "MISSED"),
    }


def test_the_bentoml_comparison_reports_each_target_against_its_bound():
    figures = {
        "batching": "combined", "ours_body_bytes": 5600, "bentoml_body_bytes": 5900,
        "ours_c1_1_steps_s": 0.030, "bentoml_c1_1_steps_s": 0.025, "ours_c1_25_steps_s": 0.28,
        "bentoml_c1_25_steps_s": 0.29, "ours_c8_25_steps_rps": 9.0, "bentoml_c8_25_steps_rps": 4.0,
        "c1_1_step": 1.2, "c1_25_steps": 0.97, "c8_25_steps": 2.25, "ours_refused_s": 0.009, "bentoml_refused_s": 0.003,
    }
    lines = bentoml.markdown({"digits": figures})
    assert "| digits | 30 ms against 25 ms (1.20x) | 280 ms against 290 ms (0.97x) | 9.00 against 4.00 (2.25x) | 5600 B against 5900 B | 9.0 ms against 3.0 ms | combined |" in lines
    assert "| c1_1_step | MISSED (1.2 <= 1.1) |" in lines
    assert "| c1_25_steps | met (0.97 <= 1.1) |" in lines
    assert "| c8_25_steps | met (2.25 >= 2) |" in lines


def test_the_load_runner_counts_every_answer_and_orders_its_latencies():
    import requests

    class Answer(requests.Response):
        def __init__(self, index):
            super().__init__()
            self.status_code, self._content = 200, b"x" * index

    load = run_load(lambda index: Answer(index), concurrency=4, count=20)
    assert load.p50_s <= load.p95_s and load.throughput_rps > 0 and load.body_bytes == 9.5  # the median of 0..19 bytes


def test_the_step_benchmarks_mix_is_a_third_of_each_class_with_its_own_seeds_and_guidance():
    bodies = step.workload(96, seed=1)
    counts = {name: sum(step.class_of(body) == name for body in bodies) for name in step.CLASSES}
    assert counts == {name: 32 for name in step.CLASSES}
    assert all(body["scheduler"] == "dpmpp_2m" for body in bodies if body["num_inference_steps"] == 4)
    assert len({body["seed"] for body in bodies}) == 96 and all(1 <= body["guidance_scale"] <= 7 for body in bodies)
    assert step.workload(96, seed=1) == bodies and step.workload(96, seed=2) != bodies  # replayed alike for both modes


def test_the_step_benchmarks_arrivals_come_at_the_asked_rate():
    arrivals = step.poisson_arrivals(2000, rate=4.0, seed=7)
    assert arrivals == sorted(arrivals) and 3.6 < len(arrivals) / arrivals[-1] < 4.4



def test_the_cold_start_verdicts_compare_the_main_case_with_bare_and_its_own_archive():
    def case(build_s, ready_s, first_s, written_gb):
        return {"build_s": build_s, "imports_s": 4.0, "ready_s": ready_s, "bare_s": 10.0, "ready_over_bare": ready_s / 10,
                "first_s": first_s, "warm_s": 4.0, "archive_bytes": 2**20, "written_gb": written_gb,
                "starts": [{"first_s": first_s, "warm_s": 4.0}]}

    results = {"weights_bytes": 4 * 2**30, "memory": {
        "worker_pss_gb": [2.0, 2.0], "worker_rss_gb": [4.0, 4.0], "second_worker_used_gb": 0.5}, "cases": {
        cold_start.MAIN: case(5.9, 12.5, 4.4, 0.01), "ours, zip-store": case(15.0, 22.0, 4.0, 8.0)}}
    lines = cold_start.markdown(results)
    verdicts = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in lines if line.startswith("| ")}
    assert verdicts["build, s (2 s + the archiver's imports, 4.0 s)"].startswith("met (5.9")
    assert verdicts["start to READY / bare, the median of each start over the bare run before it"].startswith("MISSED (1.25")
    assert verdicts["first request / warm one"].startswith("met (1.1")
    assert verdicts["written at start, GiB (5 % of the weights)"].startswith("met (0.01")
    assert "| ours, zip-store | 15.0 s | 22.0 s (10.0 s; 2.20x) | 4.0 s / 4.0 s (1.00x) | 1.0 MiB | 8.00 GiB |" in lines

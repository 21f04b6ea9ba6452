"""The benchmark's arithmetic and model builder; its timings are reported, never asserted."""

import sys

import pytest
import torch

from devtools import REPO_ROOT
from devtools.models.fullsize import flux_dev_components, sdxl_components
from devtools.models.sd15 import sd15_components
from devtools.models.tiny import build_tokenizer

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import bench  # noqa: E402

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


def test_ratios_and_verdicts():
    results = {
        "body_bytes_png": 1.0, "body_bytes_baseline": 20.0, "body_bytes_numpy": 8.0, "body_bytes_jpeg": 0.5,
        "encode_s_baseline": 2.0, "encode_s_png": 0.1, "encode_s_numpy": 0.5,
        "latency_50_steps_s_served": 1.04, "latency_50_steps_s_bare": 1.0,
        "throughput_rps_ours_b4_c8": 3.0, "throughput_rps_baseline_b1_c8": 1.0,
        "scale_up_s_ours_zip": 4.0, "scale_up_s_baseline": 5.0,
    }
    derived = bench.ratios(results)
    assert derived["png_body_vs_baseline"] == 0.05
    assert derived["encode_speedup_vs_baseline"] == 20.0
    assert abs(derived["overhead_vs_bare"] - 0.04) < 1e-9
    verdicts = bench.verdicts(derived)
    assert verdicts["png_body_vs_baseline"].startswith("met")
    assert verdicts["compat_body_vs_baseline"].startswith("met")
    assert verdicts["scale_up_vs_baseline"].startswith("MISSED")
    assert verdicts["throughput_c8_vs_baseline"].startswith("met")


def test_without_matplotlib_the_plot_is_a_hint_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets without the extra
    message = bench.save_plot({}, tmp_path / "results.png")
    assert "pip install -e '.[bench]'" in message
    assert not (tmp_path / "results.png").exists()


def test_the_report_shows_the_same_batch_size_throughput_beside_the_target():
    derived = {"throughput_c8_vs_baseline": 2.5, "throughput_b4_c8_vs_baseline": 1.1}
    lines = bench.markdown_targets(derived)
    assert "| throughput_c8_vs_baseline | met (2.5 >= 2.0) |" in lines
    assert "| throughput at concurrency 8, both at batchSize 4 (reported beside the target) | 1.1 |" in lines


def test_gpu_targets_are_decided_from_the_served_parts():
    import gpu_bench

    served = {"warm_request_s": 0.5, "first_request_s": 0.55, "c8": {"throughput_rps": 2.0}}
    parts = {
        "plan": {"target_s": 0.6},
        "served-compiled": {"bare": {"latency_s": 0.49}, "compiled_b1": served,
                            "compiled_b4": {**served, "c8": {"throughput_rps": 2.4}}},
    }
    verdicts = {what.split(" <= ")[0].split(" >= ")[0]: (round(value, 3), verdict)
                for what, value, verdict in gpu_bench.verdicts(parts)}
    assert verdicts == {
        "served, compiled, batch 1, c=1": (0.5, "met"),
        "serving overhead over the bare compiled call": (0.02, "met"),
        "first request after READY / warm": (1.1, "met"),
        "batch 4 / batch 1 throughput at c=8": (1.2, "MISSED"),
    }


def test_the_bentoml_comparison_reports_each_target_against_its_bound():
    import bentoml_bench

    figures = {
        "batching": "combined", "ours_body_bytes": 5600, "bentoml_body_bytes": 5900,
        "ours_c1_1_steps_s": 0.030, "bentoml_c1_1_steps_s": 0.025, "ours_c1_25_steps_s": 0.28,
        "bentoml_c1_25_steps_s": 0.29, "ours_c8_25_steps_rps": 9.0, "bentoml_c8_25_steps_rps": 4.0,
        "c1_1_step": 1.2, "c1_25_steps": 0.97, "c8_25_steps": 2.25, "ours_refused_s": 0.009, "bentoml_refused_s": 0.003,
    }
    lines = bentoml_bench.markdown({"digits": figures})
    assert "| digits | 30 ms against 25 ms (1.20x) | 280 ms against 290 ms (0.97x) | 9.00 against 4.00 (2.25x) | 5600 B against 5900 B | 9.0 ms against 3.0 ms | combined |" in lines
    assert "| c1_1_step: ours/BentoML | MISSED (1.20 <= 1.1) |" in lines
    assert "| c1_25_steps: ours/BentoML | met (0.97 <= 1.1) |" in lines
    assert "| c8_25_steps: ours/BentoML | met (2.25 >= 2.0) |" in lines

"""The benchmark's arithmetic and model builder; its timings are reported, never asserted."""

import sys

from accelerate import init_empty_weights

from archiver.build import REPO_ROOT
from archiver.sd15 import sd15_components

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import bench  # noqa: E402


def test_sd15_architecture_has_sd15_sizes():
    with init_empty_weights():
        components = sd15_components()
    millions = {name: sum(p.numel() for p in components[name].parameters()) / 1e6 for name in ("unet", "vae", "text_encoder")}
    assert 855 < millions["unet"] < 865
    assert 80 < millions["vae"] < 90
    assert 120 < millions["text_encoder"] < 125


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

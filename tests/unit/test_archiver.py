import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from archiver import build as archiver_build
from archiver.build import built_from
from archiver.contents import UnsafePipeline
from devtools import REPO_ROOT
from archiver.cli import main
from archiver.settings import read_properties
from devtools.archives import main as build_with_dev_models
from devtools.harness.torchserve import free_port
from handlers.core.limits import Limits
from tests.conftest import plant_hostile_files


def build(tmp_path, *options):
    return main(["build", "--export-path", str(tmp_path / "store"), *options])


def test_archive_holds_pipeline_handler_package_and_model_config(tmp_path, tiny_pipeline_dir, capsys):
    assert build(tmp_path, "--source", str(tiny_pipeline_dir), "--model-name", "m", "--batch-size", "4", "--height", "64") == 0
    output = capsys.readouterr().out
    assert "staging unet/diffusion_pytorch_model.safetensors" in output
    assert f"built {tmp_path / 'store' / 'm.mar'}" in output
    with zipfile.ZipFile(tmp_path / "store" / "m.mar") as archive:
        names = set(archive.namelist())
        config = yaml.safe_load(archive.read("model-config.yaml"))
        # zip-store by default: weights do not compress, so nothing is deflated at build or inflated at start.
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
    assert {"model_index.json", "handler.py", "handlers/core/request.py", "handlers/core/metrics.yaml", "MAR-INF/MANIFEST.json"} <= names
    assert config["minWorkers"] == config["maxWorkers"] == 1
    assert config["batchSize"] == 4
    assert {"maxBatchDelay", "responseTimeout", "startupTimeout"} <= set(config)
    handler = config["handler"]
    assert (handler["guidance_scale"], handler["num_inference_steps"], handler["height"], handler["width"]) == (7.5, 50, 64, 768)
    assert handler["torch_dtype"] == handler["batching"] == "auto"
    assert handler["output_format"] == "numpy"
    assert "scheduler" not in handler  # absent: the pipeline's own


def test_no_archive_format_writes_a_directory(tmp_path, tiny_pipeline_dir):
    assert build(tmp_path, "--source", str(tiny_pipeline_dir), "--model-name", "d", "--archive-format", "no-archive") == 0
    assert (tmp_path / "store" / "d" / "model_index.json").is_file()
    # Staging hard-links the source's files; the archive's own are copies, so nothing done to one reaches the other.
    source = tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"
    packed = tmp_path / "store" / "d" / "unet" / "diffusion_pytorch_model.safetensors"
    assert packed.read_bytes() == source.read_bytes()
    assert not packed.samefile(source) and source.stat().st_nlink == 1
    assert (tmp_path / "store" / "d" / "handlers" / "torchserve" / "handler.py").is_file()


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path, tiny_pipeline_dir, capsys):
    pipeline = tmp_path / "pickled"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    for weights in (pipeline / "vae").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    assert build(tmp_path, "--source", str(pipeline), "--model-name", "p") == 2
    assert "vae" in capsys.readouterr().err and not (tmp_path / "store" / "p.mar").exists()
    assert build(tmp_path, "--source", str(pipeline), "--model-name", "p", "--allow-unsafe-weights") == 0
    with zipfile.ZipFile(tmp_path / "store" / "p.mar") as archive:
        assert yaml.safe_load(archive.read("model-config.yaml"))["handler"]["allow_pickle_weights"] is True


def test_pickle_twins_of_safetensors_are_left_out(tmp_path, tiny_pipeline_dir):
    pipeline = tmp_path / "both"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    (pipeline / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    assert build(tmp_path, "--source", str(pipeline), "--model-name", "b") == 0
    with zipfile.ZipFile(tmp_path / "store" / "b.mar") as archive:
        assert "unet/diffusion_pytorch_model.bin" not in archive.namelist()


def test_unreachable_hub_gives_a_clear_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "archiver", "build", "--source", "someone/some-model", "--export-path", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        # Nothing cached, and nothing listens at the endpoint: every request is refused at once.
        env={**{key: value for key, value in os.environ.items() if not key.startswith("HF_")},
             "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"},
    )
    assert result.returncode == 2
    assert "could not fetch 'someone/some-model'" in result.stderr  # errors go to stderr
    assert "pass the local directory as --source" in result.stderr


def test_a_directory_without_model_index_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert build(tmp_path, "--source", str(tmp_path / "empty")) == 2
    assert "no model_index.json" in capsys.readouterr().err


@pytest.mark.parametrize("arguments", [["--help"], ["build", "--help"]])
def test_the_cli_prints_only_its_own_output(arguments):
    result = subprocess.run(
        [sys.executable, "-m", "archiver", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m archiver")
    assert result.stderr == ""


def hostile_copy(tmp_path, tiny_pipeline_dir) -> Path:
    pipeline = tmp_path / "hostile"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    plant_hostile_files(pipeline, tmp_path / "markers")
    return pipeline


def test_only_what_the_pipeline_is_made_of_is_packed(tmp_path, tiny_pipeline_dir, capsys):
    pipeline = hostile_copy(tmp_path, tiny_pipeline_dir)
    assert build(tmp_path, "--source", str(pipeline), "--model-name", "clean") == 0
    output = capsys.readouterr().out
    with zipfile.ZipFile(tmp_path / "store" / "clean.mar") as archive:
        names = set(archive.namelist())
        packed_handler = archive.read("handler.py")
        packed_config = yaml.safe_load(archive.read("model-config.yaml"))
    assert packed_handler == (REPO_ROOT / "handlers" / "torchserve" / "handler.py").read_bytes()  # ours, not the planted one
    assert "allow_pickle_weights" not in packed_config["handler"]
    assert not {"yaml.py", "README.md"} & names
    assert archive_member_is_ours(tmp_path / "store" / "clean.mar", "handlers/core/pipelines.py")
    assert not [name for name in names if name.endswith("evil.py") or ".credentials" in name]
    for left_out, why in (("handler.py", "Python code"), ("yaml.py", "Python code"), ("unet/.credentials", "hidden"),
                          ("tokenizer/tokenization_evil.py", "Python code"), ("README.md", "not model_index.json")):
        assert f"leaving out {left_out}: " in output and why in output.split(f"leaving out {left_out}: ")[1].splitlines()[0]
    assert not list((tmp_path / "markers").iterdir())


def archive_member_is_ours(mar: Path, name: str) -> bool:
    with zipfile.ZipFile(mar) as archive:
        return archive.read(name) == (REPO_ROOT / name).read_bytes()


def test_a_link_out_of_the_source_refuses_the_build(tmp_path, tiny_pipeline_dir, capsys):
    pipeline = tmp_path / "linked"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    secret = tmp_path / "secret-token.txt"
    secret.write_text("hf_secret")
    (pipeline / "tokenizer" / "notes.txt").symlink_to(secret)
    assert build(tmp_path, "--source", str(pipeline), "--model-name", "linked") == 2
    output = capsys.readouterr().err
    assert "tokenizer/notes.txt is a link to" in output and "outside" in output
    assert not (tmp_path / "store" / "linked.mar").exists()


def test_a_link_inside_the_source_is_packed_as_the_file_it_names(tmp_path, tiny_pipeline_dir):
    pipeline = tmp_path / "inner-link"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    tokenizer = pipeline / "tokenizer" / "tokenizer.json"
    moved = pipeline / "tokenizer" / "tokenizer-blob.json"
    tokenizer.rename(moved)
    tokenizer.symlink_to(moved)
    assert build(tmp_path, "--source", str(pipeline), "--model-name", "inner", "--archive-format", "no-archive") == 0
    packed = tmp_path / "store" / "inner" / "tokenizer" / "tokenizer.json"
    assert not packed.is_symlink() and packed.read_bytes() == moved.read_bytes()


def test_a_link_swapped_in_after_the_selection_is_checked_is_not_staged(tmp_path, tiny_pipeline_dir, monkeypatch):
    """The race: files are selected (links checked), then copied. What is staged is what was opened, checked."""
    pipeline = tmp_path / "swapped"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    secret = tmp_path / "secret-token.txt"
    secret.write_text("hf_secret")
    select = archiver_build.select_pipeline_files

    def select_then_swap(source, allow_pickle_weights):
        selection = select(source, allow_pickle_weights)
        swapped = pipeline / "tokenizer" / "tokenizer.json"
        swapped.unlink()
        swapped.symlink_to(secret)  # as another process could, between the check and the copy
        return selection

    monkeypatch.setattr(archiver_build, "select_pipeline_files", select_then_swap)
    staging = tmp_path / "staging"
    with pytest.raises(UnsafePipeline, match="outside the source"):
        archiver_build.copy_pipeline(pipeline, staging, allow_pickle_weights=False)
    assert not any("hf_secret" in path.read_text(errors="replace") for path in staging.rglob("*") if path.is_file())


@pytest.mark.parametrize("option", ["--lora", "--controlnet"])
@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", ""])
def test_an_adapter_name_that_is_not_a_plain_name_refuses_the_build(tmp_path, capsys, option, name):
    assert build_with_dev_models(["build", "--export-path", str(tmp_path), "--model-name", "m", "--source", "tiny",
                                  option, f"{name}=tiny"]) == 2
    assert "the name must be letters, digits" in capsys.readouterr().err or name == ""
    assert not list(tmp_path.iterdir())


def test_the_request_timeout_sets_the_handlers_bound_and_the_batchs_response_timeout(tmp_path, tiny_pipeline_dir):
    assert build(tmp_path, "--source", str(tiny_pipeline_dir), "--model-name", "t", "--batch-size", "4",
                 "--request-timeout", "90") == 0
    with zipfile.ZipFile(tmp_path / "store" / "t.mar") as archive:
        config = yaml.safe_load(archive.read("model-config.yaml"))
    assert config["handler"]["request_timeout_s"] == 90 and config["responseTimeout"] == 4 * 90


@pytest.mark.parametrize("component", ["handlers", "MAR-INF", "../escape", ".hidden"])
def test_a_component_named_like_a_path_of_ours_refuses_the_build(tmp_path, tiny_pipeline_dir, capsys, component):
    pipeline = tmp_path / "renamed"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    index = json.loads((pipeline / "model_index.json").read_text())
    index[component] = ["diffusers", "AutoencoderKL"]
    (pipeline / "model_index.json").write_text(json.dumps(index))
    assert build(tmp_path, "--source", str(pipeline), "--model-name", "renamed") == 2
    assert f"names a component {component!r}" in capsys.readouterr().err


def test_the_server_config_sets_the_answer_limit_and_may_not_set_an_envelope(tmp_path, tiny_pipeline_dir, capsys):
    server_config = tmp_path / "config.properties"
    server_config.write_text("# a KServe-style config\nmax_response_size=50000000\n")
    assert build(tmp_path, "--source", str(tiny_pipeline_dir), "--model-name", "k", "--server-config", str(server_config),
                 "--set", "kserve_protocol=v1") == 0
    with zipfile.ZipFile(tmp_path / "store" / "k.mar") as archive:
        handler = yaml.safe_load(archive.read("model-config.yaml"))["handler"]
    assert (handler["kserve_protocol"], handler["max_response_bytes"]) == ("v1", 50_000_000)
    # TorchServe's envelope would parse clients' bytes before the handler's guards: such a config is refused.
    server_config.write_text("service_envelope=kservev2\nmax_response_size=50000000\n")
    assert build(tmp_path, "--source", str(tiny_pipeline_dir), "--model-name", "e", "--server-config", str(server_config)) == 2
    assert "kserve_protocol" in capsys.readouterr().err
    # TorchServe's default limit cannot carry the default 768x768 numpy answer: refused at build time.
    server_config.write_text("inference_address=http://127.0.0.1:8080\n")
    assert build(tmp_path, "--source", str(tiny_pipeline_dir), "--model-name", "small", "--server-config", str(server_config)) == 2
    assert "max_response_size" in capsys.readouterr().err


def test_the_handler_default_answer_limit_is_the_shipped_config_s():
    for config in ("config.properties", "docker/config.properties", "kserve/config.properties"):
        assert int(read_properties(REPO_ROOT / config)["max_response_size"]) == Limits().max_response_bytes, config


@pytest.mark.parametrize(
    "arguments, batching",
    [
        (["--source", "digits"], "combined"),  # its recommended one: small images gain from shared calls
        (["--source", "digits", "--batching", "per_request"], "per_request"),  # bit-identical, asked for
        (["--source", "TINY"], "auto"),
        (["--source", "TINY", "--batching", "combined"], "combined"),
    ],
)
def test_batching_is_the_sources_recommended_one_unless_given(tmp_path, tiny_pipeline_dir, arguments, batching):
    arguments = [str(tiny_pipeline_dir) if argument == "TINY" else argument for argument in arguments]
    assert main(["build", *arguments, "--model-name", "m", "--export-path", str(tmp_path),
                 "--archive-format", "no-archive"]) == 0
    assert yaml.safe_load((tmp_path / "m" / "model-config.yaml").read_text())["handler"]["batching"] == batching


@pytest.mark.parametrize("archive_format", ["default", "no-archive"])
def test_an_archive_of_another_source_is_replaced_only_with_force(tmp_path, tiny_pipeline_dir, capsys, archive_format):
    def build_from(source, *extra):
        return main(["build", "--source", source, "--model-name", "m", "--export-path", str(tmp_path),
                     "--archive-format", archive_format, *extra])

    archive = tmp_path / ("m" if archive_format == "no-archive" else "m.mar")
    assert build_from("digits") == 0
    assert built_from(archive) == "digits"
    assert build_from("digits") == 0  # the same source again: a rebuild, no question
    capsys.readouterr()
    tiny = str(tiny_pipeline_dir.resolve())
    assert build_from(tiny) == 2
    error = capsys.readouterr().err
    assert f"{archive} exists and was built from 'digits', not {tiny!r}" in error and "--force" in error
    assert built_from(archive) == "digits"  # untouched
    assert build_from(tiny, "--force") == 0
    assert built_from(archive) == tiny


def test_an_archive_of_unknown_origin_is_not_replaced_without_force(tmp_path, capsys):
    (tmp_path / "m.mar").write_bytes(b"someone else's archive")
    assert main(["build", "--source", "digits", "--model-name", "m", "--export-path", str(tmp_path)]) == 2
    assert "built from an unknown source" in capsys.readouterr().err
    assert (tmp_path / "m.mar").read_bytes() == b"someone else's archive"


@pytest.mark.parametrize("source", ["models/sd15/missing", "sd15", "./sd15", "~/missing-model", "owner/../name", "C:\\models\\sd"])
def test_only_a_hub_id_form_goes_to_the_hub(tmp_path, capsys, source):
    """A mistyped path is an error that says so; it is never sent to the Hub as an id."""
    assert main(["build", "--source", source, "--export-path", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "is neither a local directory (none exists there) nor a Hugging Face Hub id of the form owner/name" in error
    assert "could not fetch" not in error


def test_a_hub_id_form_is_sent_to_the_hub(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is unreachable here: the attempt is what is checked
    assert main(["build", "--source", "owner/some-model.v1", "--export-path", str(tmp_path)]) == 2
    assert "could not fetch 'owner/some-model.v1'" in capsys.readouterr().err


def test_packing_reports_its_progress(tmp_path, tiny_pipeline_dir, capsys, monkeypatch):
    monkeypatch.setattr(archiver_build, "PROGRESS_INTERVAL_S", 0.001)  # the tiny model packs in well under 10 s
    assert build(tmp_path, "--source", str(tiny_pipeline_dir), "--model-name", "p") == 0
    output = capsys.readouterr().out
    assert re.search(r"packing \d+\.\d MB with torch-model-archiver", output)
    assert re.search(r"  packed [\d.]+ (B|KB|MB) of about [\d.]+ MB \(\d+ s\)", output)


def test_an_archive_with_adapters_records_the_pipeline_source(tmp_path):
    """The adapters' own sources are staged beside it; the archive is still the pipeline's."""
    assert build_with_dev_models(["build", "--source", "tiny", "--lora", "style=tiny", "--controlnet", "canny=tiny",
                                  "--model-name", "m", "--export-path", str(tmp_path), "--archive-format", "no-archive"]) == 0
    source = built_from(tmp_path / "m")
    assert Path(source).name.startswith("tiny-") and (Path(source) / "model_index.json").is_file()

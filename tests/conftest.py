"""Shared fixtures: tiny real pipelines (diffusers' get_dummy_components style), and archives of each
pipeline family built by the archiver."""

import zipfile
from pathlib import Path

import pytest
import yaml

from devtools.archives import main as build_archive
from devtools.models.tiny import build_tiny_pipeline

SMALL = {"height": 64, "width": 64, "num_inference_steps": 4}
# Built-in sources and the adapters packed with them, as `python -m archiver build` options.
FAMILIES = {
    "sd": ["--source", "tiny", "--controlnet", "canny=tiny", "--lora", "style=tiny", "--lora", "ink=tiny"],
    "sdxl": ["--source", "tiny-sdxl", "--refiner", "tiny"],
    "flux": ["--source", "tiny-flux"],
}


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny SD pipeline directory (safetensors), built once per test session."""
    workdir = tmp_path_factory.mktemp("tiny")
    target = workdir / "pipeline"
    build_tiny_pipeline(workdir).save_pretrained(target, safe_serialization=True)
    return target


@pytest.fixture(scope="session")
def family_archives(tmp_path_factory) -> dict[str, Path]:
    """Unpacked (no-archive) model directories, built once by our archiver, one per pipeline family."""
    store = tmp_path_factory.mktemp("families")
    for name, options in FAMILIES.items():
        size = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL.items()]
        arguments = ["build", "--model-name", name, "--export-path", str(store), "--archive-format", "no-archive"]
        assert build_archive([*arguments, *options, *size]) == 0
    return {name: store / name for name in FAMILIES}


def zip_directory(source: Path, zip_path: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(source).as_posix())
    return zip_path


def read_model_config(archive_dir: Path) -> dict:
    return yaml.safe_load((archive_dir / "model-config.yaml").read_text())


def plant_hostile_files(pipeline_dir: Path, marker_dir: Path) -> None:
    """What a hostile (or careless) model directory may hold besides its pipeline.

    Each planted module touches a file in marker_dir when imported, so a test can tell if it ran.
    """
    marker_dir.mkdir(parents=True, exist_ok=True)

    def planted(name: str) -> str:
        return f"import pathlib\npathlib.Path({str(marker_dir / name)!r}).touch()\n"

    # An Inference Endpoints-style handler.py, which torch-model-archiver would copy over ours.
    (pipeline_dir / "handler.py").write_text(
        planted("handler.py") + "from ts.torch_handler.base_handler import BaseHandler\n\nclass EndpointHandler(BaseHandler):\n    pass\n"
    )
    (pipeline_dir / "yaml.py").write_text(planted("yaml.py"))  # would shadow PyYAML on the worker's path
    (pipeline_dir / "handlers").mkdir(exist_ok=True)
    (pipeline_dir / "handlers" / "pipelines.py").write_text(planted("handlers-pipelines.py"))
    (pipeline_dir / "model-config.yaml").write_text("handler:\n  allow_pickle_weights: true\n")
    (pipeline_dir / "tokenizer" / "tokenization_evil.py").write_text(planted("tokenization_evil.py"))
    (pipeline_dir / "unet" / ".credentials").write_text("a nested dotfile")
    (pipeline_dir / "README.md").write_text("a model card")

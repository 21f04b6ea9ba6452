"""`pip install .` (not editable): the wheel carries what archives are built from, and one serves."""

import io
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from PIL import Image

from devtools import REPO_ROOT
from devtools.harness.torchserve import TorchServe

NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "model-store",
                                     "bench-results", "logs", "outputs")


def run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_a_wheel_installed_into_a_fresh_environment_builds_an_archive_that_serves(tmp_path):
    # A copy of the checkout: building in place would leave build/ and egg-info behind.
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCES)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(source)], cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    assert {"handlers/core/metrics.yaml", "archiver/models/tiny-digits/model_index.json",
            "archiver/models/tiny-digits/unet/diffusion_pytorch_model.safetensors"} <= packed

    # A fresh environment: the project only from the wheel; its dependencies are read from this
    # environment's site-packages through a .pth file, which does not run this checkout's editable hook.
    fresh = tmp_path / "fresh"
    run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], cwd=tmp_path)
    fresh_python = fresh / "bin" / "python"
    fresh_site = Path(run([str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          cwd=tmp_path).stdout.strip())
    (fresh_site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([sys.executable, "-m", "pip", "--python", str(fresh_python), "install", "--no-deps", str(wheel)], cwd=tmp_path)

    outside = tmp_path / "outside"  # no checkout, no config.properties
    outside.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = run([str(fresh_python), "-c", "import archiver, handlers; print(archiver.__file__, handlers.__file__)"],
                cwd=outside, env=env).stdout.split()
    assert all(Path(path).is_relative_to(fresh_site) for path in where), where
    built = run([str(fresh_python), "-m", "archiver", "build", "--source", "digits", "--model-name", "digits"],
                cwd=outside, env=env)
    assert "TorchServe's default settings" in built.stderr
    store = outside / "model-store"
    assert (store / "digits.mar").is_file()

    with TorchServe(tmp_path / "serve", store, {"digits": "digits.mar"}) as server:
        response = server.predict("digits", json={"prompt": "digit 3", "seed": 3, "output_format": "png"})
        assert response.status_code == 200, response.text
        assert Image.open(io.BytesIO(response.content), formats=["PNG"]).size == (64, 64)

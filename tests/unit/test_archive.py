import os
import stat
import threading
import zipfile

import pytest

from handlers.archive import COMPLETE_MARKER, locate_pipeline, unpack_once
from handlers.errors import PipelineNotFound, UnsafeArchive
from tests.conftest import zip_directory


def write_zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize(
    "member",
    ["../escaped.txt", "pipeline/../../escaped.txt", "/etc/escaped.txt", "..\\escaped.txt", "C:/escaped.txt"],
)
def test_members_that_escape_the_target_are_refused(tmp_path, member):
    archive = write_zip(tmp_path / "model.zip", {"model_index.json": "{}", member: "x"})
    with pytest.raises(UnsafeArchive, match="refusing archive member"):
        unpack_once(archive, tmp_path / "cache")
    assert not (tmp_path / "escaped.txt").exists()
    assert not any(path.name == "escaped.txt" for path in (tmp_path / "cache").rglob("*"))


def test_symbolic_link_members_are_refused(tmp_path):
    archive = tmp_path / "model.zip"
    link = zipfile.ZipInfo("unet/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as writer:
        writer.writestr("model_index.json", "{}")
        writer.writestr(link, "/etc/passwd")
    with pytest.raises(UnsafeArchive, match="symbolic link"):
        unpack_once(archive, tmp_path / "cache")


def test_zip_is_unpacked_once_and_reused(tmp_path):
    archive = write_zip(tmp_path / "model.zip", {"model_index.json": "{}", "unet/config.json": "{}"})
    first = unpack_once(archive, tmp_path / "cache")
    marker_mtime = (first / COMPLETE_MARKER).stat().st_mtime_ns
    os.utime(archive)  # touching the zip must not matter: the cache is keyed by content
    second = unpack_once(archive, tmp_path / "cache")
    assert first == second
    assert (second / COMPLETE_MARKER).stat().st_mtime_ns == marker_mtime
    assert (second / "unet" / "config.json").read_text() == "{}"


def test_parallel_workers_share_one_extraction(tmp_path):
    archive = write_zip(tmp_path / "model.zip", {"model_index.json": "{}", "vae/config.json": "{}" * 10000})
    results, errors = [], []

    def worker():
        try:
            results.append(unpack_once(archive, tmp_path / "cache"))
        except Exception as error:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(results)) == 1
    unpacked_dirs = [path for path in (tmp_path / "cache").iterdir() if path.is_dir()]
    assert unpacked_dirs == [results[0]]


def test_a_half_written_extraction_is_redone(tmp_path):
    archive = write_zip(tmp_path / "model.zip", {"model_index.json": "{}"})
    target = unpack_once(archive, tmp_path / "cache")
    (target / COMPLETE_MARKER).unlink()
    (target / "model_index.json").unlink()
    assert (unpack_once(archive, tmp_path / "cache") / "model_index.json").is_file()


def test_locate_pipeline_accepts_both_archive_layouts(tmp_path, tiny_pipeline_dir):
    assert locate_pipeline(tiny_pipeline_dir) == tiny_pipeline_dir

    flat = tmp_path / "flat"
    flat.mkdir()
    zip_directory(tiny_pipeline_dir, flat / "model.zip")
    assert (locate_pipeline(flat) / "unet" / "config.json").is_file()

    nested = tmp_path / "nested"
    nested.mkdir()
    zip_directory(tiny_pipeline_dir, nested / "model.zip", prefix="stable-diffusion/")
    found = locate_pipeline(nested, tmp_path / "elsewhere")
    assert found.name == "stable-diffusion"
    assert found.is_relative_to(tmp_path / "elsewhere")


def test_locate_pipeline_explains_what_is_missing(tmp_path):
    with pytest.raises(PipelineNotFound, match="model_index.json"):
        locate_pipeline(tmp_path)

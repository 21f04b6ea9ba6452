import os
import stat
import struct
import threading
import zipfile

import pytest

from handlers.core.archive import COMPLETE_MARKER, MAX_MEMBERS, locate_pipeline, unpack_once
from handlers.core.errors import PipelineNotFound, UnsafeArchive
from tests.conftest import zip_directory
from tests.unit.helpers import serve


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


def write_zip_bomb(path, unpacked_bytes: int):
    """A few kB of deflated zeros that unpack to unpacked_bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model_index.json", "{}")
        with archive.open("unet/diffusion_pytorch_model.safetensors", "w") as member:
            for _ in range(unpacked_bytes // (1 << 20)):
                member.write(bytes(1 << 20))
    return path


def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    archive = write_zip_bomb(tmp_path / "model.zip", 64 << 20)
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(UnsafeArchive, match=f"unpacks to {(64 << 20) + 2} bytes; the cap is {32 << 20}"):
        unpack_once(archive, tmp_path / "cache", max_unpacked_bytes=32 << 20)
    written = [path for path in (tmp_path / "cache").rglob("*") if path.is_file() and not path.name.endswith(".lock")]
    assert written == []
    assert unpack_once(archive, tmp_path / "cache", max_unpacked_bytes=128 << 20)  # under the cap it unpacks


def test_a_member_that_lies_about_its_size_cannot_write_more(tmp_path):
    archive = write_zip_bomb(tmp_path / "model.zip", 16 << 20)
    declared = 1024
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as reader:
        member = reader.getinfo("unet/diffusion_pytorch_model.safetensors")
    struct.pack_into("<I", data, member.header_offset + 22, declared)  # local header: uncompressed size
    central = data.rindex(b"PK\x01\x02\x14")
    struct.pack_into("<I", data, central + 24, declared)  # central directory: uncompressed size
    archive.write_bytes(bytes(data))

    with pytest.raises(UnsafeArchive, match="corrupt zip"):
        unpack_once(archive, tmp_path / "cache", max_unpacked_bytes=1 << 20)  # the lie passes the cap ...
    largest = max((path.stat().st_size for path in (tmp_path / "cache").rglob("*") if path.is_file()), default=0)
    assert largest <= declared  # ... but never more than the declared size reached the disk


def test_a_zip_of_too_many_members_is_refused(tmp_path):
    archive = write_zip(tmp_path / "model.zip", {f"file-{number}": "" for number in range(MAX_MEMBERS + 1)})
    with pytest.raises(UnsafeArchive, match=f"{MAX_MEMBERS + 1} members"):
        unpack_once(archive, tmp_path / "cache")


def test_the_handler_section_sets_the_unpack_cap(tmp_path, tiny_pipeline_dir):
    zip_directory(tiny_pipeline_dir, tmp_path / "model.zip")
    with pytest.raises(UnsafeArchive, match="the cap is 1000 "):
        serve(tmp_path, max_unpacked_bytes=1000)


@pytest.fixture(scope="module")
def small_mar(tmp_path_factory, tiny_pipeline_dir):
    """A .mar by our archiver whose handler: section caps unpacking a little above what it holds."""
    from archiver.cli import main as archiver_main

    store = tmp_path_factory.mktemp("private-store")
    assert archiver_main(["build", "--export-path", str(store), "--model-name", "m", "--source", str(tiny_pipeline_dir),
                          "--height", "64", "--width", "64"]) == 0
    return store / "m.mar"


def test_an_archive_opened_by_source_is_unpacked_into_a_private_directory(tmp_path, small_mar):
    from handlers.core.source import open_source

    root = tmp_path / "unpacked"
    opened = open_source(str(small_mar), root)
    assert opened.model_dir.parent == root and (opened.model_dir / COMPLETE_MARKER).is_file()
    status = os.stat(root)
    assert (stat.S_IMODE(status.st_mode), status.st_uid) == (0o700, os.getuid())


@pytest.mark.parametrize("plant", ["group-writable", "a link elsewhere"])
def test_an_unpack_directory_others_could_have_written_is_refused_with_what_to_do(tmp_path, small_mar, plant):
    """Another local user could plant a model there, with its marker saying it is complete."""
    from handlers.core.source import open_source

    root = tmp_path / "shared"
    if plant == "group-writable":
        root.mkdir(mode=0o775)
        root.chmod(0o775)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        root.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="owned by this user .* with mode 0700"):
        open_source(str(small_mar), root)


def test_the_default_unpack_directory_is_per_user(small_mar):
    from handlers.core.source import default_unpack_root

    assert default_unpack_root().name.endswith(f"-{os.getuid()}")


def test_an_archive_opened_by_source_keeps_its_own_unpack_cap(tmp_path, tiny_pipeline_dir):
    from archiver.cli import main as archiver_main
    from handlers.core.source import open_source

    store = tmp_path / "store"
    assert archiver_main(["build", "--export-path", str(store), "--model-name", "capped", "--source", str(tiny_pipeline_dir),
                          "--height", "64", "--width", "64", "--set", "max_unpacked_bytes=1000"]) == 0
    with pytest.raises(UnsafeArchive, match="the cap is 1000 "):
        open_source(str(store / "capped.mar"), tmp_path / "unpacked")

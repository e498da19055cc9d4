"""The cutfs layer itself: after a cut and a remount, file data is there only as of the
file's last fsync (or fdatasync), and a create, rename or unlink only once its directory
was fsynced; a torn cut adds unsynced sectors, never beyond a file's durable size."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.powercut.rig import Layer

pytestmark = pytest.mark.crash


@pytest.fixture
def layer(cutfs: Path, tmp_path: Path) -> Iterator[Layer]:
    layer = Layer(cutfs, tmp_path / "backing", tmp_path / "mnt")
    layer.mount()
    try:
        yield layer
    finally:
        layer.unmount(clean=True)
        layer.log.close()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def power_cycle(layer: Layer, tear_seed: int | None = None) -> None:
    layer.cut(tear_seed)
    layer.unmount()
    layer.mount()


def test_data_is_durable_only_as_of_the_files_last_sync(layer: Layer) -> None:
    m = layer.mnt
    fd = os.open(m / "f", os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(fd, b"a" * 8192, 0)
    os.fdatasync(fd)
    os.pwrite(fd, b"b" * 4096, 0)  # never synced
    os.pwrite(fd, b"c" * 4096, 8192)  # an extension, never synced
    os.close(fd)
    fsync_path(m)
    (m / "unsynced-dir-entry").write_bytes(b"x")
    power_cycle(layer)
    assert (m / "f").read_bytes() == b"a" * 8192
    assert not (m / "unsynced-dir-entry").exists()


def test_names_are_durable_only_after_the_directorys_fsync(layer: Layer) -> None:
    m = layer.mnt
    (m / "d").mkdir()
    fsync_path(m)
    for name in ("old", "gone"):
        (m / "d" / name).write_bytes(name.encode())
        fsync_path(m / "d" / name)
    fsync_path(m / "d")
    (m / "d" / "tmp").write_bytes(b"new")
    fsync_path(m / "d" / "tmp")
    os.replace(m / "d" / "tmp", m / "d" / "old")
    (m / "d" / "gone").unlink()
    power_cycle(layer)  # neither the rename nor the unlink reached the directory
    assert sorted(os.listdir(m / "d")) == ["gone", "old"]
    assert (m / "d" / "old").read_bytes() == b"old"

    (m / "d" / "tmp").write_bytes(b"new")
    fsync_path(m / "d" / "tmp")
    os.replace(m / "d" / "tmp", m / "d" / "old")
    (m / "d" / "gone").unlink()
    fsync_path(m / "d")
    power_cycle(layer)
    assert sorted(os.listdir(m / "d")) == ["old"]
    assert (m / "d" / "old").read_bytes() == b"new"


def test_a_torn_cut_keeps_some_unsynced_sectors_within_the_durable_size(layer: Layer) -> None:
    m = layer.mnt
    fd = os.open(m / "f", os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(fd, bytes(64 * 512), 0)
    os.fsync(fd)
    fsync_path(m)
    os.pwrite(fd, b"\xff" * (80 * 512), 0)  # 64 sectors over old ones, 16 past the end
    os.close(fd)
    power_cycle(layer, tear_seed=7)
    data = (m / "f").read_bytes()
    assert len(data) == 64 * 512
    sectors = {data[i : i + 512] for i in range(0, len(data), 512)}
    assert sectors == {bytes(512), b"\xff" * 512}, "each sector old or new, some of each"

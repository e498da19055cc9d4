"""The seam for durable I/O: the real implementation and the one atomic-replace sequence."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from deltavol.store import fs


def test_replace_atomic_writes_the_parts_and_can_keep_the_file_open(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    fd = fs.replace_atomic(path, [(0, b"head"), (8, memoryview(b"tail"))], keep_open=True)
    try:
        assert path.read_bytes() == b"head\0\0\0\0tail"
        os.pwrite(fd, b"HEAD", 0)  # the descriptor is the new file's, read-write
    finally:
        os.close(fd)
    assert path.read_bytes() == b"HEAD\0\0\0\0tail"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_a_failed_replace_keeps_the_old_file_and_leaves_no_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # RealFS looks os up at each call
    with pytest.raises(OSError):
        fs.replace_atomic(path, [(0, b"new")])
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_use_installs_another_file_system_for_every_call(tmp_path: Path) -> None:
    calls: list[str] = []

    class Watching(fs.RealFS):
        def fsync(self, fd: int) -> None:
            calls.append("fsync")
            super().fsync(fd)

    old = fs.use(Watching())
    try:
        fs.replace_atomic(tmp_path / "f", [(0, b"x")])
    finally:
        assert isinstance(fs.use(old), Watching)
    assert calls == ["fsync"]
    assert fs.current() is old


def test_exists_raises_on_a_stat_error_other_than_no_such_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An EIO or EACCES says nothing about the file being there: taking it for a missing
    file would set a running update's files aside as corrupt."""
    there = tmp_path / "s.transfer"
    there.write_bytes(b"x")
    real = os.stat

    def stat(path: str | Path, *args: object, **kwargs: object) -> os.stat_result:
        if str(path) == str(there):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(OSError) as info:
        fs.RealFS().exists(there)
    assert info.value.errno == errno.EIO
    assert not fs.RealFS().exists(tmp_path / "absent")
    assert not fs.RealFS().exists(tmp_path / "absent" / "deeper")
    (tmp_path / "file").write_bytes(b"")
    assert not fs.RealFS().exists(tmp_path / "file" / "below")  # ENOTDIR
    assert fs.RealFS().exists(tmp_path / "file")

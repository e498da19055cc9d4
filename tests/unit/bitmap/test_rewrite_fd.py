"""TrackingFile.rewrite keeps its fd on the file in place whatever fails: bits written after
a failed rewrite must reach the file a restart reads, never a replaced inode."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import pytest

from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.errors import DeltavolError
from deltavol.store.group_commit import GroupCommit

G = 4096
SIZE = 64 * G


@pytest.mark.parametrize("failing", [1, 2, 3])
def test_bits_written_after_a_rewrite_whose_open_failed_reach_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    """The ``failing``-th ``open`` the rewrite makes (the new file, the directory to sync,
    any other) fails with EMFILE; then a chunk's bit is written."""
    path = tmp_path / "s.tracking"
    tf = persist.TrackingFile(path, SIZE, G, GroupCommit(), region=G)
    try:
        bm = Bitmap(SIZE, G)
        bm.set(3)
        tf.rewrite(bm, 1)
        real, calls = os.open, []

        def emfile(p: object, *args: object, **kwargs: object) -> int:
            calls.append(p)
            if len(calls) == failing:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return real(p, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", emfile)
        bm.clear_all()
        with contextlib.suppress(DeltavolError, OSError):  # refused or not: what follows holds
            tf.rewrite(bm, 2)
        monkeypatch.undo()
        bm.set(9)
        tf.write_bits(bm, [9])
        on_disk, _ = persist.load(path, persist.KIND_TRACKING, G, SIZE)
        assert on_disk.test(9), f"the bit went to a replaced file (open #{failing} failed)"
    finally:
        tf.close()

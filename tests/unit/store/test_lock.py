"""The data dir lock: a full data dir while writing the owner's pid is an error that says
so (no traceback at start-up), and leaves the lock free."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from deltavol.errors import NoSpace
from deltavol.store import lock as lock_module
from deltavol.store.lock import DataDirLock


def test_a_full_data_dir_while_taking_the_lock_is_no_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "lock"

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lock_module.os, "pwrite", full)
    with pytest.raises(NoSpace) as info:
        DataDirLock(str(path)).acquire()
    assert str(path) in info.value.message
    monkeypatch.undo()
    again = DataDirLock(str(path))
    again.acquire()  # the failed attempt did not keep it
    assert path.read_text() == f"{os.getpid()}\n"
    again.release()

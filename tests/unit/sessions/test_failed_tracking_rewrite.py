"""A tracking rewrite that fails (a full disk, EIO) before its file replaces the old one
leaves in memory only bits the file has: a bit set in memory is taken for durable, so
one in no file would let a later change of its chunk go down unrecorded (DESIGN section
3, invariant 2). Cancel and a restore's take-back OR the transfer into tracking through
such a rewrite; the new bitmap becomes the one in memory only once it is in the file.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from deltavol.bitmap import persist
from deltavol.errors import DeltavolError
from tests.unit.sessions.test_save_implies_tracking import OWED, MakeRig, rigs, syncs

__all__ = ["rigs", "syncs"]


def full_disk_once(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The next replace of a tracking file fails before its rename (ENOSPC on the tmp file)."""
    real = persist.fs.replace_atomic
    left = {"fail": 1}

    def replace_atomic(path: Path, *a: Any, **kw: Any) -> int:
        if left["fail"] and str(path).endswith(".tracking"):
            left["fail"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **kw)

    monkeypatch.setattr(persist.fs, "replace_atomic", replace_atomic)
    return left


async def test_a_cancel_whose_rewrite_fails_keeps_tracking_as_the_file_has_it(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await rigs(save_limit=0)
    s, c = rig.session, OWED.start + 3
    left = full_disk_once(monkeypatch)
    with pytest.raises(DeltavolError):
        await s.cancel()
    assert left["fail"] == 0
    assert s.transfer is not None and s.transfer.test(c), "the update still owes it"
    assert not s.tracking.test(c), "a bit in memory that no tracking file has"
    assert c in rig.owed_on_disk()


async def test_a_change_after_a_failed_cancel_is_in_a_file(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No room to save: copy-before-write, then the change; a kill -9 after it must find
    the chunk in the tracking file or in the transfer file."""
    rig = await rigs(save_limit=0)
    s, c = rig.session, OWED.start + 3
    full_disk_once(monkeypatch)
    with pytest.raises(DeltavolError):
        await s.cancel()
    await rig.write(*rig.chunk(c, b"Z"))
    assert c in rig.on_disk() or c in rig.owed_on_disk(), "a change after the mark in no file"


async def test_a_cancel_retried_after_a_failed_rewrite_tracks_what_was_owed(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await rigs(save_limit=0)
    s = rig.session
    full_disk_once(monkeypatch)
    with pytest.raises(DeltavolError):
        await s.cancel()
    await s.cancel()
    assert s.transfer is None
    assert [c for c in OWED if s.tracking.test(c)] == list(OWED)
    assert set(OWED) <= set(rig.on_disk())

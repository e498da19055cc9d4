"""A local target's fsync that fails once (ENOSPC, then the disk has room again) fails the
update; a resume then finishes it, without a restart. The volume's failed syncs stay
failed for its clients and marks (``FileBackend._sync``), but not for a copy's flushes of
its target: the chunks a failed flush covered are owed again and copied anew. Meanwhile
the status does not call the session consistent: its target is partly written."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from deltavol.service import Service
from deltavol.sessions.states import State
from deltavol.store import fs
from tests.unit.sessions.test_kernel_copy import svc
from tests.unit.sessions.test_operations import G, consistent_session

__all__ = ["svc"]


async def test_a_target_sync_that_failed_once_fails_the_update_but_not_the_resume(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await consistent_session(svc)
    s.retry.limit = 0
    src, dst = svc.volumes.get("src"), svc.volumes.get("dst")
    target_fd, cur, armed = dst.backend._fd, fs._current, [True]

    def failing(real: Callable[[int], None]) -> Callable[[int], None]:
        def sync(fd: int) -> None:
            if fd == target_fd and armed[0]:
                armed[0] = False
                raise OSError(errno.ENOSPC, "No space left on device")
            real(fd)

        return sync

    monkeypatch.setattr(cur, "fsync", failing(cur.fsync))
    monkeypatch.setattr(cur, "fdatasync", failing(cur.fdatasync))
    before = await dst.backend.pread(2 * G, G)
    await src.export.pwrite(2 * G, b"B" * G)
    await s.start_update(False)
    await s.wait()
    assert not armed[0] and s.state is State.FAILED, (s.state, s.last_error)
    # the target already holds chunk 2 from after the point in time: no image of it now
    assert await dst.backend.pread(2 * G, G) != before
    assert not s.status()["consistent"]
    await s.resume()  # the disk has room again
    await s.wait()
    assert s.state is State.IDLE and s.status()["consistent"], s.last_error
    size = src.backend.size
    assert await dst.backend.pread(0, size) == await src.backend.pread(0, size)

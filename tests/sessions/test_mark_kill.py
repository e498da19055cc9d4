"""kill -9 at the two new points of a mark: its new tracking file written aside (and fsynced)
but the row not committed, and the row committed but the old tracking file still in place.

Either way the restarted server has every change: before the commit the session is still
consistent as of the last update and the next update copies exactly the changed chunks;
after it the update it committed finishes by itself. The aside file is gone after the start.
Real server processes (``DELTAVOL_TEST_FAULT``), qemu-io writes, images compared byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Server
from tests.sessions.common import G, MiB, apply, session_with_copy, wait_for

SIZE = 8 * MiB
CHANGED = [3, 17, 40, 41, 99]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "data")
    srv.start()
    yield srv
    srv.stop()


def killed_at(server: Server, point: str) -> None:
    server.stop()
    server.env["DELTAVOL_TEST_FAULT"] = point
    server.start()
    out = server.run("session", "update", "s")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert server.proc is not None and server.proc.wait(30) == -9
    del server.env["DELTAVOL_TEST_FAULT"]


def test_a_kill_before_the_marks_commit_keeps_the_changes_tracked(server: Server, tmp_path: Path) -> None:
    model = session_with_copy(server, SIZE)
    apply(server, "src", *model.chunks(0x11, CHANGED))
    before = server.status()["point_in_time"]
    killed_at(server, "mark-before-commit")
    bitmaps = tmp_path / "data" / "bitmaps"
    assert (bitmaps / "s.tracking.next").exists(), "the new tracking file is written before the commit"
    server.start()
    st = server.status()
    assert st["state"] == "idle" and st["consistent"] and st["point_in_time"] == before, st
    assert st["tracked_bytes"] == len(CHANGED) * G, st
    assert not (bitmaps / "s.tracking.next").exists()
    server.cli("session", "update", "s", "--wait")
    st = server.status()
    assert st["update"]["bytes_sent"] == len(CHANGED) * G, st
    assert server.image("dst") == model.snapshot()


def test_a_kill_after_the_marks_commit_finishes_the_update(server: Server, tmp_path: Path) -> None:
    model = session_with_copy(server, SIZE)
    apply(server, "src", *model.chunks(0x22, CHANGED))
    killed_at(server, "mark-after-commit")
    server.start()
    st = wait_for(server, lambda st: st["state"] == "idle", "idle")
    assert st["consistent"] and st["update"]["bytes_sent"] == len(CHANGED) * G, st
    assert server.image("dst") == model.snapshot()
    # the old tracking file (a superset: the mark's chunks) may cost them once more, no more
    apply(server, "src", *model.chunks(0x33, [7]))
    server.cli("session", "update", "s", "--wait")
    sent = server.status()["update"]["bytes_sent"]
    assert G <= sent <= (len(CHANGED) + 1) * G, sent
    assert server.image("dst") == model.snapshot()

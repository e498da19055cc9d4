"""A session create or a peer's adoption that fails leaves nothing live behind.

* Its tracking file is closed: no round, no settle timer, and no later ``settle`` that
  replaces ``NAME.tracking``, which by then is the file of the session created next under
  the same name (DESIGN section 3, invariant 2).
* The source's wiring (its gate, its group commit) goes with it: a volume removed and
  created again under the same name gets wiring of its own, so a session's marks close
  the gate every write to the new volume passes.

Drives the real Service, SessionManager and SQLite in a tmp data dir; the failure is an
EIO from the directory sync of the tracking file's replace (the file is in place then,
its carried regions waiting for a round), or a target the adopting server cannot open.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import traceback
from pathlib import Path

import pytest

from deltavol.bitmap import persist
from deltavol.errors import Conflict, DeltavolError
from deltavol.service import Service
from deltavol.sessions import reverse
from deltavol.store import fs
from deltavol.volumes import PeerGuard, secret_sha256
from tests.unit.sessions.service_rig import SIZE, ServiceRig, svc_rig

__all__ = ["svc_rig"]

G = 64 * 1024


def dir_sync_fails_once(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The directory sync of the next replace of a file fails (EIO): the file is in place."""
    real = fs.sync_dir
    left = {"fail": 1}

    def sync_dir(path: Path) -> None:
        if left["fail"] and any(f.name == "replace_atomic" for f in traceback.extract_stack()):
            left["fail"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(fs, "sync_dir", sync_dir)
    return left


async def written_source(svc: Service) -> None:
    svc.create_volume("src", SIZE)
    svc.create_volume("dst", SIZE)
    src = svc.volumes.get("src")
    await src.backend.pwrite(0, b"x" * 4096)
    src.gate.recent.note(0, 4096)  # as its export's write notes it: a new file carries it hot


async def test_a_failed_create_closes_its_tracking_file(
    svc_rig: ServiceRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = svc_rig.open()
    await svc.start()
    await written_source(svc)
    files: list[persist.TrackingFile] = []
    real_init = persist.TrackingFile.__init__

    def init(self: persist.TrackingFile, *a: object, **kw: object) -> None:
        real_init(self, *a, **kw)  # type: ignore[arg-type]
        files.append(self)

    monkeypatch.setattr(persist.TrackingFile, "__init__", init)
    left = dir_sync_fails_once(monkeypatch)
    with pytest.raises(DeltavolError):
        await svc.create_session(name="s", source="src", target="dst")
    assert left["fail"] == 0
    (orphan,) = files
    assert orphan._settle is None, "a settle timer of a file no session owns"
    assert orphan._fd < 0, "the file of a failed create is still open"

    # the create is retried; the abandoned file's settle then finds it lost
    await svc.create_session(name="s", source="src", target="dst")
    s = svc.sessions.get("s")
    await svc.volumes.get("src")._gated.pwrite(8 * G, b"y" * 4096)
    path = s.tracker.path
    before, _, _ = persist.load_tracking(path, G, SIZE)
    assert before.test(8), "the live session tracks its change"
    orphan.lost = "an fdatasync failed"
    await orphan.settle()
    after, _, _ = persist.load_tracking(path, G, SIZE)
    assert after.test(8), "the live session's file was replaced by the abandoned one's"


async def test_an_unclosed_file_does_not_replace_a_path_it_no_longer_holds(tmp_path: Path) -> None:
    """The safeguard below the one above: a file that may have lost pages is written again
    only while its path names its own inode."""
    from deltavol.bitmap.bitmap import Bitmap
    from deltavol.store.group_commit import GroupCommit

    path = tmp_path / "s.tracking"
    commit = GroupCommit()
    old = persist.TrackingFile(path, SIZE, G, commit)
    old.rewrite(Bitmap(SIZE, G), 1)
    new = persist.TrackingFile(path, SIZE, G, commit)
    live = Bitmap(SIZE, G)
    live.set(5)
    new.rewrite(live, 1)  # another session's file under the same name
    try:
        old.lost = "an fdatasync failed"
        with pytest.raises(DeltavolError, match="names another file"):
            await old.settle()
        got, _, _ = persist.load_tracking(path, G, SIZE)
        assert got.test(5), "the other session's file was replaced"
        old.close()
        await old.settle()  # closed: nothing, not even an error
        got, _, _ = persist.load_tracking(path, G, SIZE)
        assert got.test(5)
    finally:
        old.close()
        new.close()


async def test_a_failed_create_leaves_no_wiring_to_a_volume_of_the_same_name(
    svc_rig: ServiceRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = svc_rig.open()
    await svc.start()
    await written_source(svc)
    left = dir_sync_fails_once(monkeypatch)
    with pytest.raises(DeltavolError):
        await svc.create_session(name="s", source="src", target="dst")
    assert left["fail"] == 0
    assert "src" not in svc.sessions._wiring, "wiring left with no session"
    await svc.remove_volume("src")
    svc.create_volume("src", SIZE)
    await svc.create_session(name="s", source="src", target="dst")
    s, vol = svc.sessions.get("s"), svc.volumes.get("src")
    assert s._gate is vol.gate, "the session's marks close a gate no write to its source passes"
    async with s._gate.closed():  # as a mark holds it
        write = asyncio.ensure_future(vol._gated.pwrite(8192, b"y" * 4096))
        await asyncio.sleep(0.05)
        assert not write.done(), "a client's write went down in the middle of a mark"
    await write


async def test_a_stale_wiring_is_not_taken_for_a_new_volume(svc_rig: ServiceRig) -> None:
    """Whatever left it: wiring of another gate than the volume's is built anew."""
    from deltavol.sessions.manager import _SourceWiring

    svc = svc_rig.open()
    await svc.start()
    await written_source(svc)
    svc.sessions._wiring["src"] = _SourceWiring()  # a gate of no volume
    await svc.create_session(name="s", source="src", target="dst")
    assert svc.sessions.get("s")._gate is svc.volumes.get("src").gate


async def test_a_failed_adoption_leaves_no_wiring(svc_rig: ServiceRig) -> None:
    svc = svc_rig.open()
    await svc.start()
    svc.create_volume("src", SIZE)
    vol = svc.volumes.get("src")
    vol.peer_guard = PeerGuard("session 's' of a peer", secret_sha256("g"))
    body = {
        "request": "r1",
        "name": "s",
        "source": "src",
        "target": f"nbd+unix:///dst?socket={svc_rig.root}/none.sock",  # nothing listens: 409
        "guard": "g",
        "target_guard": "tg",
        "granularity": G,
        "size": SIZE,
        "tracking": base64.b64encode(bytes(SIZE // G // 8)).decode(),
        "peer": {"api": "http://127.0.0.1:1"},
        "back": {"api": "http://127.0.0.1:1", "target": "nbd://127.0.0.1:1/src"},
        "point_in_time": "2026-01-01T00:00:00Z",
    }
    with pytest.raises(Conflict):
        await reverse.adopt(svc.sessions, body)
    assert "src" not in svc.sessions._wiring, "wiring left with no session"

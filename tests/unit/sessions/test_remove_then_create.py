"""A session created under the name of one whose removal is still under way: the removal
deletes its files by path after its awaits (the last update's transfer-file unlink in a
thread, here held as a busy disk would), so the create is refused until it is over."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from deltavol.errors import InUse
from deltavol.store import fs
from tests.unit.sessions.service_rig import WAIT, MiB, ServiceRig, idle, svc_rig

__all__ = ["svc_rig"]

SIZE = 4 * MiB


async def test_a_name_being_removed_is_refused_then_free(svc_rig: ServiceRig) -> None:
    release = threading.Event()
    loop_thread = threading.get_ident()

    class Slow(fs.RealFS):
        def unlink(self, path: str | Path, missing_ok: bool = False) -> None:
            if str(path).endswith("a.transfer") and threading.get_ident() != loop_thread:
                release.wait(WAIT)
            super().unlink(path, missing_ok)

    old = fs.use(Slow())
    try:
        svc = svc_rig.open()
        for v in ("src", "t1", "src2", "t2"):
            svc.create_volume(v, SIZE)
        await svc.start()
        await svc.create_session(name="a", source="src", target="t1")
        await svc.update_session("a", True, None)
        await idle(svc, "a")  # its transfer file's unlink is held in a thread
        remove = asyncio.ensure_future(svc.remove_session("a"))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if "a" not in [s.name for s in svc.sessions.all()]:
                break
        assert not remove.done()
        with pytest.raises(InUse, match="being removed"):
            await svc.create_session(name="a", source="src2", target="t2")
        release.set()
        await remove
        await svc.create_session(name="a", source="src2", target="t2")
        assert svc.sessions.get("a").files.tracking_path.exists()
    finally:
        release.set()
        await svc_rig.close()
        fs.use(old)

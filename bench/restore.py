"""Restore figures: rolling a source back after 1 % of its chunks changed, against copying the
whole target back with nbdcopy (what one does without deltavol: ``nbdcopy`` from the copy).

Both end durable: deltavol's restore fsyncs the source before it reports done, and nbdcopy
runs with ``--flush``. The page cache is written back before each timed copy, so neither
inherits the other's writeback; nbdcopy copies file to file (the target volume's image to a
fresh file beside the source), as deltavol reads the target volume's file in-process.
deltavol's restore is timed from its request to the server's ``restore.finished`` event,
as a client following the event stream sees it end; nbdcopy's run includes its process start.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator

from bench import figures as f
from bench.peers import Deltavol, deltavol


def _restored(dv: Deltavol, name: str) -> tuple[float, dict]:
    """A restore's seconds from its request to the server's ``restore.finished`` event (no
    polling interval in them: ``Deltavol.timed_run``), and the session's status after it,
    which must be idle and consistent."""
    took = dv.timed_run(name, f"/v1/sessions/{name}/restore", ("restore.finished", "restore.failed"))
    info = dv.call("GET", f"/v1/sessions/{name}")
    if info["state"] != "idle" or not info["consistent"]:
        raise RuntimeError(f"session {name}: {info['state']}: {info['last_error']}")
    return took, info


def restore(s: f.Settings) -> Iterator[f.Row]:
    size = s.copy_size
    source = s.work / "restore-src.img"
    f.fill(source, size, data_every=32 * f.MiB)
    with deltavol(s.work / "dv-restore") as dv:
        dv.volume("src", path=source)
        target = dv.volume("dst", size=size)
        dv.session("s", "src", "dst")
        dv.update("s", full=True)
        dv.wait("s")
        nchunks = size // f.CHUNK
        changed = random.Random(13).sample(range(nchunks), nchunks // 100)
        f._write_chunks(dv.uri("src"), changed)
        os.sync()
        ours, info = _restored(dv, "s")
        done = info["update"]["bytes_done"]
        assert done == len(changed) * f.CHUNK, (
            f"restore copied back {done}, expected {len(changed) * f.CHUNK}"
        )
        # the same bytes again over the source, restored and idle (nothing changes there)
        os.sync()
        floor = f.bare_copy(target, source, [c * f.CHUNK for c in changed], f.CHUNK, kernel=False)
        back = f.fresh(s.work / "restore-back.img", size)
        os.sync()
        theirs = f.timed(lambda: subprocess.run(["nbdcopy", "--flush", str(target), str(back)], check=True))
        back.unlink()
    source.unlink()
    figure = f"restore, 1 % of chunks changed, {size / f.GiB:g} GiB half data, from a local volume"
    yield f.Row("restore", figure, "s", ours, "nbdcopy full copy back", theirs, ("<=", 0.03))
    bare = "floor: those chunks read back, written and fsynced by a bare loop, no deltavol"
    yield f.Row("restore", bare, "s", floor, "nbdcopy full copy back", theirs)

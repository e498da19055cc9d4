"""Restore figures: rolling a source back after 1 % of its chunks changed, against copying the
whole target back with nbdcopy (what one does without deltavol: ``nbdcopy`` from the copy).

Both end durable: deltavol's restore fsyncs the source before it reports done, and nbdcopy
runs with ``--flush``. The page cache is written back before each timed copy, so neither
inherits the other's writeback; nbdcopy copies file to file (the target volume's image to a
fresh file beside the source), as deltavol reads the target volume's file in-process.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator

from bench import figures as f
from bench.peers import Deltavol, deltavol


def _restored(dv: Deltavol, name: str) -> dict:
    """Start a restore and poll (10 ms) until it ends; it must end idle and consistent."""
    dv.call("POST", f"/v1/sessions/{name}/restore")
    while True:
        info = dv.call("GET", f"/v1/sessions/{name}")
        if info["state"] != "restoring":
            if info["state"] != "idle" or not info["consistent"]:
                raise RuntimeError(f"session {name}: {info['state']}: {info['last_error']}")
            return info
        if info["last_error"]:
            raise RuntimeError(f"session {name}: restore failed: {info['last_error']}")
        time.sleep(0.01)


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
        info: dict = {}
        ours = f.timed(lambda: info.update(_restored(dv, "s")))
        done = info["update"]["bytes_done"]
        assert done == len(changed) * f.CHUNK, (
            f"restore copied back {done}, expected {len(changed) * f.CHUNK}"
        )
        back = f.fresh(s.work / "restore-back.img", size)
        os.sync()
        theirs = f.timed(lambda: subprocess.run(["nbdcopy", "--flush", str(target), str(back)], check=True))
        back.unlink()
    source.unlink()
    figure = f"restore, 1 % of chunks changed, {size / f.GiB:g} GiB half data, from a local volume"
    yield f.Row("restore", figure, "s", ours, "nbdcopy full copy back", theirs, ("<=", 0.03))

"""A failed sync of a volume stays failed: Linux reports a writeback error once per open
file, so the sync after a failed one may succeed although the data the failed one was to
make durable is gone. Every later flush and FUA write of that volume fails, with a message
that says to restart, until it is opened again; a copy's flush of its target does not (the
copy owes again what the failed flush covered)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from deltavol.backend.file import FileBackend
from deltavol.errors import DeltavolError
from deltavol.store import fs

MiB = 1 << 20


class FailsOnce(fs.RealFS):
    """The real file system whose next fsync or fdatasync fails with EIO, once, as the
    kernel reports a lost writeback."""

    def __init__(self) -> None:
        self.armed = True
        self.syncs = 0

    def _maybe_fail(self) -> None:
        self.syncs += 1
        if self.armed:
            self.armed = False
            raise OSError(errno.EIO, "Input/output error")

    def fsync(self, fd: int) -> None:
        self._maybe_fail()
        super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self._maybe_fail()
        super().fdatasync(fd)


@pytest.mark.parametrize("first", ["flush", "fua write"])
async def test_every_sync_after_a_failed_one_fails_until_reopened(tmp_path: Path, first: str) -> None:
    path = tmp_path / "v"
    path.write_bytes(bytes(MiB))
    vol = FileBackend("v", str(path))
    fails = FailsOnce()
    real = fs.use(fails)
    try:
        with pytest.raises(DeltavolError, match=r"Input/output error|EIO"):
            if first == "flush":
                await vol.flush()
            else:
                await vol.pwrite(0, b"a" * 4096, fua=True)
        for later in (vol.flush(), vol.pwrite(4096, b"b" * 4096, fua=True)):
            with pytest.raises(DeltavolError, match=r"an earlier sync of this volume failed.*restart"):
                await later
        assert fails.syncs == 1  # the later ones did not sync: a success there would lie
        # a copy's flush of its target syncs again: the copy owes what the failed one covered
        await vol.flush(as_target=True)
        assert fails.syncs == 2
        await vol.close()
        again = FileBackend("v", str(path))  # opened again: its syncs are its own
        await again.flush()
        await again.pwrite(0, b"c" * 4096, fua=True)
        assert fails.syncs == 4
        await again.close()
    finally:
        fs.use(real)

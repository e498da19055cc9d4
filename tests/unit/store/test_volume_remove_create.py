"""A volume's name and image stay its own until its removal has unlinked the image.

``remove`` waits for the backend to close, which waits for a worker thread still using
the file. A ``create`` of the same name meanwhile must be refused: it would take
images/NAME.img for an uncommitted leftover, make its own, and the removal would then
unlink the new volume's image, its acknowledged writes with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from pathlib import Path

import pytest

from deltavol.errors import AlreadyExists, InUse
from deltavol.store.db import Database
from deltavol.volumes import Volumes

MiB = 1 << 20


async def test_a_create_during_a_remove_is_refused_and_keeps_nothing(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    db = Database(str(tmp_path / "db.sqlite"))
    vols = Volumes(db, images)
    old = vols.create("a", MiB)
    release = threading.Event()
    started = threading.Event()

    def hold() -> None:  # a worker thread using the old file (a lane write, a copy ...)
        started.set()
        release.wait(10)

    busy = asyncio.ensure_future(old.backend._run("read", hold))
    await asyncio.to_thread(started.wait, 5)
    removing = asyncio.ensure_future(vols.remove("a", lambda v: None))
    while "a" in [v.name for v in vols.all()]:  # the row and live name are gone at once
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)  # remove now waits in close for the thread
    assert not removing.done()
    with pytest.raises(InUse, match="being removed") as exc:
        vols.create("a", MiB)
    assert exc.value.http_status == 409
    with pytest.raises(InUse, match="being removed"):
        await vols.create_from("a", MiB, lambda b: asyncio.sleep(0))
    assert os.path.exists(old.path), "a refused create touched the old image"
    release.set()
    await removing
    await busy
    assert not os.path.exists(old.path)

    # now the name is free: a new volume's acknowledged data lives in its image
    new = vols.create("a", MiB)
    data = os.urandom(4096)
    await new.backend.pwrite(0, data, fua=True)
    await vols.close()
    db.close()
    again = Volumes(Database(str(tmp_path / "db.sqlite")), images)
    again.load()
    got = await again.get("a").backend.pread(0, 4096)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    await again.close()


def test_a_create_never_unlinks_an_image_a_volume_owns(tmp_path: Path) -> None:
    """An imported file lying at images/NAME.img is not an uncommitted leftover."""
    images = tmp_path / "images"
    images.mkdir()
    img = images / "b.img"
    img.write_bytes(b"\x5a" * MiB)
    vols = Volumes(Database(str(tmp_path / "db.sqlite")), images)
    vols.import_("imp", str(img))
    with pytest.raises(InUse, match="image of volume 'imp'"):
        vols.create("b", MiB)
    assert img.read_bytes() == b"\x5a" * MiB
    with pytest.raises(AlreadyExists):
        vols.create("imp", MiB)

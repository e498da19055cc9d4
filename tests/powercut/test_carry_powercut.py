"""Power cuts after a tracking file was written from scratch with the regions its source
wrote lately carried hot (``backend/recent.py``): a session's creation, an update's
cancel. The first writes after it in those regions go down with their chunk bits in the
page cache only; a power cut loses those bits, and the hot regions must bring them back.
"""

from __future__ import annotations

import pytest

from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from tests.powercut.rig import Rig, SourceModel, run_writer
from tests.powercut.test_powercut import (
    BOUND,
    CHUNKS,
    PATHS,
    SIZE,
    G,
    api,
    finished,
    image,
    settled,
    start_update,
    written_to_targets,
)
from tests.sessions.common import differing_chunks

pytestmark = [pytest.mark.crash, pytest.mark.slow]


def write(rig: Rig, model: SourceModel, seed: int, count: int, **opts: object) -> None:
    w = run_writer(rig.server.uri("src"), seed, count, G, CHUNKS, final_flush=True, **opts)
    out, err = w.communicate(timeout=60)
    assert w.returncode == 0, err
    model.apply(out)


def volumes(rig: Rig) -> None:
    rig.server.cli("volume", "create", "src", "--size", str(SIZE))
    rig.server.cli("volume", "create", "dst", "--size", str(SIZE))
    PATHS.clear()
    image(rig, "src"), image(rig, "dst")


@pytest.mark.timeout(300)
def test_a_power_cut_after_a_session_is_created_loses_no_write_made_since(rig: Rig) -> None:
    """The source is written in two regions, a session is created (its file carries them
    hot), and the writes go on there, with FLUSH and FUA. After the power cut every chunk
    the source changed since the creation is in the session's tracking, and the re-copy
    it costs is the two regions at most."""
    srv = rig.server
    volumes(rig)
    model = SourceModel(bytes(SIZE), G)
    write(rig, model, 31, 48)  # before the session
    srv.cli("session", "create", "loc", "--source", "src", "--target", "dst")
    rig.a.sync()
    created = image(rig, "src")
    write(rig, model, 32, 200, flush_every=4, fua_percent=50)
    rig.power_cut()
    rig.power_on()
    source = settled(rig, model)
    changed = differing_chunks(created, source, G)
    assert changed, "the writes after the creation did not reach the source"
    st = api(rig, "GET", "/v1/sessions/loc")
    raw = (srv.root / "bitmaps" / "loc.tracking").read_bytes()
    bits = raw[persist.HEADER_SIZE : persist.HEADER_SIZE + (SIZE // G + 7) // 8]
    tracked = Bitmap.from_bytes(SIZE, G, bits)
    missed = [c for c in changed if not tracked.test(c)]
    assert not missed, f"chunks changed after the creation not tracked after the power cut: {missed}"
    assert 0 < st["recopy_bytes"] <= BOUND and "restarted" in st["full_reason"], st


@pytest.mark.timeout(300)
def test_a_power_cut_after_a_cancel_misses_no_write_into_the_regions_it_carried_hot(rig: Rig) -> None:
    """A consistent session marks, its update is cancelled (tracking written anew, the
    regions written lately carried hot), and the source is written there, with FLUSH and
    FUA. After the power cut the next update makes the target the source byte for byte,
    resending no more than the two regions written."""
    srv = rig.server
    volumes(rig)
    srv.cli("session", "create", "loc", "--source", "src", "--target", "dst")
    srv.cli("session", "update", "loc", "--full", "--wait")
    model = SourceModel(bytes(SIZE), G)
    write(rig, model, 41, 48)
    start_update(rig, "loc", False, max_rate="64K")  # slow: still copying at the cancel
    model.flush_all()
    st = api(rig, "POST", "/v1/sessions/loc/cancel")
    assert st["state"] != "copying", st
    rig.a.sync()
    write(rig, model, 42, 200, flush_every=4, fua_percent=50)
    rig.power_cut()
    rig.power_on()
    source = settled(rig, model)
    assert source != image(rig, "dst"), "the writes after the cancel did not reach the source"
    before = written_to_targets(rig)["loc"]
    again = start_update(rig, "loc", False)
    finished(rig, "loc", again["id"])
    diff = differing_chunks(image(rig, "dst"), source, G)
    assert not diff, f"writes after the cancel missed by the update after the power cut: chunks {diff}"
    sent = written_to_targets(rig)["loc"] - before
    assert sent <= BOUND, f"{sent} bytes resent after the power cut, more than {BOUND}"

"""Real power cuts of the real server (DESIGN §3): the data dir and the remote target's
image on cutfs layers that lose all that was not synced, NBD writers using FLUSH and FUA,
incremental and full updates to a local and a remote (qemu-nbd) target, the power cut at
a seeded random moment (while the sessions mark, while they copy with writes going on --
some past a checkpoint -- or after they finished), then power on and the five invariants
checked byte for byte:

1. every write acknowledged with FUA or before a completed FLUSH -- and, as a mark flushes
   the source, every write acknowledged before a mark -- is on the source;
2.-4. the interrupted update finishes (its own mark, or a re-mark after the power-on) with
   the target exactly the source as of that point in time; then a new update with nothing
   written brings the target to the source (every difference was tracked);
5. no full copy: what an incremental update writes to a target after the power-on is
   bounded by the hot regions the writers touched (they write in two regions of eight).

DELTAVOL_POWERCUT_TRIALS sets the number of cuts (24), DELTAVOL_POWERCUT_SEED the first
trial's seed (1000; the others follow). A failure names its seed; a trial's choices
(writes, kind of update, moment of the cut, torn or not) come from its seed alone, the
bytes already on the volume from the trials before it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

from deltavol.bitmap.persist import HOT_REGION
from deltavol.cli.api_client import ApiTarget, call
from deltavol.sessions.session import CHECKPOINT_SECONDS
from tests.powercut.rig import Rig, SourceModel, run_writer
from tests.sessions.common import differing_chunks, volume_path

pytestmark = [pytest.mark.crash, pytest.mark.slow]

G = 64 * 1024
SIZE = 32 * 1024 * 1024
REGION = max(HOT_REGION, G)
REGIONS = (1, 5)  # where the writers write: 2 of the volume's 8 hot regions
CHUNKS = ",".join(f"{r * REGION // G}-{(r + 1) * REGION // G}" for r in REGIONS)
BOUND = len(REGIONS) * REGION  # most an incremental update may resend after a power cut
TRIALS = int(os.environ.get("DELTAVOL_POWERCUT_TRIALS", "24"))
FIRST_SEED = int(os.environ.get("DELTAVOL_POWERCUT_SEED", "1000"))  # the trials' seeds follow it
SESSIONS = ("loc", "rem")


PATHS: dict[str, Path] = {}  # volume -> its image (asked once: a CLI call costs 0.5 s on a busy machine)


def image(rig: Rig, volume: str) -> bytes:
    if volume not in PATHS:
        PATHS[volume] = volume_path(rig.server, volume)
    return PATHS[volume].read_bytes()


def api(rig: Rig, method: str, path: str, body: dict | None = None) -> dict:
    """The control API in-process (the CLI would start an interpreter per call)."""
    return call(ApiTarget(rig.server.root), method, path, body)


def start_update(rig: Rig, session: str, full: bool, max_rate: str | None = None) -> dict:
    """Marked (or, for a full update, started); the update's record."""
    return api(rig, "POST", f"/v1/sessions/{session}/update", {"full": full, "max_rate": max_rate})["update"]


def written_to_targets(rig: Rig) -> dict[str, int]:
    """Bytes each session's target received since the power-on (cutfs counts them)."""
    dst = PATHS["dst"].relative_to(rig.a.mnt)
    return {"loc": rig.a.written().get(str(dst), 0), "rem": rig.b.written().get("t.img", 0)}


def target_image(rig: Rig, session: str) -> bytes:
    return image(rig, "dst") if session == "loc" else rig.target.image.read_bytes()


def finished(rig: Rig, session: str, update_id: int, timeout: float = 120) -> dict:
    """The session once idle and consistent with an update no older than ``update_id``."""
    deadline = time.monotonic() + timeout
    while True:
        st = api(rig, "GET", f"/v1/sessions/{session}")
        if st["state"] == "idle" and st["consistent"]:
            assert st["update"]["id"] >= update_id, (
                f"{session}: the update marked before the cut is lost {st}"
            )
            return st
        assert time.monotonic() < deadline, f"{session}: never idle and consistent: {st}"
        time.sleep(0.02)


def settled(rig: Rig, model: SourceModel) -> bytes:
    """Invariant 1 on the source after a power-on; the source then becomes the model."""
    source = image(rig, "src")
    bad = model.violations(source)
    assert bad == [], f"acknowledged, flushed writes lost on the source: {bad[:5]}"
    model.settle(source)
    return source


def check_update(
    rig: Rig, session: str, update_id: int, want: dict[str | None, bytes], sent_before: int, since: str = ""
) -> int:
    """Wait for the session's update; its target must be one of ``want`` (point in time ->
    image, ``None`` for a point after ``since``, when the source was as it is now); returns
    the bytes sent since ``sent_before``. A point in time before ``since`` and not in
    ``want`` (a full update's catch-up mark among the writes before the cut) is left to
    the next update's check."""
    st = finished(rig, session, update_id)
    at_mark = st["point_in_time"] in want
    if not at_mark and since and st["point_in_time"] < since:
        return written_to_targets(rig)[session] - sent_before
    expected = want[st["point_in_time"]] if at_mark else want[None]
    got = target_image(rig, session)
    diff = differing_chunks(got, expected, G)
    assert not diff, (
        f"{session}: target differs from the source at {st['point_in_time']} "
        f"({'its mark' if at_mark else 'a re-mark after the power-on'}) in chunks {diff}: "
        + ", ".join(f"chunk {c} holds tag {tag(got, c)} instead of {tag(expected, c)}" for c in diff[:3])
        + f"; update {st['update']}"
    )
    return written_to_targets(rig)[session] - sent_before


def tag(data: bytes, chunk: int) -> int:
    return int.from_bytes(data[chunk * G : chunk * G + 8], "little")


def catch_up(rig: Rig, source: bytes, bounded: bool = True) -> None:
    """A new update with nothing written: every difference was tracked, and (``bounded``:
    no full update was asked for and cut short) nothing more is sent than the hot regions."""
    for s in SESSIONS:
        before = written_to_targets(rig)[s]
        u = start_update(rig, s, full=False)
        sent = check_update(rig, s, u["id"], {None: source}, before)
        assert not bounded or sent <= BOUND, (
            f"{s}: the update after the cut sent {sent} bytes, more than {BOUND}"
        )


def cut_during_marks(
    rig: Rig, model: SourceModel, rng: random.Random, seed: int, full: bool, previous: bytes
) -> bytes:
    """The power fails while the sessions mark: each update happened or not. Either way its
    target is then the image of its last point in time: before the marks (``previous``),
    or at them or after the power-on (the source: nothing was written since)."""

    def mark(session: str) -> None:
        with contextlib.suppress(Exception):  # the server may die under the call
            start_update(rig, session, full, "2MiB/s")

    threads = [threading.Thread(target=mark, args=(s,)) for s in SESSIONS]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0, 0.1))
    rig.power_cut(tear_seed=seed if rng.random() < 0.5 else None)
    for t in threads:
        t.join(60)
    rig.power_on()
    source = settled(rig, model)  # writes never flushed: there or not, as the mark got on
    for s in SESSIONS:
        st = finished(rig, s, 0)
        got = target_image(rig, s)
        diff = differing_chunks(got, source, G)
        assert got == previous or not diff, (
            f"{s}: target is neither the image before the marks nor the source, at {st['point_in_time']}: "
            f"chunks {diff} differ from the source; update {st['update']}"
        )
    catch_up(rig, source, bounded=not full)  # a full update cut short may leave all owed
    return source


def one_cut(rig: Rig, model: SourceModel, seed: int, previous: bytes) -> bytes:
    """A trial: writes, marks, writes, the cut, the checks; returns the source at its end."""
    rng = random.Random(seed)
    srv = rig.server
    # one trial in four copies for longer than a checkpoint's period before the cut
    long = rng.random() < 0.25
    # writes before the mark: all acknowledged, some flushed or FUA, some neither
    w = run_writer(
        srv.uri("src"),
        4 * seed + 1,
        rng.randint(48, 64) if long else rng.randint(4, 40),
        G,
        CHUNKS,
        flush_every=rng.choice([0, 3, 10]),
        fua_percent=rng.choice([0, 25]),
        final_flush=rng.random() < 0.5,
    )
    out, err = w.communicate(timeout=60)
    assert w.returncode == 0, err
    model.apply(out)
    full = rng.random() < 0.2
    if not long and rng.random() < 0.15:
        return cut_during_marks(rig, model, rng, seed, full, previous)
    marks = {}
    for s in SESSIONS:
        u = start_update(rig, s, full, "16MiB/s" if full else "1MiB/s" if long else "2MiB/s")
        marks[s] = (u["id"], u["marked_at"])
    model.flush_all()  # a mark flushes the source first (DESIGN §3)
    mark_image = model.image()

    # writes after the marks (copy-on-first-write), with FLUSH and FUA; the cut
    w = run_writer(
        srv.uri("src"),
        4 * seed + 2,
        400,
        G,
        CHUNKS,
        delay=0.003,
        flush_every=rng.choice([1, 4, 16]),
        fua_percent=rng.choice([0, 10, 50]),
    )
    time.sleep(rng.uniform(CHECKPOINT_SECONDS, 2 * CHECKPOINT_SECONDS) if long else rng.uniform(0.02, 1.5))
    tear = rng.random() < 0.5
    rig.power_cut(tear_seed=seed if tear else None)
    out, _ = w.communicate(timeout=60)
    model.apply(out)
    rig.power_on()
    powered_on = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    source = settled(rig, model)

    # the interrupted updates finish: each target the source at its mark, or at a re-mark
    # after the power-on (nothing has been written since)
    for s in SESSIONS:
        update_id, marked_at = marks[s]
        if full:  # its catch-up mark may have fallen among the writes before the cut
            sent = check_update(rig, s, update_id, {None: source}, 0, since=powered_on)
        else:
            sent = check_update(rig, s, update_id, {marked_at: mark_image, None: source}, 0)
        if not full:
            assert sent <= BOUND, f"{s}: {sent} bytes resent after the power cut, more than {BOUND}"
    catch_up(rig, source)
    return source


@pytest.mark.timeout(120 + 30 * TRIALS)
def test_power_cuts_during_updates_to_local_and_remote_targets(rig: Rig) -> None:
    srv = rig.server
    srv.cli("volume", "create", "src", "--size", str(SIZE))
    srv.cli("volume", "create", "dst", "--size", str(SIZE))
    PATHS.clear()
    image(rig, "src"), image(rig, "dst")
    rig.target.create(SIZE)
    rig.target.start()
    srv.cli("session", "create", "loc", "--source", "src", "--target", "dst")
    srv.cli("session", "create", "rem", "--source", "src", "--target", rig.target.uri)
    for s in SESSIONS:
        srv.cli("session", "update", s, "--full", "--wait")
    rig.a.sync()  # the setup written back long ago (a created volume's durability: its own test)
    rig.b.sync()
    model = SourceModel(bytes(SIZE), G)
    seeds = [FIRST_SEED + trial for trial in range(TRIALS)]
    source = bytes(SIZE)
    for seed in seeds:
        try:
            source = one_cut(rig, model, seed, source)
        except AssertionError as exc:
            raise AssertionError(f"power cut with seed {seed} (trials from {FIRST_SEED}): {exc}") from exc
    print(f"\npower cuts: {rig.cuts}, seeds {seeds[0]}..{seeds[-1]}")
    assert rig.cuts == TRIALS


def test_a_created_volume_survives_a_power_cut(rig: Rig) -> None:
    """``volume create`` returned: the volume and a write made durable on it (FUA) are
    there after a power cut."""
    srv = rig.server
    srv.cli("volume", "create", "v", "--size", str(16 * G))
    w = run_writer(srv.uri("v"), 7, 4, G, "0-16", fua_percent=100)
    out, err = w.communicate(timeout=60)
    assert w.returncode == 0, err
    model = SourceModel(bytes(16 * G), G)
    model.apply(out)
    rig.power_cut()
    rig.power_on()
    listed = json.loads(srv.cli("volume", "list", "--json"))
    assert [v["name"] for v in listed] == ["v"], listed
    path = Path(json.loads(srv.cli("volume", "info", "v", "--json"))["path"])
    assert path.exists(), f"volume v is listed, its image {path} is gone"
    data = path.read_bytes()
    assert len(data) == 16 * G and model.violations(data) == []


@pytest.mark.timeout(300)
def test_a_power_cut_while_protecting_re_marks_and_copies_as_of_the_new_mark(rig: Rig) -> None:
    """Save records are not synced: after a power loss in the middle of copy-on-first-write
    the update cannot trust them, so it gives up its mark and re-marks. The target then
    holds the source as of a mark taken after the power-on -- never the old mark's image
    with a block whose record was lost -- and no full copy is made."""
    srv = rig.server
    srv.cli("volume", "create", "src", "--size", str(SIZE))
    srv.cli("volume", "create", "dst", "--size", str(SIZE))
    PATHS.clear()
    image(rig, "src"), image(rig, "dst")
    srv.cli("session", "create", "loc", "--source", "src", "--target", "dst")
    srv.cli("session", "update", "loc", "--full", "--wait")
    rig.a.sync()
    model = SourceModel(bytes(SIZE), G)
    w = run_writer(srv.uri("src"), 11, 48, G, CHUNKS, final_flush=True)
    out, err = w.communicate(timeout=60)
    assert w.returncode == 0, err
    model.apply(out)
    u = start_update(rig, "loc", False, "256KiB/s")  # slow: most chunks stay owed
    model.flush_all()
    # writes to owed chunks save their old contents first; some are flushed
    w = run_writer(srv.uri("src"), 12, 400, G, CHUNKS, delay=0.003, flush_every=8)
    deadline = time.monotonic() + 30
    while (st := api(rig, "GET", "/v1/sessions/loc"))["update"]["cofw_saved_bytes"] < 8 * 4096:
        assert time.monotonic() < deadline, f"no copy-on-first-write: {st}"
        time.sleep(0.02)
    assert st["state"] == "copying" and st["update"]["id"] == u["id"], st
    rig.power_cut()
    cut_at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    out, _ = w.communicate(timeout=60)
    model.apply(out)
    rig.power_on()
    source = settled(rig, model)
    st = finished(rig, "loc", u["id"])
    assert st["update"]["id"] == u["id"] and st["update"]["remark"], f"not re-marked: {st}"
    assert st["point_in_time"] > cut_at, f"the old mark {u['marked_at']} was finished: {st}"
    diff = differing_chunks(image(rig, "dst"), source, G)
    assert not diff, f"target differs from the source at the re-mark in chunks {diff}: {st}"
    sent = written_to_targets(rig)["loc"]
    assert sent <= BOUND, f"{sent} bytes resent after the power cut, more than {BOUND}"
    catch_up_one = start_update(rig, "loc", False)
    st = finished(rig, "loc", catch_up_one["id"])
    assert not differing_chunks(image(rig, "dst"), source, G)


@pytest.mark.timeout(300)
def test_a_power_cut_after_a_mark_misses_no_write_into_the_regions_it_carried_hot(rig: Rig) -> None:
    """A mark carries the regions written before it into the new tracking file as hot, so
    the first writes after it in those regions go down with their chunk bits in the page
    cache only. A power cut then loses those bits; the hot regions must bring them back:
    after the power-on the next update makes the target the source again, every write
    acknowledged with FUA or before a FLUSH included, and resends no more than the two
    regions written."""
    srv = rig.server
    srv.cli("volume", "create", "src", "--size", str(SIZE))
    srv.cli("volume", "create", "dst", "--size", str(SIZE))
    PATHS.clear()
    image(rig, "src"), image(rig, "dst")
    srv.cli("session", "create", "loc", "--source", "src", "--target", "dst")
    srv.cli("session", "update", "loc", "--full", "--wait")
    model = SourceModel(bytes(SIZE), G)
    w = run_writer(srv.uri("src"), 21, 48, G, CHUNKS, final_flush=True)  # before the mark
    out, err = w.communicate(timeout=60)
    assert w.returncode == 0, err
    model.apply(out)
    u = start_update(rig, "loc", False)
    model.flush_all()
    finished(rig, "loc", u["id"])  # the copy done: no copy-on-first-write below
    rig.a.sync()
    w = run_writer(srv.uri("src"), 22, 200, G, CHUNKS, flush_every=4, fua_percent=50, final_flush=True)
    out, err = w.communicate(timeout=60)
    assert w.returncode == 0, err
    model.apply(out)
    rig.power_cut()
    rig.power_on()
    source = settled(rig, model)
    assert source != image(rig, "dst"), "the writes after the mark did not reach the source"
    st = api(rig, "GET", "/v1/sessions/loc")
    before = written_to_targets(rig)["loc"]
    again = start_update(rig, "loc", False)
    finished(rig, "loc", again["id"])
    diff = differing_chunks(image(rig, "dst"), source, G)
    assert not diff, f"writes after the mark missed by the update after the power cut: chunks {diff}"
    assert 0 < st["recopy_bytes"] <= BOUND and "restarted" in st["full_reason"], st
    sent = written_to_targets(rig)["loc"] - before
    assert sent <= BOUND, f"{sent} bytes resent after the power cut, more than {BOUND}"

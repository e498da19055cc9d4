"""Session.track over a group commit: a change waits for the round that makes its bits
durable; a failed round leaves the chunk untracked, and the next change of the chunk
writes its bits again and gets a new round. With hot regions of several chunks, only the
first change of a region waits; the others are tracked at once (``track_now``)."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deltavol.backend.gate import WriteGate
from deltavol.bitmap import persist
from deltavol.copy.save_area import SaveArea
from deltavol.errors import DeltavolError, NoSpace
from deltavol.sessions.session import Session
from deltavol.store.group_commit import GroupCommit
from tests.fakes import until

G = 4096
SIZE = 64 * G


def make_session(
    tmp_path: Path, name: str, commit: GroupCommit, hot_region: int = G, load: bool = False
) -> Session:
    """A session with only what tracking needs: the source is a stand-in with a name and a size.

    By default one chunk per hot region: every first change waits for a round."""
    source: Any = SimpleNamespace(name="src", size=SIZE)
    s = Session(
        name=name,
        source=source,
        target_spec="dst",
        granularity=G,
        files=tmp_path,
        save_dir=tmp_path,
        gate=WriteGate(),
        commit=commit,
        open_target=None,
        persist_row=lambda s: None,
        hot_region=hot_region,
    )
    if load:
        s.load_files()
    else:
        s.create_files()
    return s


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[list[Session]]:
    commit = GroupCommit()
    made = [make_session(tmp_path, name, commit) for name in ("s1", "s2")]
    yield made
    for s in made:
        assert s.tracking_file is not None
        s.tracking_file.close()


@pytest.fixture
def fdatasync(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Counts fdatasync calls; ``fail`` set to an errno makes them raise it."""
    state: dict[str, Any] = {"calls": 0, "fail": None}
    real = os.fdatasync

    def fake(fd: int) -> None:
        state["calls"] += 1
        if state["fail"] is not None:
            raise OSError(state["fail"], os.strerror(state["fail"]))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fake)
    return state


def on_disk(s: Session) -> list[tuple[int, int]]:
    bm, _ = persist.load(s.files.tracking_path, persist.KIND_TRACKING, G, SIZE)
    return list(bm.runs())


async def test_a_first_change_waits_for_its_round_and_a_later_one_for_nothing(
    sessions: list[Session], fdatasync: dict[str, Any]
) -> None:
    s = sessions[0]
    rounds = s.track(5 * G, 2 * G)
    assert len(rounds) == 1 and not rounds[0].done()
    assert not s.tracked(5 * G, G), "a bit set but not yet durable counts as tracked"
    again = s.track(6 * G, 10)  # same chunk, round still to come: wait for the same round
    assert again == rounds
    await asyncio.shield(rounds[0])
    assert s.tracked(5 * G, 2 * G)
    assert s.track(5 * G, 2 * G) == []
    assert on_disk(s) == [(5, 2)]
    assert fdatasync["calls"] == 1


async def test_sessions_of_one_source_share_the_round(
    sessions: list[Session], fdatasync: dict[str, Any]
) -> None:
    r1, r2 = (s.track(9 * G, G) for s in sessions)
    assert len(r1) == 1 and len(r2) == 1 and r1[0] is not r2[0]  # each file's own future
    await asyncio.gather(asyncio.shield(r1[0]), asyncio.shield(r2[0]))
    assert fdatasync["calls"] == 2  # one round: each session's file once
    assert all(s.tracked(9 * G, G) and on_disk(s) == [(9, 1)] for s in sessions)


async def test_after_a_failed_round_the_next_change_writes_the_bits_again(
    sessions: list[Session], fdatasync: dict[str, Any]
) -> None:
    s = sessions[0]
    fdatasync["fail"] = errno.ENOSPC
    rounds = s.track(3 * G, G)
    assert len(rounds) == 1
    with pytest.raises(NoSpace) as ei:
        await asyncio.shield(rounds[0])
    assert str(s.files.tracking_path) in ei.value.message
    assert not s.tracked(3 * G, G), "a chunk whose round failed counts as tracked"
    assert not s.tracked(0, SIZE)
    assert s.tracked(4 * G, G) is False  # never written: not set

    fdatasync["fail"] = None
    calls = fdatasync["calls"]
    retry = s.track(3 * G, G)
    assert len(retry) == 1 and retry[0] is not rounds[0], "no new round for a chunk whose round failed"
    assert not s.tracked(3 * G, G)
    await asyncio.shield(retry[0])
    assert fdatasync["calls"] > calls
    assert s.tracked(3 * G, G)
    assert on_disk(s) == [(3, 1)]
    assert s.track(3 * G, G) == []


async def test_a_failed_round_is_retried_with_the_new_chunks_of_the_next_change(
    sessions: list[Session], fdatasync: dict[str, Any]
) -> None:
    s = sessions[0]
    fdatasync["fail"] = errno.EIO
    (failed,) = s.track(20 * G, 2 * G)
    with pytest.raises(Exception, match=str(s.files.tracking_path)):
        await asyncio.shield(failed)
    fdatasync["fail"] = None
    rounds = s.track(21 * G, 3 * G)  # 21 failed before, 22 and 23 are new
    assert len(rounds) == 1 and rounds[0] is not failed
    await asyncio.shield(rounds[0])
    assert s.tracked(21 * G, 3 * G)
    assert not s.tracked(20 * G, G), "chunk 20 was not changed again: still waits for a round"
    assert on_disk(s) == [(20, 4)]  # 20's bit reached the file with its byte anyway (a superset)
    (last,) = s.track(20 * G, G)
    await asyncio.shield(last)
    assert s.tracked(20 * G, 4 * G)


# --- hot regions of several chunks ---------------------------------------------------------
REGION = 4 * G


@pytest.fixture
def hot(tmp_path: Path) -> Iterator[Session]:
    s = make_session(tmp_path, "h", GroupCommit(), hot_region=REGION)
    yield s
    assert s.tracking_file is not None
    s.tracking_file.close()


async def test_only_the_first_change_of_a_region_waits_for_a_round(
    hot: Session, fdatasync: dict[str, Any]
) -> None:
    s = hot
    assert not s.track_now(0, G), "a region not yet hot needs a round"
    assert not s.tracking.test(0), "a refused track_now changed the bitmap"
    (first,) = s.track(0, G)
    assert not s.track_now(G, G), "tracked at once while its region's round still runs"
    assert s.track(G, G) == [first]
    await asyncio.shield(first)
    assert fdatasync["calls"] == 1
    assert s.track_now(2 * G, 2 * G) and s.tracked(0, REGION)
    assert s.track(3 * G, G) == []
    assert fdatasync["calls"] == 1, "a change in a durable hot region paid an fsync"
    assert on_disk(s) == [(0, 4)], "the bits of changes tracked at once are not in the file"
    assert not s.track_now(REGION, G) and len(s.track(REGION, G)) == 1  # the next region: a round


async def test_a_failed_bit_write_fails_the_change_and_the_next_change_writes_it(
    hot: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = hot
    await asyncio.shield(s.track(0, G)[0])
    real = os.pwrite

    def failing(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(DeltavolError):
        s.track_now(G, G)
    assert not s.tracked(G, G), "a bit that did not reach the file counts as tracked"
    assert not s.track_now(G, G)
    monkeypatch.setattr(os, "pwrite", real)
    assert s.track(G, G) == [] and s.tracked(G, G)
    assert on_disk(s) == [(0, 2)]


async def test_a_bit_whose_write_failed_is_in_the_file_once_tracking_is_made_durable(
    hot: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update's end makes tracking durable and forgets what waits: a bit set in memory
    whose write into the file failed must be in the file then, or the chunk's next change
    is taken as tracked and goes down with no bit on disk."""
    s = hot
    await asyncio.shield(s.track(0, G)[0])
    real = os.pwrite

    def failing(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(DeltavolError):
        s.track_now(G, G)
    monkeypatch.setattr(os, "pwrite", real)
    await s.tracker.make_durable(s.next_update_id)
    assert s.tracked(G, G)
    assert on_disk(s) == [(0, 2)], "a change taken as tracked has no bit in the file"


async def test_a_short_bit_write_is_finished_before_the_change_goes_down(
    hot: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page of a bit written at once may go in in pieces: all of it is in the file
    when ``track_now`` returns."""
    s = hot
    await asyncio.shield(s.track(0, G)[0])
    real, calls = os.pwrite, []

    def short(fd: int, data: Any, offset: int) -> int:
        calls.append(len(data))
        return real(fd, b"" if len(calls) == 1 else data, offset)  # the first one: nothing in

    monkeypatch.setattr(os, "pwrite", short)
    assert s.track_now(G, G)
    monkeypatch.setattr(os, "pwrite", real)
    assert len(calls) == 2, "the short write was not finished"
    assert on_disk(s) == [(0, 2)]


@pytest.mark.parametrize("rebooted", [False, True])
async def test_reopening_after_a_reboot_adds_every_chunk_of_the_hot_regions(
    hot: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rebooted: bool
) -> None:
    s = hot
    await asyncio.shield(s.track(REGION + G, G)[0])  # region 1 turns hot
    assert s.track_now(REGION + 3 * G, G)
    assert s.tracking_file is not None
    s.tracking_file.close()  # the server dies; the page cache keeps the file as it is
    if rebooted:  # ... or the machine went down too: chunk bits without an fsync may be gone
        monkeypatch.setattr(persist, "boot_id", lambda: b"another boot....")
    again = make_session(tmp_path, "h", GroupCommit(), hot_region=REGION, load=True)
    try:
        expect = [(4, 4)] if rebooted else [(5, 1), (7, 1)]
        assert list(again.tracking.runs()) == expect
        assert on_disk(again) == expect, "what reopening found is not durable in the file"
        assert again.tracking_file is not None and again.tracking_file.hot.is_empty()
    finally:
        assert again.tracking_file is not None
        again.tracking_file.close()


async def test_a_mark_waits_for_the_prepare_a_cancelled_mark_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread writing a save area's space ahead outlives a cancelled mark; it writes at
    fixed offsets, so the next mark must not create the area (and save) before it ends."""
    s = make_session(tmp_path, "s", GroupCommit())
    go, entered, ran = threading.Event(), threading.Event(), []

    def prepare(self: SaveArea) -> None:
        entered.set()
        go.wait(5)
        ran.append(self.path)

    monkeypatch.setattr(SaveArea, "prepare", prepare)
    first = asyncio.ensure_future(s.protector.prepare_save_area())
    await until(entered.is_set, "the first prepare's thread")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    second = asyncio.ensure_future(s.protector.prepare_save_area())
    await asyncio.sleep(0.05)
    assert not second.done(), "the next mark went on while the first prepare still wrote"
    go.set()
    await second
    assert len(ran) == 1, "the space was written ahead twice, at once"
    assert s.tracking_file is not None
    s.tracking_file.close()

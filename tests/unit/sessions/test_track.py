"""Session.track over a group commit: a change waits for the round that makes its bits
durable; a failed round leaves the chunk untracked, and the next change of the chunk
writes its bits again and gets a new round."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deltavol.backend.gate import WriteGate
from deltavol.bitmap import persist
from deltavol.errors import NoSpace
from deltavol.sessions.session import Session
from deltavol.store.group_commit import GroupCommit

G = 4096
SIZE = 64 * G


def make_session(tmp_path: Path, name: str, commit: GroupCommit) -> Session:
    """A session with only what tracking needs: the source is a stand-in with a name and a size."""
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
    )
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
    bm, _ = persist.load(s._tracking_path, persist.KIND_TRACKING, G, SIZE)
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
    assert len(r1) == 1 and r1 == r2 and r1[0] is r2[0]
    await asyncio.shield(r1[0])
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
    assert str(s._tracking_path) in ei.value.message
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
    with pytest.raises(Exception, match=str(s._tracking_path)):
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

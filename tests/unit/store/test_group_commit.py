"""Group commit: one round per burst, newcomers wait for the next round, one sync per file
per round, the files of a round synced in parallel, each file's outcome its own writers',
rounds one after another."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deltavol.store import fs
from deltavol.store.group_commit import THREADS, GroupCommit

WAIT = 10.0  # seconds a test waits on a thread before calling it hung


@dataclass
class Call:
    file: str
    thread: int
    start: float
    end: float = 0.0
    round: int = 0  # the round whose write-out came before this sync


@dataclass
class Journal:
    """What every fake file's sync did, in order of start; and how many ran at once."""

    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    running: int = 0
    most: int = 0
    round: int = 0  # rounds begun so far (``Counted``)


class Counted(GroupCommit):
    """A group commit that numbers its rounds as they begin (``Journal.round``)."""

    def __init__(self, journal: Journal) -> None:
        super().__init__()
        self.journal = journal

    def _start(self) -> None:
        self.journal.round += 1
        super()._start()


class Fake:
    """A Syncable that records its syncs; ``hold`` keeps a sync open until set, ``fail`` makes it raise."""

    def __init__(self, name: str, journal: Journal, hold: threading.Event | None = None) -> None:
        self.name = name
        self.journal = journal
        self.hold = hold
        self.started = threading.Event()
        self.fail: BaseException | None = None
        self.pause = 0.0
        self.writes: list[int] = []  # the thread of each write_out
        self.write_fail: BaseException | None = None
        self.round = 0  # the round of the last write_out

    def write_out(self) -> None:
        self.writes.append(threading.get_ident())
        self.round = self.journal.round
        if self.write_fail is not None:
            raise self.write_fail

    def sync(self) -> None:
        j = self.journal
        call = Call(self.name, threading.get_ident(), time.monotonic(), round=self.round)
        with j.lock:
            j.calls.append(call)
            j.running += 1
            j.most = max(j.most, j.running)
        self.started.set()
        try:
            if self.hold is not None:
                assert self.hold.wait(WAIT), f"{self.name}: never released"
            if self.pause:
                time.sleep(self.pause)
            if self.fail is not None:
                raise self.fail
        finally:
            call.end = time.monotonic()
            with j.lock:
                j.running -= 1

    def syncs(self) -> int:
        return sum(c.file == self.name for c in self.journal.calls)


async def started(fake: Fake) -> None:
    assert await asyncio.to_thread(fake.started.wait, WAIT), f"{fake.name}: its sync never started"


async def test_the_writers_of_one_loop_turn_share_one_round() -> None:
    journal = Journal()
    gc = Counted(journal)
    files = [Fake(f"f{i}", journal) for i in range(20)]
    futs = [gc.round(f) for f in files]
    assert len({id(f) for f in futs}) == 20, "a file's writers share its future, no other file's"
    assert all(gc.round(f) is fut for f, fut in zip(files, futs, strict=True))
    assert not journal.calls  # the round starts on the next turn, not in round()
    await asyncio.gather(*(asyncio.shield(f) for f in futs))
    assert sorted(c.file for c in journal.calls) == sorted(f.name for f in files)
    assert {c.round for c in journal.calls} == {1} and journal.round == 1, "one round"
    assert threading.get_ident() not in {c.thread for c in journal.calls}, "sync ran on the loop"


async def test_the_files_of_a_round_sync_at_the_same_time() -> None:
    journal, hold = Journal(), threading.Event()
    gc = Counted(journal)
    files = [Fake(f"f{i}", journal, hold=hold) for i in range(4)]
    futs = [gc.round(f) for f in files]
    try:
        for f in files:  # every sync begins while all of them are held open
            await started(f)
    finally:
        hold.set()
    await asyncio.gather(*(asyncio.shield(f) for f in futs))
    assert journal.most == 4, f"{journal.most} of the 4 syncs of one round ran at once"
    assert len({c.thread for c in journal.calls}) == 4 and journal.round == 1


async def test_a_files_writers_resume_when_its_own_sync_ends_not_the_rounds_others() -> None:
    journal, hold_b = Journal(), threading.Event()
    gc = Counted(journal)
    a, b = Fake("a", journal), Fake("b", journal, hold=hold_b)
    ra, rb = gc.round(a), gc.round(b)
    mine_a, mine_b = gc.wait(ra), gc.wait(rb)
    try:
        await asyncio.wait_for(mine_a, WAIT)  # a's writers: a synced, b still syncing
        assert a.syncs() == 1 and not rb.done() and not mine_b.done()
        again = gc.round(a)  # written again: the next round, which waits for b's sync to end
        assert again is not ra
    finally:
        hold_b.set()
    await asyncio.wait_for(mine_b, WAIT)
    await asyncio.wait_for(gc.wait(again), WAIT)
    assert a.syncs() == 2 and journal.round == 2
    b_call = next(c for c in journal.calls if c.file == "b")
    a_again = [c for c in journal.calls if c.file == "a"][1]
    assert a_again.start >= b_call.end, "a synced again while the round before still ran"


async def test_writer_tasks_started_together_share_one_round() -> None:
    journal = Journal()
    gc = GroupCommit()
    files = [Fake(f"f{i}", journal) for i in range(10)]
    got: list[asyncio.Future[None]] = []

    async def writer(f: Fake) -> None:
        fut = gc.round(f)
        got.append(fut)
        await asyncio.shield(fut)

    await asyncio.gather(*(writer(f) for f in files))
    assert len({id(f) for f in got}) == 10
    assert len(journal.calls) == 10 and all(f.syncs() == 1 for f in files)


async def test_one_round_syncs_each_registered_file_once() -> None:
    journal = Journal()
    gc = GroupCommit()
    a, b, c = (Fake(n, journal) for n in "abc")
    futs = [gc.round(f) for f in (a, b, a, c, b, a)]
    assert futs[0] is futs[2] is futs[5] and futs[1] is futs[4] and len({id(f) for f in futs}) == 3
    await asyncio.gather(*(asyncio.shield(f) for f in futs))
    assert (a.syncs(), b.syncs(), c.syncs()) == (1, 1, 1)
    assert len(journal.calls) == 3


async def test_files_registered_during_a_round_wait_for_the_next_one() -> None:
    journal = Journal()
    gc = GroupCommit()
    first, second = threading.Event(), threading.Event()
    a = Fake("a", journal, hold=first)
    b = Fake("b", journal)
    try:
        r1 = gc.round(a)
        await started(a)  # round 1 is running, held open in a.sync

        b.hold = second  # round 2 will be held too, to look at it while it runs
        r2 = gc.round(b)
        r2_a = gc.round(a)  # a written again after round 1 began: round 1 does not cover it
        assert r2 is not r1 and r2_a is not r1 and r2_a is gc.round(a)
        assert not r1.done() and not r2.done() and not r2_a.done()
        assert b.syncs() == 0, "b synced by a round that began before b registered"

        first.set()
        await asyncio.shield(r1)
        assert not r2.done(), "a writer of round 2 released by round 1"
        await started(b)  # round 2 began by itself once round 1 finished
        assert not r2.done()
        second.set()
        await asyncio.gather(asyncio.shield(r2), asyncio.shield(r2_a))
        assert [c.file for c in journal.calls[:1]] == ["a"]
        assert sorted(c.file for c in journal.calls[1:]) == ["a", "b"]
        b_call = next(c for c in journal.calls if c.file == "b")
        assert b_call.start >= journal.calls[0].end, "round 2 overlapped round 1"
    finally:  # no sync left blocked in a worker thread if an assertion failed
        first.set()
        second.set()


async def test_a_failed_sync_fails_exactly_its_files_writers_and_the_next_round_works() -> None:
    journal = Journal()
    gc = GroupCommit()
    a, b, c = Fake("a", journal), Fake("b", journal), Fake("c", journal)
    boom = OSError(5, "Input/output error")
    a.fail = boom

    async def writer(f: Fake) -> None:
        await gc.wait(gc.round(f))

    results = await asyncio.gather(*(writer(f) for f in (b, a, c, b, a)), return_exceptions=True)
    assert results == [None, boom, None, None, boom] and results[1] is boom
    assert (a.syncs(), b.syncs(), c.syncs()) == (1, 1, 1)

    a.fail = None
    before = len(journal.calls)
    fut = gc.round(a)
    fut_b = gc.round(b)
    assert not fut.done() and not fut_b.done()
    await asyncio.wait_for(asyncio.gather(gc.wait(fut), gc.wait(fut_b)), WAIT)
    assert fut.exception() is None
    assert sorted(c.file for c in journal.calls[before:]) == ["a", "b"]


async def test_a_round_writes_each_file_out_once_on_the_loop_before_its_sync() -> None:
    journal = Journal()
    gc = GroupCommit()
    a, b = Fake("a", journal), Fake("b", journal)
    futs = [gc.round(f) for f in (a, b, a, a)]
    assert not a.writes, "written out in round(), not when the round begins"
    await asyncio.gather(*(asyncio.shield(f) for f in futs))
    assert a.writes == [threading.get_ident()] and b.writes == [threading.get_ident()]
    assert (a.syncs(), b.syncs()) == (1, 1)


async def test_a_failed_write_out_fails_its_file_unsynced_and_the_next_round_works() -> None:
    journal = Journal()
    gc = GroupCommit()
    a, b = Fake("a", journal), Fake("b", journal)
    full = OSError(28, "No space left on device")
    b.write_fail = full
    results = await asyncio.gather(*(asyncio.shield(gc.round(f)) for f in (a, b)), return_exceptions=True)
    assert results == [None, full], "a file of the round failed another's writers"
    assert [c.file for c in journal.calls] == ["a"], "a file whose write failed was synced"
    b.write_fail = None
    await asyncio.wait_for(asyncio.shield(gc.round(b)), WAIT)
    assert b.syncs() == 1 and len(b.writes) == 2


async def test_a_failure_while_others_wait_for_the_next_round_fails_only_its_own_round() -> None:
    journal = Journal()
    gc = GroupCommit()
    hold = threading.Event()
    a, b = Fake("a", journal, hold=hold), Fake("b", journal)
    a.fail = OSError(28, "No space left on device")
    r1 = gc.round(a)
    try:
        await started(a)
        r2 = gc.round(b)
    finally:
        hold.set()
    with pytest.raises(OSError) as ei:
        await asyncio.shield(r1)
    assert ei.value is a.fail
    await asyncio.wait_for(asyncio.shield(r2), WAIT)  # round 2 still runs, and succeeds
    assert b.syncs() == 1


async def test_rounds_never_overlap() -> None:
    journal = Journal()
    gc = Counted(journal)
    files = [Fake(f"f{i}", journal) for i in range(8)]
    for f in files:
        f.pause = 0.002  # long enough for writers to pile up behind a running round
    rounds: list[asyncio.Future[None]] = []

    async def writer(i: int) -> None:
        for n in range(6):
            await asyncio.sleep(0.001 * ((i * 7 + n * 3) % 5))
            fut = gc.round(files[(i + n) % len(files)])
            if not any(r is fut for r in rounds):
                rounds.append(fut)
            await asyncio.shield(fut)

    await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(16))), 60)
    calls = sorted(journal.calls, key=lambda c: c.start)
    for prev, nxt in itertools.combinations(calls, 2):  # (in order of start)
        if nxt.round != prev.round:  # only the syncs of one round run at once
            assert nxt.start >= prev.end, f"{nxt.file} of round {nxt.round} began before {prev.file} ended"
    assert [c.round for c in calls] == sorted(c.round for c in calls)
    for f in files:
        rounds_of_f = {c.round for c in journal.calls if c.file == f.name}
        assert len(rounds_of_f) == f.syncs(), f"{f.name} synced twice in one round"
    assert len(rounds) > 1 and journal.most > 1  # the test did see several rounds, and parallel syncs


async def test_a_writer_cancelled_while_it_waits_cancels_no_other_writer_nor_the_round() -> None:
    gc, hold = GroupCommit(), threading.Event()
    a = Fake("a", Journal(), hold=hold)
    r = gc.round(a)
    mine, other = gc.wait(r), gc.wait(r)
    try:
        await started(a)
        mine.cancel()
    finally:
        hold.set()
    await asyncio.wait_for(other, WAIT)
    assert mine.cancelled() and not r.cancelled() and r.exception() is None


async def test_a_writer_resumes_in_the_turn_its_rounds_callbacks_run_and_after_them() -> None:
    """A protected write waits for this: ``asyncio.shield`` would cost a turn more."""
    loop, gc = asyncio.get_running_loop(), GroupCommit()
    turns = 0

    def tick() -> None:
        nonlocal turns, ticker
        turns += 1
        ticker = loop.call_soon(tick)

    ticker = loop.call_soon(tick)
    r = gc.round(Fake("a", Journal()))
    seen: list[int] = []
    r.add_done_callback(lambda _f: seen.append(turns))
    try:
        await gc.wait(r)  # no wait_for: it would add turns of its own
        resumed = turns
    finally:
        ticker.cancel()
    assert seen, "the writer resumed before the round's callbacks ran"
    assert resumed == seen[0], f"the writer resumed {resumed - seen[0]} turn(s) after the round's callbacks"


async def test_waiting_for_a_round_of_another_group_commit_is_refused() -> None:
    mine, other = GroupCommit(), GroupCommit()
    r = other.round(Fake("a", Journal()))
    with pytest.raises(ValueError):
        mine.wait(r)
    await asyncio.wait_for(other.wait(r), WAIT)
    assert mine.wait(r).done(), "a round that is over: its outcome at once"


class StallingFS(fs.RealFS):
    """The real file calls, but an fdatasync of a file on the ``stalled`` disk (by fd)
    hangs until ``release`` is set."""

    def __init__(self) -> None:
        self.stalled: set[int] = set()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.stalls: dict[int, int] = {}  # fd -> its fdatasyncs hanging now
        self.begun = threading.Condition(self.lock)

    def fdatasync(self, fd: int) -> None:
        if fd in self.stalled:
            with self.begun:
                self.stalls[fd] = self.stalls.get(fd, 0) + 1
                self.begun.notify_all()
            try:
                assert self.release.wait(3 * WAIT), "a stalled fdatasync never released"
            finally:
                with self.lock:
                    self.stalls[fd] -= 1
        super().fdatasync(fd)

    def wait_stalls(self, n: int) -> bool:
        with self.begun:
            return self.begun.wait_for(lambda: sum(self.stalls.values()) >= n, WAIT)


class RealFile:
    """A Syncable over a real file, through the ``store/fs.py`` seam."""

    def __init__(self, path: Path) -> None:
        self.fd = fs.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.data = b""

    def write_out(self) -> None:
        fs.pwrite(self.fd, self.data, 0)

    def sync(self) -> None:
        fs.fdatasync(self.fd)


async def test_a_group_commit_whose_syncs_stall_holds_no_other_group_commits_round(tmp_path: Path) -> None:
    """A stalled bitmaps disk with the tracking files of 20 sessions on 4 sources (4 group
    commits): each holds at most ``THREADS`` threads, the rest of its files waiting for
    them; a save area's round on a healthy disk (another group commit) still ends at once."""
    stalling = StallingFS()
    old = fs.use(stalling)
    files: list[RealFile] = []
    waiting: list[asyncio.Future[None]] = []
    try:
        tracking = [GroupCommit() for _ in range(4)]
        stalled = [(tracking[i % 4], RealFile(tmp_path / f"t{i}")) for i in range(20)]
        files += [f for _, f in stalled]
        stalling.stalled |= {f.fd for f in files}
        for _, f in stalled:
            f.data = b"tracked"
        rounds = [gc.wait(gc.round(f)) for gc, f in stalled]
        waiting += [asyncio.ensure_future(r) for r in rounds]
        assert await asyncio.to_thread(stalling.wait_stalls, 4 * THREADS), "the stalled syncs never began"

        save = GroupCommit()
        area = RealFile(tmp_path / "save")
        files.append(area)
        area.data = b"old contents"
        try:
            await asyncio.wait_for(save.wait(save.round(area)), WAIT)
        except TimeoutError:
            pytest.fail("the save area's round queued behind the stalled disk's syncs")
        assert os.pread(area.fd, 12, 0) == b"old contents"
        with stalling.lock:
            per_fd = dict(stalling.stalls)
        hanging = sum(per_fd.values())
        assert hanging == 4 * THREADS, f"{hanging} stalled syncs at once, not {THREADS} per group commit"
        for gc in tracking:
            mine = sum(per_fd.get(f.fd, 0) for g, f in stalled if g is gc)
            assert mine == THREADS, f"a group commit ran {mine} syncs at once"
        assert not any(w.done() for w in waiting)
    finally:
        stalling.release.set()
        fs.use(old)
    await asyncio.wait_for(asyncio.gather(*waiting), WAIT)  # the rest synced as threads freed up
    for f in files:
        os.close(f.fd)

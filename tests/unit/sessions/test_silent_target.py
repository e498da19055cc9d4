"""A target that fails or stops answering never hangs the server nor fails the source's writes.

With the save area full, copy-on-first-write falls back to copy-before-write: a client's
write to a chunk the update still owes first puts the chunk's old contents on the target.
That write holds the source's write gate, so a mark of any session on the source, and every
write behind it, waits for it too. So:

* a target that stays silent is given ``target_timeout``; then, as when it cannot be reached
  at all, the update gives up its point in time instead of the client's write: protection
  stops, the session row says so before the write goes down, and the update goes on as of a
  new mark (what it owed and what changed since its mark), at once if it is copying, else
  on resume, retry or restart -- never finishing the old mark, whose old contents are gone;
* pause and shutdown flush the target, waiting at most ``target_timeout``.

Real Session, save area, tracking file, write gate and filters; fakes for the source's disk
and the target.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from deltavol.backend.gate import GateLayer
from deltavol.backend.hooks import BeforeChange
from deltavol.bitmap import persist
from deltavol.errors import TargetError
from deltavol.sessions.manager import _SourceWiring
from deltavol.sessions.session import RetryPolicy, Session, UpdateRecord
from deltavol.sessions.states import State
from tests import fakes
from tests.fakes import until

G = 4096
N = 32
SIZE = N * G
TIMEOUT = 0.3  # the sessions' target_timeout
WAIT = 10.0  # what a test waits for an outcome before it fails, rather than hanging

OLD = b"".join(bytes([c + 1]) * G for c in range(N))  # the source, and the target, at t0
CHANGED = range(0, 8)  # chunks changed after t0: the next update owes them


def fill(tag: int) -> bytes:
    return bytes([tag]) * G


class Disk(fakes.Disk):
    """The source volume's bottom backend; ``landed`` has, for each change that went down,
    its chunk and what the committed session row said then (``row_at``)."""

    def __init__(self) -> None:
        super().__init__(SIZE, OLD)
        self.row_at: Callable[[], Any] = lambda: None

    def landing(self, offset: int, length: int) -> tuple[int, Any]:
        return (offset // G, self.row_at())


class Target:
    """The remote copy: ``silent`` never answers (a hung server, a blackholed link),
    ``down`` refuses connections, ``go`` cleared holds answers back (a slow one). Writes
    land in a cache that ``flush`` makes durable; ``crash`` loses what was not flushed."""

    description = "fake remote"
    size = SIZE
    request_size = 2 * G
    inflight = 2

    def __init__(self) -> None:
        self.data = bytearray(OLD)
        self.durable = bytearray(OLD)
        self.silent = False
        self.down = False
        self.go = asyncio.Event()
        self.go.set()
        self.writes = 0
        self.asked = 0  # requests received, answered or not
        self.crash_after: int | None = None  # writes

    def crash(self) -> None:
        self.data[:] = self.durable
        self.down = True

    async def _answer(self) -> None:
        self.asked += 1
        await asyncio.sleep(0)
        if self.silent:
            await asyncio.Event().wait()
        await self.go.wait()
        if self.down:
            raise TargetError(msg="target: connection lost")

    async def pwrite(self, offset: int, data: bytes) -> None:
        await self._answer()
        if self.writes == self.crash_after:
            self.crash()
            raise TargetError(msg="target: connection lost")
        self.data[offset : offset + len(data)] = data
        self.writes += 1

    async def zero(self, offset: int, length: int) -> bool:
        await self.pwrite(offset, bytes(length))
        return True

    async def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    async def flush(self) -> None:
        await self._answer()
        self.durable[:] = self.data

    async def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class Rows:
    """The session row as SQLite holds it once committed."""

    def __init__(self) -> None:
        self.row: dict[str, Any] = {}

    def __call__(self, s: Session) -> None:
        self.row = dict(
            state=s.state,
            consistent=s.consistent,
            point_in_time=s.point_in_time,
            last_error=s.last_error,
            next_update_id=s.next_update_id,
            update=json.loads(json.dumps(asdict(s.update))) if s.update else None,
        )

    def remark(self) -> str | None:
        update = self.row.get("update")
        return update["remark"] if update else None


class Rig:
    """Sessions on one source, wired as the session manager wires them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.disk = Disk()
        self.wiring = _SourceWiring()
        self.stack = GateLayer(BeforeChange(self.disk, self.wiring.hooks, self.wiring.gate), self.wiring.gate)  # type: ignore[arg-type]
        self.sessions: list[Session] = []

    def session(
        self, name: str, target: Target, rows: Rows, save_limit: int = 0, row: dict[str, Any] | None = None
    ) -> Session:
        """A session consistent as of t0; or, with ``row``, one reloaded from that row after a
        restart (``SessionManager.load``)."""

        async def open_target(_s: Session) -> Target:
            if target.down:
                raise TargetError(msg=f"target nbd://dr/{name}: connection refused")
            return target

        s = Session(
            name=name,
            source=SimpleNamespace(name="src", size=SIZE, backend=self.disk),  # type: ignore[arg-type]
            target_spec=f"nbd://dr/{name}",
            granularity=G,
            files=self.tmp_path,
            save_dir=self.tmp_path,
            gate=self.wiring.gate,
            commit=self.wiring.commit,
            open_target=open_target,
            persist_row=rows,
            hot_region=G,
            save_limit=save_limit,
            retry=RetryPolicy(limit=0),
            target_timeout=TIMEOUT,
        )
        if row is None:
            s.create_files()
            s.state, s.consistent, s.point_in_time, s.next_update_id = State.IDLE, True, "t0", 2
        else:
            s.state, s.consistent, s.point_in_time = row["state"], row["consistent"], row["point_in_time"]
            s.last_error, s.next_update_id = row["last_error"], row["next_update_id"]
            s.update = UpdateRecord(**row["update"])
            s.load_files()
        self.sessions.append(s)
        self.wiring.sessions.append(s)
        self.wiring.rehook()
        return s

    def change_before_mark(self, s: Session, chunks: range, tag: int) -> None:
        """Chunks written (and tracked) before the next mark."""
        for c in chunks:
            self.disk.data[c * G : (c + 1) * G] = fill(tag)
        s.tracking.set_range(chunks.start * G, len(chunks) * G)
        s._rewrite_tracking()

    async def write(self, c: int, tag: int) -> None:
        """A client's write of chunk ``c``, down the source's filters."""
        async with asyncio.timeout(WAIT):
            await self.stack.pwrite(c * G, fill(tag))

    def crash(self) -> None:
        """The process dies: tasks stop, files stay as they are."""
        for s in self.sessions:
            for task in (s._task, s._retry_task):
                if task is not None:
                    task.cancel()
            if s.tracking_file is not None:
                s.tracking_file.close()
            if s.save is not None:
                s.save.close()
        self.sessions.clear()
        self.wiring.sessions.clear()
        self.wiring.rehook()


async def finished(s: Session) -> None:
    async with asyncio.timeout(WAIT):
        await s.wait()
    assert s.state is State.IDLE, s.last_error


async def test_a_silent_target_costs_a_write_its_wait_and_the_update_its_mark_not_the_source_its_writes(
    rig: Rig,
) -> None:
    target, rows = Target(), Rows()
    s1 = rig.session("s1", target, rows)  # no room in its save area: copy-before-write
    s2 = rig.session("s2", Target(), Rows(), save_limit=1 << 20)
    rig.change_before_mark(s1, CHANGED, 0xA1)
    rig.disk.row_at = rows.remark
    target.silent = True
    await s1.start_update(False)
    marked_at = s1.update and s1.update.marked_at
    loop = asyncio.get_running_loop()
    began = loop.time()
    owed = asyncio.create_task(rig.write(3, 0xB1))  # owed by s1: its old contents go to the target first
    await until(lambda: not rig.wiring.gate.open or owed.done() or s1.locks.any_held([3]))
    s2.tracking.set_range(20 * G, G)
    mark = asyncio.create_task(s2.start_update(False))  # closes the source's write gate
    other = asyncio.create_task(rig.write(30, 0xB2))  # behind the closed gate
    await owed
    assert loop.time() - began < TIMEOUT + 2, "the write waited for the target for longer than its timeout"
    async with asyncio.timeout(WAIT):
        await mark
        await other
    assert rig.disk.data[3 * G : 4 * G] == fill(0xB1) and rig.disk.data[30 * G : 31 * G] == fill(0xB2)
    # the update gave up its point in time, durably, before the write went down
    assert s1.update is not None and not s1.update.protecting
    remark = s1.update.remark
    assert remark is not None and "did not answer" in remark and s1.target_spec in remark
    assert (3, remark) in rig.disk.landed
    assert s1.last_error is not None and "new mark" in s1.last_error
    assert s1.status()["update"]["remark"] == remark
    assert s1.update.marked_at == marked_at
    # a client's next write to an owed chunk does not ask the target at all
    asked = target.asked
    await rig.write(4, 0xB3)
    assert target.asked == asked and rig.disk.data[4 * G : 5 * G] == fill(0xB3)
    async with asyncio.timeout(WAIT):  # and pause does not hang on the silent target
        st = await s1.pause()
    assert st["state"] == "paused"


async def test_shutdown_does_not_hang_on_a_silent_target(rig: Rig) -> None:
    target = Target()
    s = rig.session("s", target, Rows(), save_limit=1 << 20)
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.silent = True
    await s.start_update(False)
    await until(lambda: s.target is not None)
    async with asyncio.timeout(WAIT):
        await s.shutdown()
    assert s.state is State.COPYING  # kept for the next start
    assert s.files.transfer_path.exists()


async def given_up_while_failed(rig: Rig, target: Target, rows: Rows) -> tuple[Session, str]:
    """The update failed (its target went down, no retries left) and its save area is full:
    the production volume keeps being written. Returns the session and its given-up mark."""
    s = rig.session("s", target, rows, save_limit=2 * G)  # room for one saved chunk
    rig.change_before_mark(s, CHANGED, 0xA1)
    rig.disk.row_at = rows.remark
    target.down = True
    await s.start_update(False)
    assert s.update is not None and s.update.marked_at is not None
    marked_at = s.update.marked_at
    async with asyncio.timeout(WAIT):
        await s.wait()
    assert s.state is State.FAILED
    for c in range(4, 8):
        await rig.write(c, 0xC0 + c)  # each one succeeds
    assert s.update.remark is not None and "connection refused" in s.update.remark
    assert not s.update.protecting
    saved, given_up = rig.disk.landed[0], rig.disk.landed[1]
    assert saved == (4, None)  # saved first: the mark still held
    assert given_up == (5, s.update.remark), "the write went down before the row gave the mark up"
    assert rows.remark() == s.update.remark and rows.row["state"] is State.FAILED
    return s, marked_at


async def test_target_down_and_save_area_full_give_up_the_mark_and_resume_re_marks(rig: Rig) -> None:
    target, rows = Target(), Rows()
    s, marked_at = await given_up_while_failed(rig, target, rows)
    target.down = False
    await s.resume()
    await finished(s)
    assert s.update is not None and s.update.marked_at != marked_at and s.point_in_time == s.update.marked_at
    assert s.consistent and s.update.protecting
    assert target.data == rig.disk.data, "the target is not the source as of the new mark"
    assert s.transfer is None and s.tracking.is_empty()


async def test_a_restart_after_the_write_does_not_finish_the_given_up_mark(rig: Rig) -> None:
    target, rows = Target(), Rows()
    s, marked_at = await given_up_while_failed(rig, target, rows)
    rig.crash()  # right after the writes
    target.down = False
    s = rig.session("s", target, rows, save_limit=2 * G, row=rows.row)
    assert s.update is not None and s.update.remark is not None
    await s.resume()
    await finished(s)
    assert s.update.marked_at != marked_at and s.point_in_time == s.update.marked_at
    assert target.data == rig.disk.data


async def test_a_restart_of_a_copying_update_whose_mark_was_given_up_re_marks(rig: Rig) -> None:
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows)
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.silent = True
    await s.start_update(False)
    assert s.update is not None
    marked_at = s.update.marked_at
    await rig.write(2, 0xD2)  # copy-before-write: no answer, the mark is given up
    assert rows.remark() is not None and rows.row["state"] is State.COPYING
    rig.crash()
    target.silent = False
    s = rig.session("s", target, rows, row=rows.row)
    s._spawn()  # SessionManager.start: an interrupted update resumes by itself
    await finished(s)
    assert s.update is not None and s.update.marked_at != marked_at
    assert target.data == rig.disk.data
    assert target.data[2 * G : 3 * G] == fill(0xD2), "chunk 2 was copied as of the given-up mark"


async def test_a_mark_given_up_while_the_copy_goes_on_is_not_finished(rig: Rig) -> None:
    """The target is slow, not dead: the write gives up waiting, the copy goes on and ends
    with a new mark (and a copy as of it), not with the old one."""
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows)
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.go.clear()
    await s.start_update(False)
    assert s.update is not None
    marked_at = s.update.marked_at
    await rig.write(6, 0xE6)  # no answer within the timeout
    assert s.update.remark is not None and s.state is State.COPYING
    target.go.set()  # the copy goes on
    await finished(s)
    assert s.update.marked_at != marked_at and s.point_in_time == s.update.marked_at
    assert s.last_error is None and s.update.remark is not None  # done; and why it re-marked
    assert target.data == rig.disk.data
    assert s.transfer is None


async def test_a_re_mark_copies_again_what_no_checkpoint_recorded_as_copied(rig: Rig) -> None:
    """Chunks copied but not flushed when the target went down are owed again after the
    re-mark, although they have not changed since."""
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows, save_limit=2 * G)
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.crash_after = 2  # two requests of two chunks reach its cache, then it loses them
    await s.start_update(False)
    async with asyncio.timeout(WAIT):
        await s.wait()
    assert s.state is State.FAILED and s.transfer is not None
    assert target.writes == 2, "the copy did not get as far as planned"
    assert all(s.transfer.test(c) for c in range(4)), "unflushed chunks not owed after the failure"
    for c in (4, 5):
        await rig.write(c, 0xC0 + c)  # the second one gives the mark up
    assert s.update is not None and s.update.remark is not None
    target.down, target.crash_after = False, None
    await s.resume()
    await finished(s)
    assert target.durable == rig.disk.data, "chunks copied before the target lost them were not copied again"


async def test_a_restart_after_a_given_up_mark_keeps_the_chunks_its_save_records_hold(rig: Rig) -> None:
    """A chunk saved, then copied and checkpointed, is owed again only by its tracking bit,
    which its save record made durable: after a power loss the bit may be gone from the
    tracking file, and the save area is what says the chunk changed."""
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows, save_limit=1 << 20)
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.go.clear()  # the copy waits
    await s.start_update(False)
    await rig.write(1, 0xF1)  # saved: its record stands for its tracking bit
    assert s.save is not None and 1 in s.save
    assert s.update is not None and s.transfer is not None and s.copier.durable is not None
    # chunk 1 was copied (as of the mark) and a checkpoint recorded it; the power loss then
    # takes its tracking bit from the file, which only the record made durable
    s.transfer.clear(1)
    s.copier.durable.clear(1)
    persist.write_bits_in_place(s.files.transfer_path, s.copier.durable)
    target.data[G : 2 * G] = target.durable[G : 2 * G] = fill(0xA1)
    s.tracking.clear(1)
    s._rewrite_tracking()
    s._give_up_mark(s.update, "copy-before-write of chunk 2: no answer")
    rig.crash()
    target.go.set()
    s = rig.session("s", target, rows, save_limit=1 << 20, row=rows.row)
    assert s.tracking.test(1), "the saved chunk is not tracked after the restart"
    s._spawn()
    await finished(s)
    assert target.durable == rig.disk.data

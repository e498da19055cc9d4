"""A simulated disk, event loop and remote target for the deterministic simulation.

Design notes
------------
* ``SimFS`` implements ``deltavol.store.fs.FileSystem`` in memory. Each file (inode) has
  its page-cache contents and its durable contents, and a log of the writes and
  truncations since its last fsync/fdatasync. Names live in directories whose creates,
  renames and unlinks are durable only after ``sync_dir`` of that directory. A power loss
  (``power_loss``) keeps, per file, any subset of the logged writes in their order, each
  possibly torn at sector (512-byte) granularity, and per directory a prefix of its
  pending name changes (a journaled file system commits them in order); a new boot id
  follows. A ``kill`` (kill -9) keeps the page cache. An fsync that fails with EIO drops
  the logged writes as the kernel does (the pages are marked clean, not written): a later
  fsync succeeds without them.
* Each inode knows which 4 KiB blocks are allocated (written, or zeroed in place) and
  which are holes (never written, punched, cut off by a truncation), in the page cache and
  on the disk, with the same log: ``lseek`` answers SEEK_DATA / SEEK_HOLE from it, and a
  power cut keeps a punch whole or not at all, a write's blocks with the sectors that
  reached the disk.
* Thread hand-offs (``to_thread``, ``run_in_pool``, ``submit``) run the blocking function
  on the loop after a delay the seeded random source chooses, even if the waiter was
  cancelled (a thread cannot be stopped): this is how the simulation decides when each
  piece of I/O completes relative to the rest. The function runs in a worker thread that
  takes turns with the loop (exactly one of them runs at a time, so a seed still replays;
  only a hand-off that may reach the kernel copy, the others run on the loop):
  ``copy_file_range`` called there copies one piece (a sector to a few blocks) per call
  and then parks the worker for a delay, as the kernel copies page by page: the loop runs
  meanwhile, and a write to either file can land between two pieces. A process that dies
  kills its parked workers (the rest of their copy never happens); a clean stop lets them
  finish.
* ``SimLoop`` runs on virtual time: when nothing is ready it jumps to the next timer. It
  keeps asyncio's one ordering promise (callbacks run in the order they were scheduled);
  what it varies is what varies in the real world: when I/O completes, when timers fire
  relative to I/O, when clients and operators act.
* Every mutating call counts towards ``crash_at``: when the count is reached, the call
  raises ``Halt`` (a ``SystemExit``, so no ``except Exception`` of the server swallows it)
  and every later call of that process raises it too: the process is dead at that I/O.
* ``TargetHost`` is a remote NBD server's disk with a volatile write cache: a FLUSH makes
  durable the writes that completed before it was sent; a crash keeps of the others any
  subset, torn at sector size. ``SimTarget`` is one connection to it: requests complete
  after random delays (so out of order), fail while the host is down or after it crashed
  under them, and stall while it is silent, until the NBD client's deadline (``timeout``)
  fails the request.
"""

from __future__ import annotations

import asyncio
import errno
import os
import selectors
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from random import Random
from types import SimpleNamespace
from typing import Any, TypeVar

from deltavol.errors import TargetError

T = TypeVar("T")
SECTOR = 512
FD_BASE = 1 << 20  # far above any real descriptor: a stray real os.close(fd) fails, harmlessly
BLOCK = 4096  # the file system's block: the unit of allocation, holes and SEEK_DATA/SEEK_HOLE
FALLOC_FL_PUNCH_HOLE = 0x02


class Halt(SystemExit):
    """The simulated process died here (crash or power loss at this I/O)."""


class Deadlock(Exception):
    """Nothing is ready and no timer is due: every task waits for something that never comes."""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0


class _Selector(selectors.SelectSelector):
    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise Deadlock("no task can run and no timer is set")
        if timeout > 0:
            self.clock.now += timeout
        return []


class SimLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        super().__init__(_Selector(clock))

    def time(self) -> float:
        return self.clock.now


class VirtualTime:
    """Stands in for the ``time`` module where the server reads clocks."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def monotonic(self) -> float:
        return self.clock.now

    def perf_counter(self) -> float:
        return self.clock.now

    def time(self) -> float:
        return 1_800_000_000.0 + self.clock.now

    def sleep(self, seconds: float) -> None:
        self.clock.now += seconds


class Inode:
    def __init__(self) -> None:
        self.data = bytearray()  # as the page cache has it
        self.durable = bytearray()
        # ("w", offset, data) | ("t", size, b"") | ("p", offset, zeroes): write, truncate, punch
        self.log: list[tuple[str, int, bytes]] = []
        self.alloc: set[int] = set()  # allocated blocks, as the page cache has them
        self.durable_alloc: set[int] = set()

    def write(self, offset: int, data: bytes) -> None:
        self._do("w", offset, bytes(data))

    def truncate(self, size: int) -> None:
        self._do("t", size, b"")

    def punch(self, offset: int, length: int) -> None:
        """FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: zeroes, and the whole blocks inside
        become holes."""
        length = min(offset + length, len(self.data)) - offset
        if length > 0:
            self._do("p", offset, bytes(length))

    def _do(self, kind: str, offset: int, data: bytes) -> None:
        _apply(self.data, self.alloc, kind, offset, data)
        self.log.append((kind, offset, data))

    def sync(self) -> None:
        """Write back what the log holds (after a failed sync it holds less than ``data``)."""
        for kind, offset, data in self.log:
            _apply(self.durable, self.durable_alloc, kind, offset, data)
        self.log.clear()

    def lose_power(self, rng: Random) -> None:
        out, alloc = bytearray(self.durable), set(self.durable_alloc)
        for kind, offset, data in self.log:
            roll = rng.random()
            if roll < 0.35:
                continue  # never reached the disk
            if kind != "w" or roll >= 0.55:  # a truncation or a punch is whole or nothing
                _apply(out, alloc, kind, offset, data)
                continue
            for lo in range((offset // SECTOR) * SECTOR, offset + len(data), SECTOR):  # torn
                a, b = max(lo, offset), min(lo + SECTOR, offset + len(data))
                if rng.random() < 0.5:
                    _apply(out, alloc, "w", a, data[a - offset : b - offset])
        self.durable, self.durable_alloc = out, alloc
        self.data, self.alloc = bytearray(out), set(alloc)
        self.log.clear()

    def seek(self, pos: int, data: bool) -> int:
        """lseek SEEK_DATA (``data``) or SEEK_HOLE from ``pos``, at block granularity."""
        size = len(self.data)
        if pos >= size or pos < 0:
            raise OSError(errno.ENXIO, "No such device or address")
        b = pos // BLOCK
        if data:
            found = [x for x in self.alloc if x >= b and x * BLOCK < size]
            if not found:
                raise OSError(errno.ENXIO, "No such device or address")
            return max(pos, min(found) * BLOCK)
        while b in self.alloc and b * BLOCK < size:
            b += 1
        return min(max(pos, b * BLOCK), size)


def _apply(buf: bytearray, alloc: set[int], kind: str, offset: int, data: bytes) -> None:
    if kind == "t":
        if offset < len(buf):
            del buf[offset:]
        else:
            buf.extend(bytes(offset - len(buf)))
        alloc.difference_update({b for b in alloc if b * BLOCK >= offset})
        return
    end = offset + len(data)
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    buf[offset:end] = data
    if kind == "w":
        alloc.update(range(offset // BLOCK, (end + BLOCK - 1) // BLOCK))
    else:  # a punch frees the blocks it covers whole
        alloc.difference_update(range((offset + BLOCK - 1) // BLOCK, end // BLOCK))


class SimFS:
    """The simulated disk (see the module notes). One instance outlives every restart."""

    def __init__(self, rng: Random, clock: Clock) -> None:
        self.rng = rng
        self.clock = clock
        self.names: dict[str, Inode] = {}
        self.durable_names: dict[str, Inode] = {}
        self.pending: dict[str, list[tuple[str, str, Inode | None]]] = {}  # dir -> [(op, name, inode)]
        self.fds: dict[int, Inode] = {}
        self._next_fd = FD_BASE
        self.boot = 1
        self.ops = 0  # mutating calls so far (crash points)
        self.crash_at: int | None = None
        self.dead = False
        self.fault: Callable[[str, str], int | None] = lambda op, path: None
        self.io_delay: Callable[[], float] = lambda: 0.0
        self.trace: Callable[[str], None] = lambda what: None
        self._idle: list[_Worker] = []
        self._parked: dict[_Worker, None] = {}  # (in the order they parked)

    # --- process life ----------------------------------------------------------------
    def tick(self, op: str, path: str = "") -> None:
        """A mutating call: maybe the process dies here, maybe the call fails."""
        if self.dead:
            raise Halt(f"dead process did {op} {path}")
        self.ops += 1
        if self.crash_at is not None and self.ops >= self.crash_at:
            self.dead = True
            self.trace(f"crash at I/O #{self.ops}: {op} {path}")
            raise Halt(f"crash at {op} {path}")
        err = self.fault(op, path)
        if err is not None:
            self.trace(f"fault {errno.errorcode[err]} on {op} {path}")
            raise OSError(err, os.strerror(err), path)

    def restart(self) -> None:
        """The process is gone: its descriptors with it, and the rest of its parked copies."""
        self.end_workers(finish=False)
        self.fds.clear()
        self.dead = False
        self.crash_at = None

    def power_loss(self) -> None:
        for inode in {id(i): i for i in [*self.names.values(), *self.durable_names.values()]}.values():
            inode.lose_power(self.rng)
        for ops in self.pending.values():
            keep = self.rng.randint(0, len(ops))
            self._apply(self.durable_names, ops[:keep])
        self.pending.clear()
        self.names = dict(self.durable_names)
        self.boot += 1
        self.restart()

    @staticmethod
    def _apply(names: dict[str, Inode], ops: list[tuple[str, str, Inode | None]]) -> None:
        for op, name, inode in ops:
            if op == "link":
                assert inode is not None
                names[name] = inode
            else:
                names.pop(name, None)

    def _ns(self, op: str, name: str, inode: Inode | None) -> None:
        if op == "link":
            assert inode is not None
            self.names[name] = inode
        else:
            self.names.pop(name, None)
        self.pending.setdefault(str(Path(name).parent), []).append((op, name, inode))

    def view(self, path: str | Path) -> bytes:
        """What the page cache holds now (for the checks, not the server)."""
        inode = self.names.get(str(path))
        return bytes(inode.data) if inode is not None else b""

    # --- the FileSystem calls -------------------------------------------------------------
    def _inode(self, fd: int) -> Inode:
        if self.dead:
            raise Halt("dead process")
        try:
            return self.fds[fd]
        except KeyError:
            raise OSError(errno.EBADF, "bad file descriptor") from None

    def open(self, path: str | Path, flags: int, mode: int = 0o777) -> int:
        name = str(path)
        self.tick("open", name)
        inode = self.names.get(name)
        if inode is None:
            if not flags & os.O_CREAT:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", name)
            inode = Inode()
            self._ns("link", name, inode)
        elif flags & os.O_CREAT and flags & os.O_EXCL:
            raise FileExistsError(errno.EEXIST, "File exists", name)
        if flags & os.O_TRUNC:
            inode.truncate(0)
        fd = self._next_fd
        self._next_fd += 1
        self.fds[fd] = inode
        return fd

    def close(self, fd: int) -> None:
        if not self.dead:
            self.fds.pop(fd, None)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        return bytes(self._inode(fd).data[offset : offset + length])

    def preadv(self, fd: int, buffers: list[bytearray], offset: int, flags: int = 0) -> int:
        data, n = self._inode(fd).data, 0
        for buf in buffers:
            got = data[offset + n : offset + n + len(buf)]
            buf[: len(got)] = got
            n += len(got)
            if len(got) < len(buf):
                break
        return n

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        inode = self._inode(fd)
        self.tick("pwrite", self._name(inode))
        inode.write(offset, bytes(data))
        return len(data)

    def copy_file_range(self, src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int:
        """One piece of the copy (a short count, as the kernel may return), then, in a
        worker, a pause in which the loop runs (see the module notes)."""
        worker: _Worker | None = getattr(_local, "worker", None)
        piece = self.rng.choice((SECTOR, BLOCK, 2 * BLOCK, 4 * BLOCK)) if worker is not None else count
        data = self.pread(src, min(count, piece), src_offset)
        if not data:
            return 0
        inode = self._inode(dst)
        self.tick("copy_file_range", self._name(inode))
        inode.write(dst_offset, data)
        if worker is not None and len(data) < count:
            worker.park()
        return len(data)

    def _name(self, inode: Inode) -> str:
        return next((n for n, i in self.names.items() if i is inode), "?")

    def fsync(self, fd: int) -> None:
        self._sync(fd, "fsync")

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, "fdatasync")

    def _sync(self, fd: int, op: str) -> None:
        inode = self._inode(fd)
        try:
            self.tick(op, self._name(inode))
        except OSError as exc:
            if exc.errno == errno.EIO:  # the kernel marks the pages clean: they never get written
                inode.log.clear()
            raise
        inode.sync()

    def ftruncate(self, fd: int, length: int) -> None:
        inode = self._inode(fd)
        self.tick("ftruncate", self._name(inode))
        inode.truncate(length)

    def fstat(self, fd: int) -> Any:
        inode = self._inode(fd)
        return SimpleNamespace(
            st_size=len(inode.data), st_mode=stat.S_IFREG | 0o600, st_blocks=len(inode.data) // 512
        )

    def fstatvfs(self, fd: int) -> Any:
        self._inode(fd)
        return SimpleNamespace(f_bavail=1 << 20, f_frsize=4096)

    def lseek(self, fd: int, pos: int, how: int) -> int:
        inode = self._inode(fd)
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            return inode.seek(pos, how == os.SEEK_DATA)
        raise OSError(errno.EINVAL, "lseek")

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        inode = self._inode(fd)
        self.tick("fallocate", self._name(inode))
        if mode & FALLOC_FL_PUNCH_HOLE:
            inode.punch(offset, length)
            return
        end = min(offset + length, len(inode.data))  # FALLOC_FL_KEEP_SIZE; zeroed in place
        if end > offset:
            inode.write(offset, bytes(end - offset))

    def start_writeback(self, fd: int) -> None:
        self._inode(fd)

    def posix_fadvise(self, fd: int, offset: int, length: int, advice: int) -> None:
        self._inode(fd)

    def replace(self, src: str | Path, dst: str | Path) -> None:
        self._move("replace", str(src), str(dst))

    def rename(self, src: str | Path, dst: str | Path) -> None:
        self._move("rename", str(src), str(dst))

    def _move(self, op: str, src: str, dst: str) -> None:
        self.tick(op, dst)
        inode = self.names.get(src)
        if inode is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", src)
        self._ns("unlink", src, None)
        self._ns("link", dst, inode)

    def unlink(self, path: str | Path, missing_ok: bool = False) -> None:
        name = str(path)
        self.tick("unlink", name)
        if name not in self.names:
            if missing_ok:
                return
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", name)
        self._ns("unlink", name, None)

    def exists(self, path: str | Path) -> bool:
        if self.dead:
            raise Halt("dead process")
        return str(path) in self.names

    def same_file(self, fd: int, path: str | Path) -> bool:
        if self.dead:
            raise Halt("dead process")
        return self._inode(fd) is self.names.get(str(path))

    def read_bytes(self, path: str | Path) -> bytes:
        if self.dead:
            raise Halt("dead process")
        inode = self.names.get(str(path))
        if inode is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return bytes(inode.data)

    def sync_dir(self, path: Path) -> None:
        d = str(path)
        self.tick("sync_dir", d)
        self._apply(self.durable_names, self.pending.pop(d, []))

    def boot_id(self) -> bytes:
        return self.boot.to_bytes(16, "big")

    # --- threads: run in turn with the loop, when the simulation says ------------------------
    def _later(self, fn: Callable[..., T], args: tuple[Any, ...]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def start() -> None:
            if self.dead:
                raise Halt("dead process")
            if not _copies(fn, args):  # (a thread switch costs: only where it can park)
                try:
                    result = fn(*args)
                except (Halt, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    if not fut.done():
                        fut.set_exception(exc)
                        fut.exception()  # a cancelled waiter's thread: nobody retrieves it
                    return
                if not fut.done():
                    fut.set_result(result)
                return
            worker = self._idle.pop() if self._idle else _Worker()
            worker.start(lambda: fn(*args))
            self._after(loop, worker, fut)

        loop.call_later(self.io_delay(), start)
        return fut

    def _after(self, loop: asyncio.AbstractEventLoop, worker: _Worker, fut: asyncio.Future[Any]) -> None:
        """The worker gave the turn back: parked part-way (resumed later), or done."""
        if worker.outcome is None:
            self._parked[worker] = None
            loop.call_later(self.io_delay(), self._resume, loop, worker, fut)
            return
        self._idle.append(worker)
        ok, value = worker.outcome
        if isinstance(value, Halt | KeyboardInterrupt):
            raise value
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
            fut.exception()  # a cancelled waiter's thread: nobody retrieves it

    def _resume(self, loop: asyncio.AbstractEventLoop, worker: _Worker, fut: asyncio.Future[Any]) -> None:
        if worker not in self._parked:
            return  # ended with the process
        del self._parked[worker]
        if self.dead:
            raise Halt("dead process")
        worker.resume()
        self._after(loop, worker, fut)

    def end_workers(self, finish: bool) -> None:
        """The parked workers run to their end (``finish``: a clean exit waits for its
        threads; no crash point meanwhile) or die where they are (the process is gone)."""
        crash_at = self.crash_at
        if finish:
            self.crash_at = None
        while self._parked:
            worker = next(iter(self._parked))
            del self._parked[worker]
            if finish:
                worker.unparked = True
            else:
                worker.kill = True
            worker.resume()
            worker.unparked = worker.kill = False
            self._idle.append(worker)
        self.crash_at = crash_at

    def close_workers(self) -> None:
        self.end_workers(finish=False)
        for worker in self._idle:
            worker.stop()
        self._idle.clear()

    async def to_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._later(fn, args)

    def run_in_pool(self, pool: Executor, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return self._later(fn, args)

    def submit(self, pool: Executor, fn: Callable[..., Any], *args: Any) -> None:
        asyncio.get_running_loop().call_later(self.io_delay(), fn, *args)


_local = threading.local()
COPIES = ("_copy_spans", "_copy_from", "copy_file_range")  # what may call copy_file_range


def _copies(fn: Callable[..., Any], args: tuple[Any, ...]) -> bool:
    """Whether a thread hand-off may reach copy_file_range (``FileBackend`` runs its
    writes as ``_counted(fn, ...)``): only those run in a worker, the rest on the loop."""
    return any(getattr(f, "__name__", "") in COPIES for f in (fn, *args[:1]))


class _Worker:
    """A thread that runs only while the loop waits for it: ``start``/``resume`` return when
    the job ends or parks (``park``, called in the thread). One of the two runs at a time."""

    def __init__(self) -> None:
        self.go = threading.Semaphore(0)
        self.back = threading.Semaphore(0)
        self.job: Callable[[], Any] | None = None
        self.outcome: tuple[bool, Any] | None = None
        self.kill = False  # the process died: the job ends at its next park
        self.unparked = False  # a clean exit: the job runs on without parking
        self.thread = threading.Thread(target=self._main, daemon=True, name="sim-worker")
        self.thread.start()

    def _main(self) -> None:
        while True:
            self.go.acquire()
            job = self.job
            if job is None:
                return
            _local.worker = self
            try:
                self.outcome = (True, job())
            except BaseException as exc:
                self.outcome = (False, exc)
            _local.worker = None
            self.back.release()

    def start(self, job: Callable[[], Any]) -> None:
        self.job, self.outcome = job, None
        self.resume()

    def resume(self) -> None:
        self.go.release()
        self.back.acquire()

    def park(self) -> None:
        if self.unparked:
            return
        self.back.release()
        self.go.acquire()
        if self.kill:
            raise Halt("the process died during a copy_file_range")

    def stop(self) -> None:
        self.job = None
        self.go.release()
        self.thread.join()


class TargetHost:
    """The disk behind a remote target, with a volatile write cache."""

    def __init__(self, name: str, size: int, rng: Random, fs: SimFS) -> None:
        self.name = name
        self.size = size
        self.rng = rng
        self.fs = fs  # for the process's crash points: a target write is an I/O of ours
        self.cache = bytearray(size)
        self.durable = bytearray(size)
        self.unflushed: list[tuple[int, int, bytes]] = []  # (seq, offset, data), completed
        self.seq = 0
        self.epoch = 0  # bumps when the host crashes: connections of older epochs are dead
        self.down_until = 0.0
        self.silent_until = 0.0
        self.slow_until = 0.0
        self.writes: list[tuple[int, int]] = []  # (offset, length) of every write, for the checks

    def crash(self) -> None:
        """The host loses power: of the unflushed writes, any subset survives, maybe torn."""
        out = bytearray(self.durable)
        for _, offset, data in self.unflushed:
            roll = self.rng.random()
            if roll < 0.5:
                continue
            if roll < 0.7:
                for lo in range(offset, offset + len(data), SECTOR):
                    if self.rng.random() < 0.5:
                        out[lo : lo + SECTOR] = data[lo - offset : lo - offset + SECTOR]
            else:
                out[offset : offset + len(data)] = data
        self.durable = out
        self.cache = bytearray(out)
        self.unflushed.clear()
        self.epoch += 1

    def up(self, now: float) -> bool:
        return now >= self.down_until


class SimTarget:
    """One connection to a ``TargetHost`` (a ``CopyTarget``)."""

    def __init__(self, host: TargetHost, clock: Clock, request_size: int, timeout: float = 30.0) -> None:
        self.host = host
        self.timeout = timeout  # as the NBD client's deadline: silent this long, the request fails
        self.clock = clock
        self.description = f"sim target {host.name}"
        self.size = host.size
        self.request_size = request_size
        self.inflight = 4
        self.epoch = host.epoch
        self.closed = False
        self.aborted = False

    async def open(self) -> SimTarget:
        if not self.host.up(self.clock.now):
            raise TargetError(msg=f"target {self.host.name}: connection refused")
        self.epoch = self.host.epoch
        return self

    def _check(self, what: str) -> None:
        if self.aborted:
            raise TargetError(msg=f"target {self.host.name}: {what} on an aborted connection")
        if self.closed:
            raise TargetError(msg=f"target {self.host.name}: {what} on a closed connection")
        if self.epoch != self.host.epoch or not self.host.up(self.clock.now):
            raise TargetError(msg=f"target {self.host.name}: connection lost ({what})")

    async def _delay(self, what: str) -> None:
        self._check(what)
        h, rng = self.host, self.host.rng
        deadline = self.clock.now + self.timeout
        while self.clock.now < h.silent_until:  # no answer, the connection stays up
            if self.clock.now >= deadline:
                raise TargetError(msg=f"target {h.name}: no reply to {what} in {self.timeout:.0f}s")
            await asyncio.sleep(min(h.silent_until, deadline) - self.clock.now)
        delay = rng.choice((0.0, 0.0001, 0.001, 0.003, 0.02))
        if self.clock.now < h.slow_until:
            delay += rng.uniform(0.1, 3.0)
        await asyncio.sleep(delay)
        self._check(what)

    async def pwrite(self, offset: int, data: bytes) -> None:
        await self._delay("write")
        self._write(offset, bytes(data))

    def _write(self, offset: int, data: bytes) -> None:
        h = self.host
        h.fs.tick("target-write", h.name)
        h.cache[offset : offset + len(data)] = data
        h.seq += 1
        h.unflushed.append((h.seq, offset, data))
        h.writes.append((offset, len(data)))

    async def zero(self, offset: int, length: int) -> bool:
        await self._delay("zero")
        self._write(offset, bytes(length))
        return True

    async def pread(self, offset: int, length: int) -> bytes:
        await self._delay("read")
        return bytes(self.host.cache[offset : offset + length])

    async def flush(self) -> None:
        self._check("flush")
        covers = self.host.seq  # the writes completed before the flush was sent
        await self._delay("flush")
        h = self.host
        h.fs.tick("target-flush", h.name)
        keep = []
        for seq, offset, data in h.unflushed:
            if seq <= covers:
                h.durable[offset : offset + len(data)] = data
            else:
                keep.append((seq, offset, data))
        h.unflushed = keep

    def abort(self) -> None:
        """What is in flight fails and never lands (requests land whole when they complete)."""
        self.aborted = True

    async def close(self) -> None:
        self.closed = True

"""One connection's writes, done in order by one worker thread while the event loop goes on.

A write every layer agreed to (``Layer.pwrite_soon``) is a ``WriteJob``; the lane runs its
jobs one after the other, in the order they were put, on one thread of a pool at a time.
The pool is shared by every connection's lane, so a thread takes jobs for one turn only
(``TURN_JOBS`` jobs or ``TURN_SECONDS``, whichever ends first) while another lane waits
for a thread: then it puts the lane at the back of the pool's queue and takes the next
lane. A connection that always has writes queued cannot keep a thread for itself: with
every thread taken, another connection's write (its FLUSH, and a mark of its volume,
which waits for the writes that entered the gate) would wait as long as they write.

The event loop meanwhile receives and parses the next requests: the kernel's copy of the
data into the page cache (the GIL released) runs on the other core. What is done is
handed back to the loop in batches, by one wake-up for as many jobs as finished since
the last: a thread hop per write, each a future and a handover of the GIL, would cost
more than it saves.

A ``BARRIER`` job does nothing: when it is handed back, every job put before it is done.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from deltavol.backend.base import WriteJob
from deltavol.store import fs

WORKERS = 16
TURN_JOBS = 16  # a turn ends after this many jobs ...
TURN_SECONDS = 0.002  # ... or this long, if another lane waits for a thread
_pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="deltavol-lane")
_waiting = 0  # lanes whose turn was handed to the pool and has not begun
_waiting_lock = threading.Lock()


def _submit(work: Callable[[], None]) -> None:
    """Hand a lane's turn to the pool, counted in ``_waiting`` until it begins."""
    global _waiting
    with _waiting_lock:
        _waiting += 1
    try:
        fs.submit(_pool, work)
    except BaseException:
        with _waiting_lock:
            _waiting -= 1
        raise


Done = tuple[WriteJob, object, BaseException | None]  # (job, its token, its error or None)
BARRIER = WriteJob(lambda: None)


class WriteLane:
    def __init__(self, loop: asyncio.AbstractEventLoop, on_done: Callable[[list[Done]], None]) -> None:
        self._loop = loop
        self._on_done = on_done  # called on the loop with the jobs done, in the order put
        self._queue: deque[tuple[WriteJob, object]] = deque()
        self._done: list[Done] = []
        self._lock = threading.Lock()
        self._running = False  # a worker thread is taking jobs from the queue
        self._woken = False  # ``_deliver`` is scheduled on the loop
        self.pending = 0  # jobs put and not yet handed back (loop side only)

    def put(self, job: WriteJob, token: object) -> None:
        """Queue ``job``; ``on_done`` gets it back with ``token`` once it ran."""
        self.pending += 1
        with self._lock:
            self._queue.append((job, token))
            if self._running:
                return
            self._running = True
        try:
            _submit(self._work)
        except BaseException:  # the pool is shut down (the interpreter exits): not put
            with self._lock:
                self._queue.pop()  # the only one: no worker ran, so the queue was empty
                self._running = False
            self.pending -= 1
            raise

    def _work(self) -> None:
        """In a worker thread: one turn, jobs until the queue is empty or the turn is over."""
        global _waiting
        with _waiting_lock:
            _waiting -= 1
        ran, end = 0, time.monotonic() + TURN_SECONDS
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    return
                job, token = self._queue.popleft()
            error: BaseException | None = None
            try:
                job.run()
            except BaseException as exc:  # handed to the loop, which answers the request
                error = exc
            with self._lock:
                self._done.append((job, token, error))
                wake, self._woken = not self._woken, True
            if wake:
                self._loop.call_soon_threadsafe(self._deliver)
            ran += 1
            if _waiting and (ran >= TURN_JOBS or time.monotonic() >= end):
                # Another lane waits for a thread: this one goes to the back of the queue.
                # ``_running`` stays set, so no other thread takes this lane's jobs
                # meanwhile: they still run in the order put.
                try:
                    _submit(self._work)
                except BaseException:  # the pool is shut down: go on in this thread
                    ran, end = 0, time.monotonic() + TURN_SECONDS
                    continue
                return

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, []
            self._woken = False
        self.pending -= len(done)
        self._on_done(done)

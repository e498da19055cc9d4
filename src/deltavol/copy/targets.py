"""Where copies go: a local volume's file, or an export on another NBD server.

A target is opened by the session that owns it and written only by the copy engine (and,
when the save area is full, by copy-before-write). ``zero`` returns False when the target
cannot write zeroes efficiently, and the engine then writes zero buffers itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from deltavol.backend.file import FileBackend
from deltavol.copy.engine import INFLIGHT, MAX_REQUEST
from deltavol.errors import TargetError, TlsFileInvalid, TlsFileMissing
from deltavol.tls import client_tls, explain

T = TypeVar("T")
TARGET_TIMEOUT = 30.0  # seconds a target may take to connect, or stay silent with requests waiting


class CopyTarget(Protocol):
    description: str
    size: int
    request_size: int  # the most bytes one copy request carries
    inflight: int  # requests the copy keeps in flight

    async def pwrite(self, offset: int, data: bytes) -> None: ...
    async def zero(self, offset: int, length: int) -> bool: ...
    async def pread(self, offset: int, length: int) -> bytes: ...
    async def flush(self) -> None: ...
    # wait until no write sent so far, those of a copy cancelled meanwhile too, can still land
    async def drain(self) -> None: ...
    async def close(self) -> None: ...
    # fail what is in flight and drop what is not yet sent, so that nothing sent so far
    # lands later than what is written next (over a new connection)
    def abort(self) -> None: ...


def is_uri(target: str) -> bool:
    return target.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://"))


class LocalTarget:
    """A local volume, written beneath its export (which refuses clients' writes).

    Every ``WRITEBACK_BYTES`` written, the copy starts the kernel writing them out (the
    writer that crosses the mark waits for the start, the others go on): the disk works
    while the copy does, instead of in the flush at each checkpoint and at the end.

    Everything it does to the volume runs in the volume's target threads (``as_target``,
    see ``backend/file.py``), never in the pool the sources' reads, writes and flushes
    share: a stalled target disk stalls the copy, not the clients of the sources.
    """

    request_size = MAX_REQUEST
    inflight = INFLIGHT
    WRITEBACK_BYTES = 8 * 1024 * 1024

    def __init__(self, backend: FileBackend) -> None:
        self.backend = backend
        self.description = f"volume {backend.name!r}"
        self.size = backend.size
        self._unstarted = 0  # bytes written since writeback was last started
        self._writing: set[asyncio.Future[Any]] = set()

    async def _write(self, op: Coroutine[Any, Any, T]) -> T:
        """Run a write so that cancelling the copy waiting for it (pause, cancel, remove)
        leaves it running, as its thread does anyway, and ``drain`` and ``close`` wait for
        it: no write may land after the session has let go of the target, nor after a
        copy that comes later."""
        fut = asyncio.ensure_future(op)
        self._writing.add(fut)
        fut.add_done_callback(_forget(self._writing))
        return await asyncio.shield(fut)

    async def pwrite(self, offset: int, data: bytes) -> None:
        await self._write(self.backend.pwrite(offset, data, as_target=True))
        await self.written(len(data))

    async def copy_from(self, source: FileBackend, offset: int, length: int) -> None:
        """Copy [offset, offset+length) of ``source`` here in the kernel (``FileBackend.copy_from``):
        what the source holds there now is what lands, so the caller must hold it still."""
        await self._write(self.backend.copy_from(source, offset, length))
        await self.written(length)

    async def copy_spans(
        self,
        source: FileBackend,
        spans: list[tuple[int, int]],
        zeroes: list[tuple[int, int]] | None = None,
        granularity: int = 0,
    ) -> int:
        """``copy_from`` for each (offset, length) of ``spans`` in one hand-over to a thread
        (``FileBackend.copy_spans``); the bytes copied as data. The caller must hold the
        spans of the source still, and calls ``written`` after (once it holds nothing
        more: the writeback start may wait for the disk). The source's zeroes (its holes,
        and with a ``granularity`` its blocks of zeroes) go as zero requests in the
        thread, or, given ``zeroes``, are added to it for ``zero_spans``."""
        return await self._write(self.backend.copy_spans(source, spans, zeroes, granularity))

    async def zero_spans(self, spans: list[tuple[int, int]]) -> None:
        """Zero (punch) each (offset, length) of ``spans``, in one hand-over to a thread."""
        if spans:
            await self._write(self.backend.zero_spans(spans))

    async def written(self, n: int) -> None:
        """``n`` more bytes written: every ``WRITEBACK_BYTES``, start their writeback."""
        self._unstarted += n
        if self._unstarted >= self.WRITEBACK_BYTES:
            self._unstarted = 0
            await self.backend.start_writeback()

    async def zero(self, offset: int, length: int) -> bool:
        await self._write(self.backend.zero(offset, length, may_trim=True, as_target=True))
        return True

    async def pread(self, offset: int, length: int) -> bytes:
        return await self.backend.pread(offset, length, as_target=True)

    async def flush(self) -> None:
        await self.backend.flush(as_target=True)

    async def drain(self) -> None:
        """Wait until no write runs any more, those of a copy cancelled meanwhile too."""
        while self._writing:
            await asyncio.wait(set(self._writing))

    async def close(self) -> None:
        """The backend belongs to the volume: only the writes still under way are awaited."""
        await self.drain()

    def abort(self) -> None:
        """Nothing queued here to discard; a write already in a worker thread cannot be
        stopped and lands when the disk takes it (a local disk that hangs that long)."""


def _forget(pending: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
    def done(fut: asyncio.Future[Any]) -> None:
        pending.discard(fut)
        if not fut.cancelled():
            fut.exception()  # retrieved: a failure nobody waits for any more is no warning

    return done


# Why a server without NBD_FLAG_SEND_FLUSH is refused rather than written with FUA: progress
# is recorded only once a flush covers it (a flush per checkpoint is cheap; FUA on every
# write makes the server sync each one), and a server that offers FUA but not FLUSH is
# not one met in practice (nbdkit emulates FUA with its plugin's flush; qemu-nbd has both).
NO_FLUSH = "its writes could never be known to be durable, so no copy to it could be trusted"


class NbdTarget:
    """An export on a remote NBD server, reached with deltavol's own NBD client.

    A server that promises CAN_MULTI_CONN gets ``CONNECTIONS`` connections, used in turn
    (as nbdcopy does): one connection is one queue on the server, several keep more of
    it busy. A flush on any of them then covers writes completed on all.

    Requests are nbdcopy's size, 256 KiB, with 64 in flight: a server reads a request's
    whole payload before it writes any of it, so small requests keep its writer busy while
    the socket delivers the next. A full update of 4 GiB (half holes) to qemu-nbd took
    0.87-1.07x nbdcopy's time this way, 1.19-1.35x with 4 MiB requests, 16 in flight.

    A server that does not connect, or stays silent with requests waiting, for ``timeout``
    seconds fails the connection (``NbdClient``): its requests raise ``TargetError``.

    A copy stopped (pause, cancel, remove) cancels the waits for its requests, not the
    requests: sent, or queued to be, they still run on the server. ``drain`` and ``close``
    wait for their replies on every connection (each bounded by its watchdog, which
    resets a connection that does not answer), so that none lands after they return, over
    what a next connection writes.
    """

    CONNECTIONS = 4
    request_size = 256 * 1024
    inflight = 64

    def __init__(self, uri: str, timeout: float = TARGET_TIMEOUT, export: str | None = None) -> None:
        self.uri = uri
        self.timeout = timeout
        self.export = export  # opened instead of the URI's (``NAME@SECRET``: a peer's guard)
        self.description = uri
        self.size = 0
        self._clients: list[Any] = []
        self._turn = itertools.count()

    async def open(self) -> NbdTarget:
        from deltavol.server.nbd_client import NbdClient

        try:  # nbds: the certificates are read again at each open, a renewed one is used
            tls = client_tls(self.uri)
        except (TlsFileMissing, TlsFileInvalid) as exc:
            raise TargetError(msg=f"target {self.uri}: {exc.message}") from exc
        if self.export is not None:  # only when set: connect's stand-ins in tests know no export
            tls = {**tls, "export": self.export}
        try:
            first = await NbdClient.connect(self.uri, timeout=self.timeout, **tls)
            self._clients = [first]
            if first.read_only:
                raise TargetError(msg=f"target {self.uri} is read-only")
            if not first.can_flush:
                raise TargetError(msg=f"target {self.uri} does not support FLUSH: {NO_FLUSH}")
            if first.can_multi_conn:
                more = [
                    asyncio.ensure_future(NbdClient.connect(self.uri, timeout=self.timeout, **tls))
                    for _ in range(self.CONNECTIONS - 1)
                ]
                try:
                    await asyncio.wait(more)
                finally:  # cancelled too: the connections made are closed below, the rest stopped
                    for task in more:
                        task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait(more)
                    self._clients.extend(
                        t.result() for t in more if t.done() and not t.cancelled() and t.exception() is None
                    )
                for task in more:
                    failed = task.exception()
                    if failed is not None:
                        raise failed
        except (OSError, ValueError) as exc:
            await self.close()
            raise TargetError(msg=f"target {self.uri}: {explain(exc, self.uri) or exc}") from exc
        except BaseException:  # refused, or cancelled: no connection stays open
            await self.close()
            raise
        self.size = first.size
        return self

    def _live(self) -> list[Any]:
        if not self._clients:  # closed: a copy-before-write that held it sends no more
            raise TargetError(msg=f"target {self.uri}: closed")
        return self._clients

    def _client(self) -> Any:
        clients = self._live()
        return clients[next(self._turn) % len(clients)]

    async def _do(self, what: str, coro: Awaitable[T]) -> T:
        try:
            return await coro
        except Exception as exc:
            raise TargetError(msg=f"target {self.uri}: {what} failed: {exc}") from exc

    async def pwrite(self, offset: int, data: bytes) -> None:
        await self._do(f"write at {offset}", self._client().pwrite(offset, data))

    async def zero(self, offset: int, length: int) -> bool:
        client = self._client()
        if client.can_zero:
            await self._do(f"write zeroes at {offset}", client.zero(offset, length, may_trim=True))
            return True
        return False

    async def pread(self, offset: int, length: int) -> bytes:
        return await self._do(f"read at {offset}", self._client().pread(offset, length))

    async def flush(self) -> None:
        client = self._live()[0]  # multi-conn: it covers what the others completed
        await self._do("flush", client.flush())

    def abort(self) -> None:
        for client in self._clients:  # kept: their requests fail (TargetError) until close
            client.abort()

    async def drain(self) -> None:
        """Wait until every connection has the replies of all it sent, or was reset for
        not answering in time (``NbdClient.drain``), all at once."""
        clients = list(self._clients)
        try:
            await asyncio.gather(*(client.drain() for client in clients))
        except BaseException:  # cancelled: what they still have in flight must not land late
            for client in clients:
                client.abort()
            raise

    async def close(self) -> None:
        """Drain, then disconnect; cancelled, reset the connections. They stay usable while
        they drain (a copy-before-write sent meanwhile is waited for too)."""
        clients = list(self._clients)
        try:
            await self.drain()
            for client in clients:
                with contextlib.suppress(Exception):  # closing a dead connection is no news
                    await client.close()  # (drains again, should a write have come meanwhile)
        except BaseException:
            for client in clients:
                client.abort()
            raise
        finally:
            self._clients = []

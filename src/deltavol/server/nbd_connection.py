"""The asyncio half of one NBD connection: it only moves bytes and runs requests.

Reading: the transport receives in place (``asyncio.BufferedProtocol``) into the buffer
the sans-I/O ``ServerConnection`` offers (its receive buffer, or the payload buffer of a
large WRITE); a read from the page cache is done at once, and any other ``Request``
becomes a task, so requests run concurrently and reply out of order. Writes no layer has
to wait for (``Layer.pwrite_soon``) go to the connection's ``WriteLane`` instead: one
worker thread does them in the order they came while the loop goes on receiving, and
they are acknowledged once done (for 1 MiB writes the loop receives the next while the
last is copied). A small write (under 64 KiB) with none in the lane is done at once on
the loop: a thread hop would cost it more than the copy. So writes that did not take the
task path land in the order they were received, however they overlap, and a FLUSH waits
for every write put in the lane before it. Backpressure is bounded in count and bytes:
past ``MAX_INFLIGHT`` requests or ``MAX_INFLIGHT_BYTES`` of payload, or while the
transport's write buffer is full, reading pauses until requests complete.

Replies are queued by the sans-I/O layer and written in one ``writelines``: those of a
burst of requests parsed from one receive at the end of the burst, a large read's at once
(so the socket keeps streaming), and those of tasks at the end of the loop's turn; the
event loop is single-threaded, so replies never interleave.

STARTTLS: when the sans-I/O layer acknowledges it (``StartTls``), the ACK is written, and
reading stops at once, in the same call, so that no byte the client sends next reaches
the parser as plain text; ``loop.start_tls`` then takes over the socket. The context
comes from ``tls_context()`` at each upgrade, so a renewed certificate on disk is used
by the next connection without a restart. ``start_tls`` may hand decrypted bytes to
``buffer_updated`` before it returns; they wait in ``_early`` until the sans-I/O layer
hears ``tls_started``. A handshake that fails (plain bytes, garbage, an unknown CA) ends
this connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from deltavol.backend.export import Export
from deltavol.backend.lane import BARRIER, Done, WriteLane
from deltavol.errors import DeltavolError, NotFound
from deltavol.nbd.constants import Cmd, CmdFlag, Rep, TlsMode
from deltavol.nbd.events import (
    NEED_DATA,
    BadRequest,
    Closed,
    ExportInfo,
    OptExportName,
    OptInfo,
    OptList,
    OptMetaContext,
    Request,
    StartTls,
)
from deltavol.nbd.server_conn import ServerConnection

log = logging.getLogger("deltavol.nbd")

MAX_INFLIGHT = 64
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
SPARSE_READ_MIN = 64 * 1024
LANE_ALWAYS = 128 * 1024  # writes larger than this always go to the lane
LANE_MIN = 64 * 1024  # writes smaller than this go to it only behind others there
SOCKET_BUFFER = 4 * 1024 * 1024  # reads this large look for holes to send as OFFSET_HOLE
TLS_HANDSHAKE_TIMEOUT = 30.0  # seconds a client has to finish the TLS handshake

TlsContextFactory = Callable[[], ssl.SSLContext]
_FUA = int(CmdFlag.FUA)


class ExportDirectory(Protocol):
    """What a connection needs from the server: names, and exports to open and close."""

    def export_names(self) -> list[str]: ...
    def open_export(self, name: str) -> Export: ...  # raises NotFound / Protected
    def close_export(self, name: str) -> None: ...


class NbdConnection(asyncio.BufferedProtocol):
    def __init__(
        self,
        directory: ExportDirectory,
        on_done: Callable[[NbdConnection], None],
        *,
        tls_mode: TlsMode = TlsMode.OFF,
        tls_context: TlsContextFactory | None = None,
    ) -> None:
        if tls_mode is not TlsMode.OFF and tls_context is None:
            raise ValueError(f"TLS mode {tls_mode} needs a TLS context")
        self.directory = directory
        self.on_done = on_done
        self.tls_context = tls_context
        self.conn = ServerConnection(tls_mode=tls_mode)
        self.export: Export | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.tasks: set[asyncio.Task[None]] = set()
        self.lane: WriteLane | None = None  # writes done in a worker thread, in order
        self.inflight_bytes = 0
        self._reading_paused = False
        self._writing_paused = False
        self._closed = False
        self._lost = False  # the transport is gone (connection_lost)
        self._flush_soon = False
        self._released = False
        self._upgrading = False  # between the STARTTLS ACK and the end of the TLS handshake
        self._early: list[bytes] = []  # decrypted bytes that came before start_tls returned
        self._scratch: bytearray | None = None  # where those bytes are received
        self._tls_task: asyncio.Task[None] | None = None
        self.idle = asyncio.Event()
        self.idle.set()

    # --- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # Big replies: let the kernel hold several in flight, and pause reading only when
        # many are queued (the default 64 KiB high-water mark would stall on every read).
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        self.transport.set_write_buffer_limits(high=MAX_INFLIGHT_BYTES)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        if self._upgrading:
            if self._scratch is None:
                self._scratch = bytearray(64 * 1024)
            return self._scratch
        return self.conn.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self._upgrading:
            assert self._scratch is not None
            self._early.append(bytes(self._scratch[:nbytes]))
            return
        if self.conn.buffer_updated(nbytes):  # else part of a payload that is not whole yet
            self._pump()

    def eof_received(self) -> bool:
        if self._upgrading:
            self._early.append(b"")
            return False
        self.conn.receive_data(b"")
        self._pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._lost = True
        self.conn.drop_payload()  # a WRITE cut off mid-payload: its sink is given back
        if not self._running():
            self._release()
        # else requests still run on the export: the last to finish releases it

    def _release(self) -> None:
        """The connection is gone and no request runs: give back the export, and leave the
        listener (which drains only the connections it still holds)."""
        if self._released:
            return
        self._released = True
        export, self.export = self.export, None
        if export is not None:
            self.directory.close_export(export.name)
        self.on_done(self)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # --- plumbing ----------------------------------------------------------------------------
    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def _flush_later(self) -> None:
        """Small replies finished by tasks in one turn of the loop go out in one write
        (a burst of write acks after a group fsync, say)."""
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_soon = False
        self._flush()

    def _update_reading(self) -> None:
        if self.transport is None or self._closed or self._upgrading:
            return
        busy = (
            self._writing_paused
            or self._running() >= MAX_INFLIGHT
            or self.inflight_bytes >= MAX_INFLIGHT_BYTES
        )
        if busy and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        elif not busy and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
            self._pump()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _pump(self) -> None:
        while not self._reading_paused and not self._closed:
            event = self.conn.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, Request):
                self._start(event)
            elif isinstance(event, BadRequest):
                log.warning("nbd %s: refused request: %s", self.peer, event.reason)
                self.conn.send_error(event.cookie, event.errno, event.reason)
            elif isinstance(event, Closed):
                self._flush()
                if not event.clean:
                    log.warning("nbd %s: closing: %s", self.peer, event.reason)
                self._closed = True
                self._close_when_idle()
                break
            elif isinstance(event, StartTls):
                self._flush()  # the ACK, in plain text
                self._start_tls()
                return
            else:
                self._option(event)
        self._flush()  # the acks of a burst of requests leave in one write

    def _close_when_idle(self) -> None:
        if not self._running():
            self.close()
        else:
            task = asyncio.get_running_loop().create_task(self._drain_then_close())
            task.add_done_callback(lambda _t: None)

    async def _drain_then_close(self) -> None:
        await self.idle.wait()
        self.close()

    # --- TLS ----------------------------------------------------------------------------------
    def _start_tls(self) -> None:
        transport = self.transport
        assert transport is not None
        self._upgrading = True
        transport.pause_reading()  # now: the next bytes are the client's TLS handshake
        self._tls_task = asyncio.get_running_loop().create_task(self._upgrade(transport))

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        assert self.tls_context is not None
        try:
            context = self.tls_context()
        except Exception as exc:  # certificate files unreadable, say: this client only
            log.error("nbd %s: no TLS context for STARTTLS: %s", self.peer, exc)
            self._tls_failed(transport)
            return
        try:
            tls = await loop.start_tls(
                transport, self, context, server_side=True, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT
            )
            if tls is None:
                raise ConnectionError("the connection closed during the TLS handshake")
        except (Exception, asyncio.CancelledError) as exc:
            log.warning("nbd %s: TLS handshake failed: %s", self.peer, _tls_failure(exc))
            self._tls_failed(transport)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self.transport = tls
        self._upgrading = False
        self._scratch = None
        if self._closed:  # lost (or shut down) the moment the handshake ended
            self._early.clear()
            return
        self.transport.set_write_buffer_limits(high=MAX_INFLIGHT_BYTES)
        cipher = tls.get_extra_info("cipher")
        log.info("nbd %s: TLS established (%s)", self.peer, cipher[0] if cipher else "?")
        self.conn.tls_started()
        early, self._early = self._early, []
        for data in early:
            self.conn.receive_data(data)
        self._pump()
        self._update_reading()

    def _tls_failed(self, transport: asyncio.Transport) -> None:
        """The ACK went out but TLS did not come up: this connection is over."""
        self._upgrading = False
        self._scratch = None
        self._early.clear()
        self._closed = True
        self._lost = True
        transport.abort()
        self._release()  # no request ran: nothing else would release it

    # --- handshake ----------------------------------------------------------------------------
    def _info(self, export: Export) -> ExportInfo:
        return ExportInfo(
            name=export.name,
            size=export.size,
            flags=export.transmission_flags(),
            description=export.description,
            max_block=self.conn.max_payload,
        )

    def _open(self, name: str) -> Export:
        export = self.directory.open_export(name)
        self.export = export
        log.info("nbd %s: opened export %r", self.peer, _shown(name))
        return export

    def _option(self, event: object) -> None:
        if isinstance(event, OptList):
            self.conn.reply_list(self.directory.export_names())
        elif isinstance(event, OptInfo):
            try:
                export = self._open(event.name) if event.go else self.directory.open_export(event.name)
                if not event.go:
                    self.directory.close_export(event.name)
            except DeltavolError as exc:
                refusal = Rep.ERR_UNKNOWN if isinstance(exc, NotFound) else Rep.ERR_POLICY
                log.info("nbd %s: refused export %r: %s", self.peer, _shown(event.name), exc.message)
                self.conn.reply_info(None, exc.message, refusal)
                return
            self.conn.reply_info(self._info(export))
        elif isinstance(event, OptExportName):
            try:
                export = self._open(event.name)
            except DeltavolError as exc:
                log.info("nbd %s: refused export %r: %s", self.peer, _shown(event.name), exc.message)
                self.conn.refuse_export_name(exc.message)
                self._closed = True
                self.close()
                return
            self.conn.accept_export(self._info(export))
        elif isinstance(event, OptMetaContext):
            known = event.name in self.directory.export_names()
            self.conn.reply_meta_context(known, f"export {event.name!r} does not exist")

    # --- transmission ------------------------------------------------------------------------
    def _running(self) -> int:
        """Requests under way: tasks, and writes in the lane."""
        return len(self.tasks) + (self.lane.pending if self.lane is not None else 0)

    def _start(self, req: Request) -> None:
        if req.cmd is Cmd.READ and self._read_inline(req):
            return
        if req.cmd is Cmd.WRITE and not req.flags & _FUA:
            lane = self.lane
            if lane is None:
                lane = self.lane = WriteLane(asyncio.get_running_loop(), self._lane_done)
            # To the lane: a large write, or a write of a burst of large ones (more received
            # behind it), or one behind writes in the lane (they land in order), so the loop
            # goes on receiving while a worker copies the data to the kernel. A small write
            # is done at once: a thread hop costs it more than its copy (bench: 4 KiB random
            # writes at iodepth 32 fell from 27.5K to 17K IOPS when bursts of them went to
            # the lane).
            n = len(req.data)
            if lane.pending or n > LANE_ALWAYS or (n >= LANE_MIN and self.conn.buffered):
                if self._write_soon(req):
                    return
            elif self._write_inline(req):
                return
        task = asyncio.get_running_loop().create_task(self._run(req))
        self.tasks.add(task)
        self.idle.clear()
        self.inflight_bytes += req.length if req.cmd in (Cmd.READ, Cmd.WRITE) else 0
        task.add_done_callback(functools.partial(self._finished, req=req))
        self._update_reading()

    def _read_inline(self, req: Request) -> bool:
        """Serve a read from the page cache at once: a task and a thread hop cost more."""
        if self.conn.structured_replies and req.length >= SPARSE_READ_MIN:
            return False  # large reads look for holes first
        export = self.export
        assert export is not None
        try:
            data = export.pread_cached(req.offset, req.length)
        except DeltavolError as exc:
            self.conn.send_error(req.cookie, exc.nbd_errno, exc.message)
            return True
        except Exception as exc:  # as in ``_run``: a bug costs this request, not the connection
            self._crashed(req, exc)
            return True
        if data is None:
            return False
        self.conn.send_read(req.cookie, req.offset, [(req.length, data)])
        if req.length >= SPARSE_READ_MIN:
            self._flush()  # much data: out at once, so the socket keeps streaming
        # else with the other replies of this burst, in one write at the end of ``_pump``
        return True

    def _write_inline(self, req: Request) -> bool:
        """A write that nothing has to wait for (see ``Layer.pwrite_now``) is done at once."""
        export = self.export
        assert export is not None
        try:
            if not export.pwrite_now(req.offset, req.data):  # type: ignore[arg-type]  # see _write
                return False
        except Exception as exc:
            self._write_failed(req, exc)
            return True
        self.conn.send_ok(req.cookie)
        return True

    def _write_soon(self, req: Request) -> bool:
        """Put a write every layer agreed to (``Layer.pwrite_soon``) in the lane; it is
        acknowledged once done (``_lane_done``). False if it must take the task path."""
        export, lane = self.export, self.lane
        assert export is not None and lane is not None
        try:
            job = export.pwrite_soon(req.offset, req.data)  # type: ignore[arg-type]  # see _write
        except Exception as exc:
            self._write_failed(req, exc)
            return True
        if job is None:
            return False
        try:
            lane.put(job, req)
        except Exception as exc:  # no worker thread to be had (the interpreter exits)
            job.finish(exc)
            self._crashed(req, exc)
            return True
        self.idle.clear()
        self.inflight_bytes += req.length
        self._update_reading()
        return True

    def _lane_done(self, done: list[Done]) -> None:
        """On the loop: writes of the lane are done (in the order they were put)."""
        for job, token, error in done:
            if job is BARRIER:  # a FLUSH waits for it
                waiter = cast("asyncio.Future[None]", token)
                if not waiter.done():
                    waiter.set_result(None)
                continue
            req = cast(Request, token)
            self.inflight_bytes -= req.length
            try:
                job.finish(error)
            except Exception as exc:  # a bug costs this request; the rest of the batch goes on
                self._crashed(req, exc)
                continue
            if error is None:
                self.conn.send_ok(req.cookie)
            else:
                self._write_failed(req, error)
        self._flush()
        self._settle()

    def _write_failed(self, req: Request, exc: BaseException) -> None:
        """Answer a WRITE that failed inline or in the lane: a ``DeltavolError`` with its
        errno; anything else is a bug, which (as in ``_run``) costs this request only."""
        if isinstance(exc, DeltavolError):
            log.info("nbd %s: WRITE failed: %s", self.peer, exc.message)
            self.conn.send_error(req.cookie, exc.nbd_errno, exc.message)
        else:
            self._crashed(req, exc)

    def _crashed(self, req: Request, exc: BaseException) -> None:
        log.error(
            "nbd %s: %s at %d+%d crashed", self.peer, req.cmd.name, req.offset, req.length, exc_info=exc
        )
        self.conn.send_error(req.cookie, errno.EIO, f"internal error: {exc}")

    def _finished(self, task: asyncio.Task[None], *, req: Request) -> None:
        self.tasks.discard(task)
        self.inflight_bytes -= req.length if req.cmd in (Cmd.READ, Cmd.WRITE) else 0
        self._settle()

    def _settle(self) -> None:
        """A request finished: idle (and released, if the connection is gone) when it was
        the last; else reading may resume."""
        if not self._running():
            self.idle.set()
            if self._lost:
                self._release()
                return
        self._update_reading()

    async def _run(self, req: Request) -> None:
        export = self.export
        assert export is not None
        try:
            await _HANDLERS[req.cmd](self, export, req)
        except DeltavolError as exc:
            log.info("nbd %s: %s failed: %s", self.peer, req.cmd.name, exc.message)
            self.conn.send_error(req.cookie, exc.nbd_errno, exc.message)
        except Exception as exc:  # a bug must cost one request, never the server
            self._crashed(req, exc)
        if req.cmd is Cmd.READ:
            self._flush()  # data: out at once, so the socket keeps streaming
        else:
            self._flush_later()

    async def _read(self, export: Export, req: Request) -> None:
        if self.conn.structured_replies and req.length >= SPARSE_READ_MIN and not req.df:
            extents = await export.extents(req.offset, req.length)
            if len(extents) > 1 or (extents and extents[0][1] & 1):
                pieces: list[tuple[int, bytes | None]] = []
                pos = req.offset
                for length, flags in extents:
                    pieces.append((length, None if flags & 1 else await export.pread(pos, length)))
                    pos += length
                self.conn.send_read(req.cookie, req.offset, pieces)
                return
        data = await export.pread(req.offset, req.length)
        self.conn.send_read(req.cookie, req.offset, [(req.length, data)])

    async def _write(self, export: Export, req: Request) -> None:
        # A large payload is the bytearray it was received into (no copy): every layer
        # only passes it on or reads it as a buffer.
        await export.pwrite(req.offset, req.data, req.fua)  # type: ignore[arg-type]
        self.conn.send_ok(req.cookie)

    async def _flush_cmd(self, export: Export, req: Request) -> None:
        lane = self.lane
        if lane is not None and lane.pending:  # the writes put in the lane before it land first
            landed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            lane.put(BARRIER, landed)
            await landed
        await export.flush()
        self.conn.send_ok(req.cookie)

    async def _trim(self, export: Export, req: Request) -> None:
        await export.trim(req.offset, req.length, req.fua)
        self.conn.send_ok(req.cookie)

    async def _zero(self, export: Export, req: Request) -> None:
        await export.zero(
            req.offset,
            req.length,
            may_trim=not req.no_hole,
            fua=req.fua,
            fast=req.fast_zero,
        )
        self.conn.send_ok(req.cookie)

    async def _cache(self, export: Export, req: Request) -> None:
        await export.cache(req.offset, req.length)
        self.conn.send_ok(req.cookie)

    async def _block_status(self, export: Export, req: Request) -> None:
        if req.length == 0:
            self.conn.send_error(req.cookie, errno.EINVAL, "block status of zero length")
            return
        extents = await export.extents(req.offset, req.length)
        if req.req_one:
            extents = extents[:1]
        self.conn.send_block_status(req.cookie, extents)


def _tls_failure(exc: BaseException) -> str:
    """One line on why a TLS handshake failed, for the log."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, asyncio.CancelledError):
        return "server shutting down"
    if isinstance(exc, ConnectionError) and not str(exc):
        return "the client closed the connection"
    return str(exc) or type(exc).__name__


_HANDLERS: dict[Cmd, Callable[[NbdConnection, Export, Request], Awaitable[None]]] = {
    Cmd.READ: NbdConnection._read,
    Cmd.WRITE: NbdConnection._write,
    Cmd.FLUSH: NbdConnection._flush_cmd,
    Cmd.TRIM: NbdConnection._trim,
    Cmd.WRITE_ZEROES: NbdConnection._zero,
    Cmd.CACHE: NbdConnection._cache,
    Cmd.BLOCK_STATUS: NbdConnection._block_status,
}


def _shown(name: str) -> str:
    """An export name as logged: a guard's secret (``NAME@SECRET``) is never written out."""
    head, at, _ = name.partition("@")
    return f"{head}@..." if at else name

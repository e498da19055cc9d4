"""Sans-I/O client side of one NBD connection (fixed newstyle).

The handshake runs by itself once the greeting arrives: client flags, then
NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT base:allocation (if asked), then
NBD_OPT_GO with a block-size request. It ends in ``Ready`` or ``HandshakeFailed``.
In transmission, ``request`` queues a request and returns its cookie; replies come back
as one ``Reply`` per request, structured chunks assembled (read data with holes as zeroes,
block status as (length, flags) pairs). A reply that does not fit what was asked is a
protocol violation and ends the connection with ``Closed``.

With ``tls=True`` NBD_OPT_STARTTLS goes first, before any option that could be tampered
with in plain text. Its ACK comes back as ``StartTls``: the application upgrades the
transport and calls ``tls_started``, and the handshake above runs inside TLS. Any refusal
is ``HandshakeFailed``: a client that asked for TLS never goes on without it (the spec's
defence against a downgrade by a man in the middle).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deltavol.nbd import constants as c
from deltavol.nbd import wire
from deltavol.nbd.buffer import ReceiveBuffer
from deltavol.nbd.constants import Cmd, Info, Opt, Rep, ReplyFlag, ReplyType
from deltavol.nbd.events import NEED_DATA, Closed, StartTls
from deltavol.nbd.state import CLIENT_TRANSITIONS, ProtocolStateError, advance
from deltavol.nbd.state import ClientPhase as Phase

__all__ = ["ClientConnection", "HandshakeFailed", "Phase", "ProtocolStateError", "Ready", "Reply"]


@dataclass(frozen=True, slots=True)
class Ready:
    size: int
    flags: int
    min_block: int
    preferred_block: int
    max_block: int
    meta_context_id: int | None


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    reason: str


@dataclass(slots=True)
class Reply:
    cookie: int
    error: int = 0
    message: str = ""
    data: bytearray | None = None
    extents: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class _Pending:
    cmd: Cmd
    offset: int
    length: int
    reply: Reply
    covered: int = 0  # bytes of a structured read answered so far (data or hole)


def _shown(export: str) -> str:
    """An export name as messages say it: ``NAME@...`` for ``NAME@SECRET`` (a peer guard's
    secret, the one writable way into a deltavol server's guarded volume)."""
    name, at, _ = export.partition("@")
    return f"{name}@..." if at else export


class ClientConnection:
    def __init__(
        self,
        export: str,
        *,
        structured: bool = True,
        block_status: bool = False,
        tls: bool = False,
        shown: str | None = None,
    ) -> None:
        self.export = export  # the name sent, never said: it may hold a secret (NAME@SECRET)
        self.shown = shown if shown is not None else _shown(export)  # what messages say instead
        self.phase = Phase.AWAIT_GREETING
        self._want_tls = tls
        self.tls = False  # the transport is encrypted (``tls_started`` was called)
        self._want_structured = structured
        self._want_meta = block_status
        self.structured = False
        self.meta_context_id: int | None = None
        self._rx = ReceiveBuffer()
        self._out: list[bytes | memoryview] = []
        self._opts: list[int] = []  # options sent, awaiting their final reply
        self._info: dict[str, int] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_cookie = 1
        self._closed: Closed | None = None

    # --- plumbing ----------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if not data:
            if self.phase is not Phase.CLOSED:
                self._close("server closed the connection")
            return
        if self.phase is Phase.TLS_HANDSHAKE:
            self._close("server sent plain data after acknowledging NBD_OPT_STARTTLS")
            return
        self._rx.feed(data)

    def data_to_send(self) -> list[bytes | memoryview]:
        out, self._out = self._out, []
        return out

    def _go(self, trigger: str) -> None:
        self.phase = advance("client", CLIENT_TRANSITIONS, self.phase, trigger)

    def _close(self, reason: str) -> Closed:
        self._go("close")
        self._closed = Closed(reason, clean=False)
        self._rx.clear()
        return self._closed

    def _option(self, opt: Opt, payload: bytes = b"") -> None:
        self._out.append(wire.option(opt, payload))
        self._opts.append(opt)

    # --- events ------------------------------------------------------------------------------
    def next_event(self) -> object:
        if self.phase is Phase.CLOSED:
            assert self._closed is not None
            return self._closed
        if self.phase is Phase.AWAIT_GREETING:
            return self._greeting()
        if self.phase is Phase.OPTIONS:
            return self._option_reply()
        if self.phase is Phase.TLS_HANDSHAKE:
            raise ProtocolStateError("upgrade to TLS and call tls_started before asking for events")
        return self._reply()

    def _greeting(self) -> object:
        greeting = self._rx.peek(wire.GREETING)
        if greeting is None:
            return NEED_DATA
        self._rx.skip(wire.GREETING.size)
        magic, opt_magic, flags = greeting
        if magic != c.NBDMAGIC or opt_magic != c.IHAVEOPT:
            return self._close("not a newstyle NBD server")
        if not flags & c.HandshakeFlag.FIXED_NEWSTYLE:
            return self._close("server does not speak fixed newstyle")
        client = c.ClientFlag.C_FIXED_NEWSTYLE
        if flags & c.HandshakeFlag.NO_ZEROES:
            client |= c.ClientFlag.C_NO_ZEROES
        self._out.append(wire.CLIENT_FLAGS.pack(client))
        self._go("greeting")
        if self._want_tls:
            self._option(Opt.STARTTLS)
        else:
            self._negotiate()
        return self.next_event()

    def _negotiate(self) -> None:
        if self._want_structured:
            self._option(Opt.STRUCTURED_REPLY)
        else:
            self._send_go()

    def tls_started(self) -> None:
        """The transport is now encrypted: negotiate the export inside TLS."""
        self._go("tls-started")
        self.tls = True
        self._info.clear()  # nothing read in plain text may outlive it
        self.meta_context_id = None
        self.structured = False
        self._negotiate()

    def _send_meta(self) -> None:
        self._option(Opt.SET_META_CONTEXT, wire.meta_request(self.export, [c.BASE_ALLOCATION]))

    def _send_go(self) -> None:
        self._option(Opt.GO, wire.info_request(self.export, [Info.BLOCK_SIZE]))

    def _option_reply(self) -> object:
        while True:
            header = self._rx.peek(wire.OPTION_REPLY_HEADER)
            if header is None:
                return NEED_DATA
            magic, opt, rep, length = header
            if magic != c.OPTION_REPLY_MAGIC:
                return self._close("bad option reply magic")
            if length > c.MAX_OPTION_LENGTH:
                return self._close("option reply too long")
            if len(self._rx) < wire.OPTION_REPLY_HEADER.size + length:
                return NEED_DATA
            self._rx.skip(wire.OPTION_REPLY_HEADER.size)
            payload = self._rx.take(length) or b""
            if not self._opts or opt != self._opts[0]:
                return self._close(f"reply to option {opt} that was not asked")
            event = self._handle_option_reply(opt, rep, payload)
            if event is not None:
                return event

    def _handle_option_reply(self, opt: int, rep: int, payload: bytes) -> object | None:
        if opt == Opt.STARTTLS and rep != Rep.ACK and not rep & c.REP_ERR_BIT:
            # only the ACK (or an error) may answer STARTTLS: anything else in plain text
            # could be an attacker's, meant to survive into the TLS session
            name = Rep(rep).name if rep in Rep._value2member_map_ else hex(rep)
            return self._close(f"server answered NBD_OPT_STARTTLS with {name}, not an ACK")
        if rep & c.REP_ERR_BIT:
            self._opts.pop(0)
            message = payload.decode("utf-8", "replace")
            name = Rep(rep).name if rep in Rep._value2member_map_ else hex(rep)
            if opt == Opt.STARTTLS:
                failed = HandshakeFailed(f"server refused TLS: {message or name}")
                self._close(failed.reason)
                return failed
            if opt == Opt.GO:
                failed = HandshakeFailed(f"server refused export {self.shown!r}: {message or name}")
                self._close(failed.reason)
                return failed
            # structured replies or meta contexts refused: go on without them
            if opt == Opt.STRUCTURED_REPLY or opt == Opt.SET_META_CONTEXT:
                self._send_go()
            return None
        if rep == Rep.ACK:
            self._opts.pop(0)
            if opt == Opt.STARTTLS:
                if len(self._rx):  # the handshake's bytes must not be read as plain text
                    return self._close("server sent data after acknowledging NBD_OPT_STARTTLS")
                self._go("starttls")
                return StartTls()
            if opt == Opt.STRUCTURED_REPLY:
                self.structured = True
                if self._want_meta:
                    self._send_meta()
                else:
                    self._send_go()
            elif opt == Opt.SET_META_CONTEXT:
                self._send_go()
            elif opt == Opt.GO:
                if "size" not in self._info:
                    return self._close("server sent no NBD_INFO_EXPORT")
                self._go("go")
                return Ready(
                    size=self._info["size"],
                    flags=self._info["flags"],
                    min_block=self._info.get("min", 1),
                    preferred_block=self._info.get("pref", 4096),
                    max_block=min(self._info.get("max", c.MAX_PAYLOAD), c.MAX_PAYLOAD),
                    meta_context_id=self.meta_context_id,
                )
            return None
        if rep == Rep.META_CONTEXT:
            context = wire.parse_meta_context(payload)
            if context is not None and context[1] == c.BASE_ALLOCATION:
                self.meta_context_id = context[0]
            return None
        if rep == Rep.INFO:
            info = wire.parse_info(payload)
            if info is not None and info[0] == Info.EXPORT:
                self._info["size"], self._info["flags"] = info[1]
            elif info is not None and info[0] == Info.BLOCK_SIZE:
                self._info["min"], self._info["pref"], self._info["max"] = info[1]
            return None
        return None  # informational replies we do not use

    # --- transmission ------------------------------------------------------------------------
    def request(
        self, cmd: Cmd, offset: int, length: int, flags: int = 0, data: bytes | memoryview = b""
    ) -> int:
        if self.phase is not Phase.TRANSMISSION:
            raise ProtocolStateError(f"client connection: cannot send requests in phase {self.phase.value}")
        cookie = self._next_cookie
        self._next_cookie += 1
        self._out.append(wire.request(cmd, cookie, offset, length, flags))
        if cmd == Cmd.WRITE:
            self._out.append(data)
        if cmd == Cmd.DISC:
            return cookie
        reply = Reply(cookie, data=bytearray(length) if cmd == Cmd.READ else None)
        self._pending[cookie] = _Pending(cmd, offset, length, reply)
        return cookie

    def _reply(self) -> object:
        while True:  # a loop, not recursion: a read may come in thousands of chunks
            got = self._rx.peek(wire.REPLY_MAGIC)
            if got is None:
                return NEED_DATA
            (magic,) = got
            if magic == c.SIMPLE_REPLY_MAGIC:
                return self._simple()
            if magic == c.STRUCTURED_REPLY_MAGIC and self.structured:
                event = self._structured()
                if event is None:  # a chunk that is not the last one
                    continue
                return event
            return self._close(f"bad reply magic {magic:#x}")

    def _simple(self) -> object:
        header = self._rx.peek(wire.SIMPLE_REPLY)
        if header is None:
            return NEED_DATA
        _, error, cookie = header
        pending = self._pending.get(cookie)
        if pending is None:
            return self._close(f"reply for unknown cookie {cookie}")
        need = pending.length if pending.cmd == Cmd.READ and not error else 0
        if pending.cmd == Cmd.READ and self.structured:
            return self._close("simple reply to a read with structured replies on")
        if len(self._rx) < wire.SIMPLE_REPLY.size + need:
            return NEED_DATA
        self._rx.skip(wire.SIMPLE_REPLY.size)
        reply = pending.reply
        if need:
            assert reply.data is not None
            self._rx.take_into(reply.data, 0, need)
        reply.error = error
        del self._pending[cookie]
        return reply

    def _structured(self) -> object | None:
        header = self._rx.peek(wire.STRUCTURED_REPLY)
        if header is None:
            return NEED_DATA
        _, flags, rtype, cookie, length = header
        if len(self._rx) < wire.STRUCTURED_REPLY.size + length:
            return NEED_DATA
        pending = self._pending.get(cookie)
        if pending is None:
            return self._close(f"reply for unknown cookie {cookie}")
        self._rx.skip(wire.STRUCTURED_REPLY.size)
        payload = memoryview(self._rx.take(length) or b"")
        reply = pending.reply
        problem = self._chunk(pending, rtype, payload)
        if problem:
            return self._close(problem)
        if not flags & ReplyFlag.DONE:
            return None
        if pending.cmd == Cmd.READ and not reply.error and pending.covered != pending.length:
            return self._close(f"read reply covers {pending.covered} of {pending.length} bytes")
        del self._pending[cookie]
        return reply

    def _chunk(self, p: _Pending, rtype: int, payload: memoryview) -> str | None:
        reply = p.reply
        if rtype == ReplyType.NONE:
            return None
        if rtype in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            parsed = wire.parse_error(payload)
            if isinstance(parsed, str):
                return parsed
            reply.error = parsed[0] or c.Errno.EIO
            reply.message = parsed[1]
            return None
        if rtype == ReplyType.OFFSET_DATA and p.cmd == Cmd.READ:
            if len(payload) < wire.OFFSET.size:
                return "short read data chunk"
            (off,) = wire.OFFSET.unpack_from(payload)
            n = len(payload) - wire.OFFSET.size
            if off < p.offset or off + n > p.offset + p.length:
                return "read data outside the request"
            assert reply.data is not None
            reply.data[off - p.offset : off - p.offset + n] = payload[wire.OFFSET.size :]
            p.covered += n
            return None
        if rtype == ReplyType.OFFSET_HOLE and p.cmd == Cmd.READ:
            if len(payload) != wire.HOLE_CHUNK.size:
                short = len(payload) < wire.HOLE_CHUNK.size
                return "short read hole chunk" if short else "long read hole chunk"
            off, n = wire.HOLE_CHUNK.unpack_from(payload)
            if off < p.offset or off + n > p.offset + p.length:
                return "read hole outside the request"
            p.covered += n
            return None  # the buffer starts zeroed
        if rtype == ReplyType.BLOCK_STATUS and p.cmd == Cmd.BLOCK_STATUS:
            status = wire.parse_block_status(payload)
            if isinstance(status, str):
                return status
            reply.extents.extend(status[1])
            return None
        return f"unexpected reply chunk type {rtype} to {p.cmd.name}"

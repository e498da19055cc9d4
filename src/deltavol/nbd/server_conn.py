"""Sans-I/O server side of one NBD connection.

Theory of operation
-------------------
Bytes from the peer go in with ``receive_data``; ``next_event`` turns them into events
(or ``NEED_DATA``); the application answers through the ``reply_*`` / ``send_*`` methods,
which queue bytes that ``data_to_send`` hands back to whoever owns the socket. Nothing
here touches a socket, a file or a clock.

The phases and their legal transitions are in ``state.py``; anything else is a bug in
the caller and raises ``ProtocolStateError``. A peer that breaks a MUST of the spec gets a
``Closed`` event (a hard disconnect); a peer that sends a request we merely refuse gets a
``BadRequest`` the application must answer with an error reply.

A WRITE whose payload is too large to accept is refused, but its payload is still read
and dropped (``_discard``) so that the stream stays in step and the client can go on.

Bytes can also be received in place (``get_buffer`` / ``buffer_updated``, the shape of
``asyncio.BufferedProtocol``): into the receive buffer, or, once the header of a WRITE of
``DIRECT_PAYLOAD`` bytes or more has been parsed and its payload is not all here, into a
``bytearray`` of the payload's size that becomes the request's ``data``. Such a payload is
copied only by the kernel's receive. The buffer comes from a ``PayloadPool``: one of the
same size received into before, once nothing (request, write job, view) refers to it any
more, so a stream of 1 MiB writes costs no allocation, memset or page fault per write. A
28-byte header must not buy 32 MiB of memory: the WRITE's flags and range are checked
first (a bad one is discarded as it arrives), and the sinks of all connections together
draw on one ``SinkBudget``; a payload that does not fit in it is received through the
receive buffer, which grows only with the bytes that came.

Flag checks mask with plain ints: ``~`` on an ``enum.IntFlag`` only inverts the bits the
enum defines, so ``flags & ~KnownFlags`` would never see an unknown bit.

Metadata contexts follow the spec's two rules: every NBD_OPT_SET_META_CONTEXT replaces the
selection (even one that fails), and the selection only counts if it was made for the
export name the client finally picks with NBD_OPT_GO / NBD_OPT_EXPORT_NAME.

TLS (``tls_mode``): OFF refuses NBD_OPT_STARTTLS with NBD_REP_ERR_POLICY. ON and REQUIRE
acknowledge it and hand the application a ``StartTls`` event: it must upgrade the
transport and call ``tls_started`` before asking for the next event. Bytes the client
sent after STARTTLS in the same breath (already buffered when the option is parsed, or fed
before ``tls_started``) would be read as plain text: that is a protocol violation and
closes the connection. After the upgrade nothing negotiated before it counts (structured
replies, meta contexts), and a second STARTTLS gets NBD_REP_ERR_INVALID. REQUIRE answers
every option but STARTTLS and ABORT with NBD_REP_ERR_TLS_REQD until TLS is up, and closes
on NBD_OPT_EXPORT_NAME (it cannot carry an error). ON is the spec's SELECTIVETLS mode
with no TLS-only export: plain and TLS clients are both served.
"""

from __future__ import annotations

from typing import TypeVar

from deltavol.nbd import constants as c
from deltavol.nbd import wire
from deltavol.nbd.buffer import PayloadPool, ReceiveBuffer
from deltavol.nbd.constants import Cmd, CmdFlag, Errno, Info, Opt, Rep, ReplyFlag, ReplyType, TlsMode
from deltavol.nbd.events import (
    NEED_DATA,
    BadRequest,
    Closed,
    Event,
    ExportInfo,
    OptExportName,
    OptInfo,
    OptList,
    OptMetaContext,
    Request,
    StartTls,
)
from deltavol.nbd.state import SERVER_TRANSITIONS, ProtocolStateError, advance
from deltavol.nbd.state import ServerPhase as Phase

__all__ = ["BASE_ALLOCATION_ID", "Phase", "ProtocolStateError", "ServerConnection"]

BASE_ALLOCATION_ID = 1  # the one meta context this server offers
_COMMANDS = {int(cmd): cmd for cmd in Cmd}  # a dict lookup; ``Cmd(n)`` costs much more per request
_STRUCTURED_MAGIC, _DONE, _OFFSET_DATA = (
    c.STRUCTURED_REPLY_MAGIC,
    int(ReplyFlag.DONE),
    int(ReplyType.OFFSET_DATA),
)
# per-request constants as module globals: an attribute of an enum or module costs more
_TRANSMISSION = Phase.TRANSMISSION
_REQUEST, _REQUEST_MAGIC, _WRITE = wire.REQUEST, c.REQUEST_MAGIC, int(Cmd.WRITE)
_READ, _DISC, _BLOCK_STATUS = Cmd.READ, Cmd.DISC, Cmd.BLOCK_STATUS
DIRECT_PAYLOAD = 64 * 1024  # a WRITE payload this large, not yet all here, is received in place
# What one receive may fill: in transmission many requests at once (the buffer settles at
# twice this); before it a few KiB, so a client that never finishes the handshake holds little.
RECEIVE_SPACE = 128 * 1024
HANDSHAKE_SPACE = 4 * 1024
SINK_BUDGET = 128 << 20  # bytes of payload sinks all connections may hold at once
_Opt = TypeVar("_Opt", OptExportName, OptInfo, OptList, OptMetaContext)


class SinkBudget:
    """How many bytes of WRITE payload sinks the connections sharing it may hold."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int = SINK_BUDGET) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


_SINKS = SinkBudget()  # the process-wide default
_PAYLOADS = PayloadPool()  # the process-wide default


class ServerConnection:
    def __init__(
        self,
        *,
        max_payload: int = c.MAX_PAYLOAD,
        tls_mode: TlsMode = TlsMode.OFF,
        sink_budget: SinkBudget | None = None,
        payload_pool: PayloadPool | None = None,
    ) -> None:
        self.phase = Phase.AWAIT_CLIENT_FLAGS
        self.max_payload = max_payload
        self.tls_mode = tls_mode
        self.tls = False  # the transport is encrypted (``tls_started`` was called)
        self.fixed_newstyle = False
        self.structured_replies = False
        self.no_zeroes = False
        self.export: ExportInfo | None = None
        self._allowed: dict[Cmd, int] = {}  # command flags accepted, per command, for ``export``
        self.meta_contexts: frozenset[int] = frozenset()  # ids selected by SET_META_CONTEXT
        self._rx = ReceiveBuffer(HANDSHAKE_SPACE)
        self._out: list[bytes | memoryview] = []
        self._pending: OptExportName | OptInfo | OptList | OptMetaContext | None = None
        self._meta_export: str | None = None  # export named by the last SET_META_CONTEXT
        self._closed: Closed | None = None
        self._discard = 0  # payload bytes still to drop after a refused WRITE
        self._discarded_event: BadRequest | None = None
        self._head: tuple[int, int, int, int, int, int] | None = None  # a WRITE awaiting payload
        self._sink: bytearray | None = None  # where a large WRITE's payload is received
        self._sink_got = 0
        self._into_sink = False  # the view ``get_buffer`` handed out last is of ``_sink``
        self._header_next = False  # a payload was just received in place: receive a header
        self._budget = _SINKS if sink_budget is None else sink_budget
        self._pool = _PAYLOADS if payload_pool is None else payload_pool
        self._eof = False
        self._out.append(
            wire.GREETING.pack(
                c.NBDMAGIC, c.IHAVEOPT, c.HandshakeFlag.FIXED_NEWSTYLE | c.HandshakeFlag.NO_ZEROES
            )
        )

    # --- plumbing --------------------------------------------------------------------------
    def _go(self, trigger: str) -> None:
        self.phase = advance("server", SERVER_TRANSITIONS, self.phase, trigger)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self.phase is Phase.CLOSED:
            return  # nothing more will be parsed; do not hold on to it
        if self.phase is Phase.TLS_HANDSHAKE:
            self._close("client sent plain data after NBD_OPT_STARTTLS")
            return
        sink = self._sink
        if sink is not None and self._sink_got < len(sink):
            got = self._sink_got
            n = min(len(sink) - got, len(data))
            sink[got : got + n] = memoryview(data)[:n]
            self._sink_got = got + n
            if n < len(data):
                self._rx.feed(memoryview(data)[n:])
            return
        self._rx.feed(data)

    def get_buffer(self) -> memoryview:
        """Where the next bytes from the peer may be received in place (for
        ``asyncio.BufferedProtocol``); say how many came with ``buffer_updated``. The
        payload of a large WRITE is received straight into the buffer its request carries."""
        sink = self._sink
        if sink is not None and self._sink_got < len(sink):
            self._into_sink = True
            return memoryview(sink)[self._sink_got :]
        self._into_sink = False
        if self.phase is _TRANSMISSION:
            if self._header_next and (want := _REQUEST.size - len(self._rx)) > 0:
                # After a payload received in place, only the next header: if it is
                # another large WRITE's, its payload goes straight into its own buffer
                # rather than partly here and then copied there.
                return self._rx.space(RECEIVE_SPACE)[:want]
            return self._rx.space(RECEIVE_SPACE)
        return self._rx.space(HANDSHAKE_SPACE)

    def buffer_updated(self, n: int) -> bool:
        """``n`` bytes were received into the view ``get_buffer`` handed out last. False
        when they only went into a WRITE payload that is still not whole: ``next_event``
        would say ``NEED_DATA`` (a 1 MiB payload comes in several receives)."""
        if self._into_sink:
            got = self._sink_got = self._sink_got + n
            sink = self._sink
            return sink is None or got >= len(sink)  # None: dropped since, parse to see
        if self.phase is Phase.CLOSED:
            return True  # as ``receive_data``: nothing more will be parsed
        if self.phase is Phase.TLS_HANDSHAKE:
            self._close("client sent plain data after NBD_OPT_STARTTLS")
            return True
        self._rx.wrote(n)
        return True

    def data_to_send(self) -> list[bytes | memoryview]:
        out, self._out = self._out, []
        return out

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as events (a request's header included
        while its payload is still coming)."""
        if self._head is None:
            return len(self._rx)
        return len(self._rx) + wire.REQUEST.size + self._sink_got

    def drop_payload(self) -> None:
        """Let go of a WRITE payload still being received (the transport is gone)."""
        sink, self._sink, self._sink_got = self._sink, None, 0
        if sink is not None:
            self._budget.give(len(sink))

    def _close(self, reason: str, clean: bool = False) -> Closed:
        self.drop_payload()
        self._go("close")
        self._closed = Closed(reason, clean)
        return self._closed

    # --- events ------------------------------------------------------------------------------
    def next_event(self) -> Event | object:
        phase = self.phase
        if phase is _TRANSMISSION and not self._eof:  # the one case per request: tested first
            return self._request()
        if phase is Phase.CLOSED:
            assert self._closed is not None
            return self._closed
        if self.phase is Phase.OPTION_PENDING:
            raise ProtocolStateError("reply to the pending option before asking for events")
        if self.phase is Phase.TLS_HANDSHAKE:
            raise ProtocolStateError("upgrade to TLS and call tls_started before asking for events")
        if self.phase is Phase.AWAIT_CLIENT_FLAGS:
            event = self._client_flags()
        elif self.phase is Phase.OPTIONS:
            event = self._option()
        else:
            event = self._request()
        if event is NEED_DATA and self._eof:
            clean = self.phase is Phase.TRANSMISSION and self.buffered == 0 and not self._discard
            return self._close("peer closed the connection", clean=clean)
        return event

    def _client_flags(self) -> Event | object:
        got = self._rx.peek(wire.CLIENT_FLAGS)
        if got is None:
            return NEED_DATA
        self._rx.skip(wire.CLIENT_FLAGS.size)
        (flags,) = got
        known = int(c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES)
        if flags & ~known:
            return self._close(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & c.ClientFlag.C_NO_ZEROES)
        self.fixed_newstyle = bool(flags & c.ClientFlag.C_FIXED_NEWSTYLE)
        if self.tls_mode is TlsMode.REQUIRE and not self.fixed_newstyle:
            return self._close("TLS is required, and the client does not speak fixed newstyle")
        self._go("client-flags")
        return self._option()

    def _option(self) -> Event | object:
        while True:
            header = self._rx.peek(wire.OPTION_HEADER)
            if header is None:
                return NEED_DATA
            magic, opt, length = header
            if magic != c.IHAVEOPT:
                return self._close(f"bad option magic {magic:#x}")
            if length > c.MAX_OPTION_LENGTH:
                return self._close(f"option {opt} payload of {length} bytes is too long")
            if len(self._rx) < wire.OPTION_HEADER.size + length:
                return NEED_DATA
            self._rx.skip(wire.OPTION_HEADER.size)
            payload = self._rx.take(length) or b""
            if self.tls_mode is TlsMode.REQUIRE and not self.tls and opt not in (Opt.STARTTLS, Opt.ABORT):
                if opt == Opt.EXPORT_NAME:  # it cannot carry an error: the spec says disconnect
                    return self._close("NBD_OPT_EXPORT_NAME before TLS, which this server requires")
                self._option_reply(opt, Rep.ERR_TLS_REQD, b"TLS is required: send NBD_OPT_STARTTLS first")
                continue
            event = self._parse_option(opt, payload)
            if event is not None:
                return event

    def _parse_option(self, opt: int, data: bytes) -> Event | None:
        """Answer protocol-only options here; return an event for the rest."""
        try:
            option = Opt(opt)
        except ValueError:
            self._option_reply(opt, Rep.ERR_UNSUP, f"option {opt} is not supported".encode())
            return None
        if option is Opt.EXPORT_NAME:
            return self._ask(OptExportName(data.decode("utf-8", "replace")))
        if option is Opt.ABORT:
            self._option_reply(opt, Rep.ACK)
            return self._close("client sent NBD_OPT_ABORT", clean=True)
        if option is Opt.LIST:
            if data:
                return self._invalid(opt, "NBD_OPT_LIST takes no data")
            return self._ask(OptList())
        if option is Opt.STARTTLS:
            return self._starttls(data)
        if option is Opt.STRUCTURED_REPLY:
            if data:
                return self._invalid(opt, "NBD_OPT_STRUCTURED_REPLY takes no data")
            if self.structured_replies:
                return self._invalid(opt, "structured replies are already negotiated")
            self.structured_replies = True
            self._option_reply(opt, Rep.ACK)
            return None
        if option in (Opt.INFO, Opt.GO):
            parsed = wire.parse_info_request(data)
            if isinstance(parsed, str):
                return self._invalid(opt, parsed)
            return self._ask(OptInfo(parsed[0], parsed[1], go=option is Opt.GO))
        if option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            if option is Opt.SET_META_CONTEXT:
                # Replaces the selection even when it fails.
                self.meta_contexts = frozenset()
                self._meta_export = None
                if not self.structured_replies:
                    return self._invalid(opt, "negotiate structured replies first")
            parsed_meta = wire.parse_meta_request(data)
            if isinstance(parsed_meta, str):
                return self._invalid(opt, parsed_meta)
            return self._ask(OptMetaContext(*parsed_meta, set=option is Opt.SET_META_CONTEXT))
        self._option_reply(opt, Rep.ERR_UNSUP, f"{option.name} is not supported".encode())
        return None

    def _starttls(self, data: bytes) -> Event | None:
        opt = Opt.STARTTLS
        if self.tls_mode is TlsMode.OFF or not self.fixed_newstyle:
            self._option_reply(opt, Rep.ERR_POLICY, b"TLS is not offered by this server")
            return None
        if self.tls:
            return self._invalid(opt, "TLS is already active")
        if data:
            return self._invalid(opt, "NBD_OPT_STARTTLS takes no data")
        if self.buffered:  # sent before our ACK: it would be taken for plain-text options
            return self._close("client sent data after NBD_OPT_STARTTLS before the TLS handshake")
        self._option_reply(opt, Rep.ACK)
        self._go("starttls")
        return StartTls()

    def tls_started(self) -> None:
        """The transport is now encrypted: option haggling starts afresh (the spec: nothing
        negotiated before STARTTLS is kept)."""
        self._go("tls-started")
        self.tls = True
        self.structured_replies = False
        self.meta_contexts = frozenset()
        self._meta_export = None

    def _ask(self, event: OptExportName | OptInfo | OptList | OptMetaContext) -> Event:
        """Hand an option to the application, which owes an answer before the next event."""
        self._pending = event
        self._go("app-option")
        return event

    def _invalid(self, opt: int, why: str) -> Event | None:
        """Refuse ``opt`` with NBD_REP_ERR_INVALID; no event (for ``return self._invalid()``)."""
        self._option_reply(opt, Rep.ERR_INVALID, why.encode())
        return None

    def _option_reply(self, opt: int, rep: int, payload: bytes = b"") -> None:
        self._out.append(wire.option_reply(opt, rep, len(payload)))
        if payload:
            self._out.append(payload)

    def _request(self) -> Event | object:
        rx = self._rx
        if self._discard:
            n = min(self._discard, len(rx))
            rx.skip(n)
            self._discard -= n
            if self._discard:
                return NEED_DATA
            event, self._discarded_event = self._discarded_event, None
            return event
        head = self._head
        if head is None:
            head = rx.unpack(_REQUEST)
            if head is None:
                return NEED_DATA
            self._header_next = False
            magic, flags, cmd, cookie, offset, length = head
            if magic != _REQUEST_MAGIC:
                return self._close(f"bad request magic {magic:#x}")
            if cmd != _WRITE:
                data: bytes | bytearray = b""
            elif (why := self._bad_write(flags, offset, length)) is not None:
                self._discard = length  # checked before any memory is set aside for it
                self._discarded_event = BadRequest(cookie, cmd, Errno.EINVAL, why)
                return self._request()
            elif len(rx) >= length:
                data = rx.take(length)  # type: ignore[assignment]  # there: never None
            else:
                self._head = head
                if length >= DIRECT_PAYLOAD and self._budget.take(length):
                    self._sink = self._pool.get(length)
                    self._sink_got = len(rx)
                    rx.take_into(self._sink, 0, len(rx))
                return NEED_DATA
        else:  # a WRITE whose payload was still coming
            magic, flags, cmd, cookie, offset, length = head
            sink = self._sink
            if sink is not None:
                if self._sink_got < length:
                    return NEED_DATA
                data, self._sink, self._sink_got = sink, None, 0
                self._header_next = True
                self._budget.give(length)
            else:
                taken = rx.take(length)
                if taken is None:
                    return NEED_DATA
                data = taken
            self._head = None
        command = _COMMANDS.get(cmd)
        if command is None:
            return BadRequest(cookie, cmd, Errno.EINVAL, f"unknown command {cmd}")
        if flags & ~self._allowed[command] or command is _DISC:
            if command is _DISC:
                return self._close("client sent NBD_CMD_DISC", clean=True)
            why = f"flags {flags:#x} not valid for {command.name}"
            return BadRequest(cookie, cmd, Errno.EINVAL, why)
        if command is _READ and length > self.max_payload:
            why = f"read of {length} bytes exceeds the maximum"
            return BadRequest(cookie, cmd, Errno.EINVAL, why)
        if command is _BLOCK_STATUS and not self.meta_contexts:
            return BadRequest(cookie, cmd, Errno.EINVAL, "no meta context was negotiated")
        return Request(cookie, command, flags, offset, length, data)

    def _bad_write(self, flags: int, offset: int, length: int) -> str | None:
        """Why a WRITE with this header is refused before its payload is read, or None. The
        range of a small one is left to the application (as for every other command); a
        large one's is checked here, before memory is set aside for its payload."""
        if length > self.max_payload:
            return f"write of {length} bytes exceeds the maximum"
        if flags & ~self._allowed[Cmd.WRITE]:
            return f"flags {flags:#x} not valid for WRITE"
        export = self.export
        if length >= DIRECT_PAYLOAD and export is not None and offset + length > export.size:
            return f"write {offset}+{length} is beyond the end of the export ({export.size} bytes)"
        return None

    # --- answers to option events ----------------------------------------------------------
    def _answered(self, expected: type[_Opt]) -> _Opt:
        pending = self._pending
        if self.phase is not Phase.OPTION_PENDING or pending is None:
            raise ProtocolStateError(f"no option is pending (phase {self.phase.value})")
        if not isinstance(pending, expected):
            raise ProtocolStateError(f"pending option is {type(pending).__name__}")
        self._pending = None
        return pending

    def _enter_transmission(self, name: str, export: ExportInfo) -> None:
        self.export = export
        fua = int(CmdFlag.FUA) if export.flags & c.TransmissionFlag.SEND_FUA else 0
        # spec: with SEND_FUA advertised, FUA MUST be accepted on every command
        self._allowed = {cmd: int(flags) | fua for cmd, flags in c.ALLOWED_CMD_FLAGS.items()}
        if not self._wire_flags(export) & c.TransmissionFlag.SEND_DF:
            self._allowed[Cmd.READ] &= ~int(CmdFlag.DF)  # DF was not advertised: EINVAL
        self.max_payload = min(self.max_payload, export.max_block)
        if name != self._meta_export:  # contexts were selected for another export
            self.meta_contexts = frozenset()
        self._go("go")

    def _wire_flags(self, export: ExportInfo) -> int:
        """The export's transmission flags as this connection may advertise them: the spec
        says NBD_FLAG_SEND_DF MUST be clear unless structured replies were negotiated."""
        if self.structured_replies:
            return export.flags
        return export.flags & ~int(c.TransmissionFlag.SEND_DF)

    def accept_export(self, export: ExportInfo) -> None:
        """Answer NBD_OPT_EXPORT_NAME: enter transmission with ``export``."""
        event = self._answered(OptExportName)
        self._out.append(wire.export_name_reply(export.size, self._wire_flags(export), self.no_zeroes))
        self._enter_transmission(event.name, export)

    def refuse_export_name(self, reason: str) -> Closed:
        """NBD_OPT_EXPORT_NAME cannot carry an error: the spec asks for a hard disconnect."""
        self._answered(OptExportName)
        return self._close(reason)

    def reply_list(self, names: list[str]) -> None:
        self._answered(OptList)
        for name in names:
            self._option_reply(Opt.LIST, Rep.SERVER, wire.server_entry(name))
        self._option_reply(Opt.LIST, Rep.ACK)
        self._go("replied")

    def reply_info(self, export: ExportInfo | None, error: str = "", refusal: Rep = Rep.ERR_UNKNOWN) -> None:
        """Answer NBD_OPT_INFO/GO; ``export=None`` refuses with ``refusal`` and ``error``."""
        event = self._answered(OptInfo)
        opt = Opt.GO if event.go else Opt.INFO
        if export is None:
            self._option_reply(opt, refusal, wire.message(error))
            self._go("replied")
            return
        wanted = set(event.requests)
        self._option_reply(opt, Rep.INFO, wire.info_export(export.size, self._wire_flags(export)))
        if Info.NAME in wanted:
            self._option_reply(opt, Rep.INFO, wire.info_text(Info.NAME, export.name))
        if Info.DESCRIPTION in wanted and export.description:
            self._option_reply(opt, Rep.INFO, wire.info_text(Info.DESCRIPTION, export.description))
        block_size = wire.info_block_size(export.min_block, export.preferred_block, export.max_block)
        self._option_reply(opt, Rep.INFO, block_size)
        self._option_reply(opt, Rep.ACK)
        if opt is Opt.GO:
            self._enter_transmission(event.name, export)
        else:
            self._go("replied")

    def reply_meta_context(self, export_exists: bool, error: str = "") -> None:
        """Answer LIST/SET_META_CONTEXT; only ``base:allocation`` is offered."""
        event = self._answered(OptMetaContext)
        opt = Opt.SET_META_CONTEXT if event.set else Opt.LIST_META_CONTEXT
        if not export_exists:
            self._option_reply(opt, Rep.ERR_UNKNOWN, wire.message(error))
            self._go("replied")
            return
        listing = not event.set
        queries = event.queries
        match = any(q == c.BASE_ALLOCATION or (listing and q in ("base:", "")) for q in queries) or (
            listing and not queries
        )
        if match:
            # The id in LIST replies is reserved and SHOULD be zero.
            context_id = 0 if listing else BASE_ALLOCATION_ID
            self._option_reply(opt, Rep.META_CONTEXT, wire.meta_context(context_id, c.BASE_ALLOCATION))
        if event.set and match:
            self.meta_contexts = frozenset({BASE_ALLOCATION_ID})
            self._meta_export = event.name
        self._option_reply(opt, Rep.ACK)
        self._go("replied")

    # --- transmission replies --------------------------------------------------------------
    def _replying(self) -> None:
        """Replies are legal once transmission began, and after a close (for requests still
        in flight when NBD_CMD_DISC arrived), but never during the handshake."""
        if self.export is None:
            raise ProtocolStateError(f"no transmission reply is possible in phase {self.phase.value}")

    def send_ok(self, cookie: int) -> None:
        """Success for a command without reply data (simple replies are allowed for these)."""
        self._replying()
        # the one reply of most writes: the Struct straight, without wire.simple_reply's call
        self._out.append(wire.SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, 0, cookie))

    def send_error(self, cookie: int, errno: int, message: str = "") -> None:
        self._replying()
        if self.structured_replies:
            payload = wire.error_payload(errno, message)
            self._out.append(wire.chunk(ReplyFlag.DONE, ReplyType.ERROR, cookie, len(payload)))
            self._out.append(payload)
        else:
            self._out.append(wire.simple_reply(cookie, errno))

    def send_read(self, cookie: int, offset: int, pieces: list[tuple[int, bytes | None]]) -> None:
        """Reply to a READ with ``pieces``: (length, data) in order; data None means a hole.

        With simple replies holes are sent as zeroes; with structured replies as
        NBD_REPLY_TYPE_OFFSET_HOLE chunks.
        """
        self._replying()
        if len(pieces) == 1 and self.structured_replies:
            length, data = pieces[0]
            if data is not None and length:  # the common read: one chunk, its header in one pack
                self._out.append(
                    wire.DATA_CHUNK.pack(_STRUCTURED_MAGIC, _DONE, _OFFSET_DATA, cookie, 8 + length, offset)
                )
                self._out.append(data)
                return
        if not self.structured_replies:
            self._out.append(wire.simple_reply(cookie))
            for length, data in pieces:
                self._out.append(data if data is not None else bytes(length))
            return
        # A chunk describes at least one byte (OFFSET_DATA is at least 9 bytes long): empty
        # pieces send nothing, and a read with nothing to send gets a final NONE chunk.
        pieces = [piece for piece in pieces if piece[0]]
        last = len(pieces) - 1
        for i, (length, data) in enumerate(pieces):
            flags = ReplyFlag.DONE if i == last else 0
            if data is None:
                hole = wire.hole_payload(offset, length)
                self._out.append(wire.chunk(flags, ReplyType.OFFSET_HOLE, cookie, len(hole)) + hole)
            else:
                size = wire.OFFSET.size + length
                header = wire.chunk(flags, ReplyType.OFFSET_DATA, cookie, size) + wire.OFFSET.pack(offset)
                self._out.append(header)
                self._out.append(data)
            offset += length
        if last < 0:
            self._out.append(wire.chunk(ReplyFlag.DONE, ReplyType.NONE, cookie, 0))

    def send_block_status(self, cookie: int, extents: list[tuple[int, int]]) -> None:
        """Reply to BLOCK_STATUS with (length, flags) descriptors for base:allocation."""
        self._replying()
        if BASE_ALLOCATION_ID not in self.meta_contexts:
            raise ProtocolStateError("block status reply without a negotiated meta context")
        payload = wire.block_status_payload(BASE_ALLOCATION_ID, extents)
        self._out.append(wire.chunk(ReplyFlag.DONE, ReplyType.BLOCK_STATUS, cookie, len(payload)))
        self._out.append(payload)

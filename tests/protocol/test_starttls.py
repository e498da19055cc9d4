"""NBD_OPT_STARTTLS, sans-I/O: the server against hand-built client bytes (as the spec's
"TLS support" section words each rule), then the real client against the real server.

The TLS layer itself is not here: ``tls_started`` stands for "the transport is now
encrypted", as the asyncio layer calls it after its handshake.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire import (
    C_FIXED_NEWSTYLE,
    C_NO_ZEROES,
    client_flags,
    events_until_need_data,
    feed,
    info_data,
    meta_data,
    option,
    option_replies,
    request,
    sent,
)

from deltavol.nbd.client_conn import ClientConnection, HandshakeFailed, Ready, Reply
from deltavol.nbd.constants import Cmd, Info, Opt, Rep, TlsMode, TransmissionFlag
from deltavol.nbd.events import (
    NEED_DATA,
    Closed,
    ExportInfo,
    OptExportName,
    OptInfo,
    OptList,
    OptMetaContext,
    Request,
    StartTls,
)
from deltavol.nbd.server_conn import ProtocolStateError, ServerConnection

F = TransmissionFlag
DISK = ExportInfo(name="disk", size=1 << 20, flags=int(F.HAS_FLAGS | F.SEND_FLUSH), max_block=65536)
STARTTLS, ABORT = 5, 2  # doc/proto.md option numbers
ACK, ERR_POLICY, ERR_INVALID, ERR_TLS_REQD = 1, 2**31 + 2, 2**31 + 3, 2**31 + 5


def server(mode: TlsMode, flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES) -> ServerConnection:
    """A server connection in option haggling, greeting drained."""
    conn = ServerConnection(tls_mode=mode)
    sent(conn)
    conn.receive_data(client_flags(flags))
    assert conn.next_event() is NEED_DATA
    return conn


def upgraded(mode: TlsMode) -> ServerConnection:
    """A server connection whose client sent STARTTLS and got TLS; output drained."""
    conn = server(mode)
    conn.receive_data(option(STARTTLS))
    assert conn.next_event() == StartTls()
    assert reply_codes(conn) == [(STARTTLS, ACK)]
    conn.tls_started()
    return conn


def reply_codes(conn: ServerConnection) -> list[tuple[int, int]]:
    return [(r.opt, r.rep) for r in option_replies(sent(conn))]


# --- the server's modes -------------------------------------------------------------------------
def test_off_refuses_starttls_with_err_policy_and_goes_on() -> None:
    conn = server(TlsMode.OFF)
    conn.receive_data(option(STARTTLS) + option(Opt.LIST))
    assert conn.next_event() == OptList()
    assert reply_codes(conn) == [(STARTTLS, ERR_POLICY)]
    assert not conn.tls


@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE])
def test_starttls_is_acked_then_the_application_upgrades(mode: TlsMode) -> None:
    conn = server(mode)
    conn.receive_data(option(STARTTLS))
    assert conn.next_event() == StartTls()
    assert reply_codes(conn) == [(STARTTLS, ACK)]
    assert conn.phase.value == "tls-handshake" and not conn.tls
    with pytest.raises(ProtocolStateError, match="tls_started"):
        conn.next_event()
    conn.tls_started()
    assert conn.tls and conn.phase.value == "options"
    conn.receive_data(option(Opt.GO, info_data("disk")))
    assert isinstance(conn.next_event(), OptInfo)


def test_on_serves_a_plain_client_too() -> None:
    conn = server(TlsMode.ON)
    conn.receive_data(option(Opt.GO, info_data("disk")))
    assert isinstance(conn.next_event(), OptInfo)
    conn.reply_info(DISK)
    assert conn.phase.value == "transmission" and not conn.tls


@pytest.mark.parametrize(
    "opt, data",
    [
        (Opt.LIST, b""),
        (Opt.INFO, info_data("disk")),
        (Opt.GO, info_data("disk")),
        (Opt.STRUCTURED_REPLY, b""),
        (Opt.LIST_META_CONTEXT, meta_data("disk", ["base:allocation"])),
        (Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation"])),
        (Opt.PEEK_EXPORT, b""),
        (99, b"junk"),
    ],
)
def test_require_answers_every_option_before_tls_with_err_tls_reqd(opt: int, data: bytes) -> None:
    conn = server(TlsMode.REQUIRE)
    conn.receive_data(option(opt, data) + option(STARTTLS))
    assert conn.next_event() == StartTls()  # nothing reached the application before it
    assert reply_codes(conn) == [(opt, ERR_TLS_REQD), (STARTTLS, ACK)]
    assert not conn.structured_replies and not conn.meta_contexts


def test_require_closes_on_export_name_before_tls() -> None:
    conn = server(TlsMode.REQUIRE)
    conn.receive_data(option(Opt.EXPORT_NAME, b"disk"))
    event = conn.next_event()
    assert isinstance(event, Closed) and not event.clean and "TLS" in event.reason
    assert sent(conn) == b""  # no export was described in plain text


def test_require_lets_abort_through_before_tls() -> None:
    conn = server(TlsMode.REQUIRE)
    conn.receive_data(option(ABORT))
    event = conn.next_event()
    assert isinstance(event, Closed) and event.clean
    assert reply_codes(conn) == [(ABORT, ACK)]


def test_require_closes_a_client_without_fixed_newstyle() -> None:
    conn = ServerConnection(tls_mode=TlsMode.REQUIRE)
    sent(conn)
    conn.receive_data(client_flags(0))
    assert isinstance(conn.next_event(), Closed)


def test_require_never_sends_err_tls_reqd_once_tls_is_up() -> None:
    conn = upgraded(TlsMode.REQUIRE)
    conn.receive_data(option(Opt.STRUCTURED_REPLY) + option(Opt.LIST))
    assert conn.next_event() == OptList()
    conn.reply_list(["disk"])
    assert [rep for _, rep in reply_codes(conn)] == [ACK, 2, ACK]  # ACK, SERVER, ACK


@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE])
def test_a_second_starttls_gets_err_invalid_and_the_stream_goes_on(mode: TlsMode) -> None:
    conn = upgraded(mode)
    conn.receive_data(option(STARTTLS) + option(Opt.LIST))
    assert conn.next_event() == OptList()
    assert reply_codes(conn) == [(STARTTLS, ERR_INVALID)]
    assert conn.tls and conn.phase.value == "option-pending"


def test_starttls_with_data_gets_err_invalid_and_no_upgrade() -> None:
    conn = server(TlsMode.REQUIRE)
    conn.receive_data(option(STARTTLS, b"x") + option(STARTTLS))
    assert conn.next_event() == StartTls()
    assert reply_codes(conn) == [(STARTTLS, ERR_INVALID), (STARTTLS, ACK)]


@pytest.mark.parametrize("after", [option(Opt.LIST), b"\x16\x03\x01", option(Opt.EXPORT_NAME, b"disk")])
def test_bytes_sent_along_with_starttls_close_the_connection(after: bytes) -> None:
    conn = server(TlsMode.ON)
    conn.receive_data(option(STARTTLS) + after)
    event = conn.next_event()
    assert isinstance(event, Closed) and not event.clean and "STARTTLS" in event.reason
    assert sent(conn) == b""  # not even the ACK: there is no TLS to start


def test_plain_bytes_fed_before_tls_started_close_the_connection() -> None:
    conn = server(TlsMode.ON)
    conn.receive_data(option(STARTTLS))
    assert conn.next_event() == StartTls()
    sent(conn)
    conn.receive_data(option(Opt.LIST))
    assert isinstance(conn.next_event(), Closed)
    with pytest.raises(ProtocolStateError):
        conn.tls_started()


def test_nothing_negotiated_before_starttls_survives_it() -> None:
    conn = server(TlsMode.ON)
    conn.receive_data(
        option(Opt.STRUCTURED_REPLY) + option(Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation"]))
    )
    assert isinstance(conn.next_event(), OptMetaContext)
    conn.reply_meta_context(True)
    assert conn.structured_replies and conn.meta_contexts
    conn.receive_data(option(STARTTLS))
    assert conn.next_event() == StartTls()
    conn.tls_started()
    assert not conn.structured_replies and not conn.meta_contexts
    conn.receive_data(option(Opt.GO, info_data("disk")))
    assert isinstance(conn.next_event(), OptInfo)
    conn.reply_info(DISK)
    sent(conn)
    conn.receive_data(request(Cmd.BLOCK_STATUS, length=4096))
    [bad] = events_until_need_data(conn)
    assert not isinstance(bad, Request)  # the meta context was chosen before TLS: gone


def test_block_size_structured_replies_and_meta_contexts_work_inside_tls() -> None:
    conn = upgraded(TlsMode.REQUIRE)
    conn.receive_data(
        option(Opt.STRUCTURED_REPLY) + option(Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation"]))
    )
    assert isinstance(conn.next_event(), OptMetaContext)
    conn.reply_meta_context(True)
    conn.receive_data(option(Opt.GO, info_data("disk", [Info.BLOCK_SIZE])))
    assert isinstance(conn.next_event(), OptInfo)
    conn.reply_info(DISK)
    replies = [(r.opt, r.rep, r.data) for r in option_replies(sent(conn))]
    assert (Opt.GO, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, 1, 4096, 65536)) in replies
    conn.receive_data(request(Cmd.BLOCK_STATUS, length=4096))
    [req] = events_until_need_data(conn)
    assert isinstance(req, Request) and req.cmd is Cmd.BLOCK_STATUS
    conn.send_block_status(req.cookie, [(4096, 3)])
    magic, _flags, rtype, cookie, length = struct.unpack_from(
        ">IHHQI", b"".join(map(bytes, conn.data_to_send()))
    )
    assert (magic, rtype, cookie, length) == (0x668E33EF, 5, req.cookie, 12)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([*range(12), 99, 0xFFFFFFFF]), st.binary(max_size=40)),
        max_size=8,
    ),
    st.lists(st.integers(1, 64), max_size=20),
)
def test_before_tls_require_tells_nothing_whatever_the_options(
    opts: list[tuple[int, bytes]], pieces: list[int]
) -> None:
    """Random options, cut anywhere: until STARTTLS is acknowledged the application sees no
    event, and every reply is ERR_TLS_REQD, or the answer to ABORT or to STARTTLS."""
    conn = server(TlsMode.REQUIRE)
    stream = b"".join(option(opt, data) for opt, data in opts)
    feed(conn, stream, pieces)
    events = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            break
        events.append(event)
        if isinstance(event, (Closed, StartTls)):
            break
    assert all(isinstance(e, (Closed, StartTls)) for e in events), events
    for reply in option_replies(sent(conn)):
        if reply.opt == STARTTLS:
            assert reply.rep in (ACK, ERR_INVALID)
        elif reply.opt == ABORT:
            assert reply.rep == ACK
        else:
            assert reply.rep == ERR_TLS_REQD and b"TLS" in reply.data
    assert conn.export is None and not conn.structured_replies and not conn.meta_contexts


# --- the client against the server ------------------------------------------------------------
class TlsPair:
    """A ClientConnection and a ServerConnection; ``tls_started`` is called on both sides
    when both have seen StartTls, as two asyncio layers would after their handshake."""

    def __init__(self, mode: TlsMode, *, tls: bool, block_status: bool = False) -> None:
        self.client = ClientConnection("disk", tls=tls, block_status=block_status)
        self.server = ServerConnection(tls_mode=mode)
        self.disk = bytearray(DISK.size)
        self.options_seen: list[int] = []
        self.upgrades = 0

    def pump(self) -> list[object]:
        events: list[object] = []
        server_upgrading = client_upgrading = False
        moved = True
        while moved:
            moved = False
            for piece in self.client.data_to_send():
                self.server.receive_data(bytes(piece))
                moved = True
            server_upgrading |= self._serve()
            for piece in self.server.data_to_send():
                self.client.receive_data(bytes(piece))
                moved = True
            while not client_upgrading:
                event = self.client.next_event()
                if event is NEED_DATA:
                    break
                events.append(event)
                if isinstance(event, StartTls):
                    client_upgrading = True
                elif isinstance(event, (Closed, HandshakeFailed)):
                    return events
            if server_upgrading and client_upgrading:
                self.server.tls_started()
                self.client.tls_started()
                self.upgrades += 1
                server_upgrading = client_upgrading = False
                moved = True
        return events

    def _serve(self) -> bool:
        while True:
            event = self.server.next_event()
            if event is NEED_DATA or isinstance(event, Closed):
                return False
            if isinstance(event, StartTls):
                return True
            if isinstance(event, OptInfo):
                self.server.reply_info(DISK)
            elif isinstance(event, OptMetaContext):
                self.server.reply_meta_context(True)
            elif isinstance(event, OptExportName):
                self.server.accept_export(DISK)
            elif isinstance(event, Request):
                if event.cmd is Cmd.WRITE:
                    self.disk[event.offset : event.offset + event.length] = event.data
                    self.server.send_ok(event.cookie)
                elif event.cmd is Cmd.READ:
                    data = bytes(self.disk[event.offset : event.offset + event.length])
                    self.server.send_read(event.cookie, event.offset, [(event.length, data)])
                elif event.cmd is Cmd.BLOCK_STATUS:
                    self.server.send_block_status(event.cookie, [(event.length, 0)])
                else:
                    self.server.send_ok(event.cookie)
            else:
                raise AssertionError(f"unexpected server event {event}")


@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE])
def test_a_tls_client_upgrades_first_then_negotiates_inside_tls(mode: TlsMode) -> None:
    pair = TlsPair(mode, tls=True, block_status=True)
    events = pair.pump()
    assert events[0] == StartTls() and isinstance(events[-1], Ready), events
    assert pair.upgrades == 1 and pair.client.tls and pair.server.tls
    assert pair.client.structured and pair.client.meta_context_id is not None
    cookie = pair.client.request(Cmd.WRITE, 4096, 5, data=b"hello")
    [reply] = pair.pump()
    assert isinstance(reply, Reply) and reply.cookie == cookie and not reply.error
    pair.client.request(Cmd.READ, 4096, 5)
    [reply] = pair.pump()
    assert isinstance(reply, Reply) and reply.data == b"hello"
    pair.client.request(Cmd.BLOCK_STATUS, 0, 4096)
    [reply] = pair.pump()
    assert isinstance(reply, Reply) and reply.extents == [(4096, 0)]


def test_the_client_sends_starttls_before_any_other_option() -> None:
    client = ClientConnection("disk", tls=True)
    client.receive_data(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
    assert client.next_event() is NEED_DATA
    out = b"".join(bytes(p) for p in client.data_to_send())
    assert out == client_flags() + option(STARTTLS)


def test_a_tls_client_fails_against_a_server_without_tls_and_sends_nothing_else() -> None:
    pair = TlsPair(TlsMode.OFF, tls=True)
    events = pair.pump()
    assert len(events) == 1 and isinstance(events[0], HandshakeFailed), events
    assert "refused TLS" in events[0].reason and "not offered" in events[0].reason
    assert isinstance(pair.client.next_event(), Closed)
    assert pair.client.data_to_send() == []
    assert pair.server.phase.value == "options" and pair.server.export is None


def test_a_plain_client_against_require_fails_with_tls_required() -> None:
    pair = TlsPair(TlsMode.REQUIRE, tls=False)
    events = pair.pump()
    assert len(events) == 1 and isinstance(events[0], HandshakeFailed), events
    assert "TLS is required" in events[0].reason
    assert pair.server.export is None and pair.upgrades == 0


def test_server_bytes_along_with_the_ack_close_the_client() -> None:
    client = ClientConnection("disk", tls=True)
    client.receive_data(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
    client.next_event()
    client.data_to_send()
    ack = struct.pack(">QIII", 0x0003E889045565A9, STARTTLS, ACK, 0)
    client.receive_data(ack + b"\x16\x03\x03")
    event = client.next_event()
    assert isinstance(event, Closed) and "STARTTLS" in event.reason


def test_server_bytes_before_tls_started_close_the_client() -> None:
    client = ClientConnection("disk", tls=True)
    client.receive_data(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
    client.next_event()
    client.receive_data(struct.pack(">QIII", 0x0003E889045565A9, STARTTLS, ACK, 0))
    assert client.next_event() == StartTls()
    with pytest.raises(ProtocolStateError):
        client.next_event()
    client.receive_data(b"plain")
    assert isinstance(client.next_event(), Closed)


def _injected(rep: int, payload: bytes) -> bytes:
    return struct.pack(">QIII", 0x0003E889045565A9, STARTTLS, rep, len(payload)) + payload


@pytest.mark.parametrize(
    "extra",
    [
        _injected(int(Rep.META_CONTEXT), struct.pack(">I", 7) + b"base:allocation"),
        _injected(int(Rep.INFO), struct.pack(">HIII", int(Info.BLOCK_SIZE), 1, 4096, 1)),
        _injected(int(Rep.INFO), struct.pack(">HQH", int(Info.EXPORT), 1 << 40, 1)),
        _injected(int(Rep.SERVER), struct.pack(">I", 1) + b"x"),
    ],
    ids=["meta-context", "block-size", "export", "server"],
)
def test_plain_text_replies_to_starttls_other_than_its_ack_close_the_client(extra: bytes) -> None:
    """A man in the middle answers STARTTLS with replies of its own before relaying the
    real ACK: none of them may survive into the TLS session."""
    client = ClientConnection("disk", tls=True, block_status=True)
    client.receive_data(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
    client.next_event()
    client.data_to_send()
    client.receive_data(extra + struct.pack(">QIII", 0x0003E889045565A9, STARTTLS, ACK, 0))
    event = client.next_event()
    assert isinstance(event, Closed) and "STARTTLS" in event.reason, event
    assert client.meta_context_id is None and client.data_to_send() == []


def test_what_was_negotiated_before_tls_started_is_forgotten() -> None:
    pair = TlsPair(TlsMode.REQUIRE, tls=True, block_status=False)
    pair.client.meta_context_id = 7  # as if read in plain text
    pair.client._info.update(size=1, flags=1, max=1)
    events = pair.pump()
    ready = events[-1]
    assert isinstance(ready, Ready), events
    assert ready.meta_context_id is None and pair.client.meta_context_id is None
    assert ready.size == DISK.size and ready.max_block == DISK.max_block

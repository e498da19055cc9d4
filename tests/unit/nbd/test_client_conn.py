"""ClientConnection against the real ServerConnection in memory: bytes out of one go into the
other, no sockets. The server side is a tiny application over a model disk (a bytearray)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltavol.nbd.client_conn import ClientConnection, HandshakeFailed, Phase, Ready, Reply
from deltavol.nbd.constants import Cmd, CmdFlag, Errno
from deltavol.nbd.constants import TransmissionFlag as TF
from deltavol.nbd.events import NEED_DATA, BadRequest, Closed, ExportInfo, OptInfo, OptMetaContext, Request
from deltavol.nbd.server_conn import ServerConnection

SIZE = 1 << 20
FLAGS = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.CAN_MULTI_CONN
DISK = ExportInfo(
    name="disk", size=SIZE, flags=int(FLAGS), min_block=1, preferred_block=4096, max_block=65536
)
SIMPLE_MAGIC, STRUCTURED_MAGIC = 0x67446698, 0x668E33EF  # doc/proto.md
TYPE_OFFSET_DATA, TYPE_OFFSET_HOLE = 1, 2

Splitter = Callable[[int, int], list[int]]  # (offset, length) -> piece lengths of a read reply


def whole(offset: int, length: int) -> list[int]:
    return [length]


class Pair:
    """A client and a server connection wired together through ``pump``."""

    def __init__(
        self,
        *,
        structured: bool = True,
        block_status: bool = False,
        export: str = "disk",
        split: Splitter = whole,
        delivery: int = 0,
        shown: str | None = None,
    ) -> None:
        self.client = ClientConnection(export, structured=structured, block_status=block_status, shown=shown)
        self.server = ServerConnection()
        self.disk = bytearray(SIZE)
        self.split = split
        self.delivery = delivery  # bytes per receive_data call; 0: all at once
        self.server_events: list[object] = []

    def _deliver(self, pieces: list[bytes | memoryview], receive: Callable[[bytes], None]) -> bool:
        data = b"".join(bytes(p) for p in pieces)
        step = self.delivery or len(data) or 1
        for i in range(0, len(data), step):
            receive(data[i : i + step])
        return bool(data)

    def pump(self) -> list[object]:
        """Move bytes both ways until neither side has anything to say; the client's events."""
        events: list[object] = []
        moved = True
        while moved:
            moved = self._deliver(self.client.data_to_send(), self.server.receive_data)
            self._serve()
            moved |= self._deliver(self.server.data_to_send(), self.client.receive_data)
            while True:
                event = self.client.next_event()
                if event is NEED_DATA:
                    break
                events.append(event)
                if isinstance(event, (Closed, HandshakeFailed)):
                    return events
        return events

    def _serve(self) -> None:
        while True:
            event = self.server.next_event()
            if event is NEED_DATA:
                return
            self.server_events.append(event)
            if isinstance(event, OptInfo):
                self.server.reply_info(DISK if event.name == "disk" else None, f"no export {event.name!r}")
            elif isinstance(event, OptMetaContext):
                self.server.reply_meta_context(event.name == "disk")
            elif isinstance(event, BadRequest):
                self.server.send_error(event.cookie, event.errno, event.reason)
            elif isinstance(event, Request):
                self._request(event)
            elif isinstance(event, Closed):
                return
            else:
                raise AssertionError(f"unexpected server event {event}")

    def _request(self, r: Request) -> None:
        if r.cmd is not Cmd.FLUSH and r.offset + r.length > SIZE:
            self.server.send_error(r.cookie, Errno.EINVAL, "beyond the end")
        elif r.cmd is Cmd.READ:
            pieces: list[tuple[int, bytes | None]] = []
            pos = r.offset
            for n in self.split(r.offset, r.length):
                data = bytes(self.disk[pos : pos + n])
                pieces.append((n, None if data == bytes(n) else data))
                pos += n
            assert pos == r.offset + r.length
            self.server.send_read(r.cookie, r.offset, pieces)
        elif r.cmd is Cmd.BLOCK_STATUS:
            self.server.send_block_status(r.cookie, [(r.length // 2, 0), (r.length - r.length // 2, 3)])
        else:
            if r.cmd is Cmd.WRITE:
                self.disk[r.offset : r.offset + r.length] = r.data
            elif r.cmd in (Cmd.WRITE_ZEROES, Cmd.TRIM):
                self.disk[r.offset : r.offset + r.length] = bytes(r.length)
            self.server.send_ok(r.cookie)

    def ready(self) -> Ready:
        events = self.pump()
        assert len(events) == 1 and isinstance(events[0], Ready), events
        return events[0]

    def call(self, cmd: Cmd, offset: int, length: int, data: bytes = b"", flags: int = 0) -> Reply:
        cookie = self.client.request(cmd, offset, length, flags, data)
        events = self.pump()
        assert len(events) == 1 and isinstance(events[0], Reply) and events[0].cookie == cookie, events
        return events[0]


def connected(**kw: object) -> Pair:
    pair = Pair(**kw)  # type: ignore[arg-type]
    pair.ready()
    return pair


# --- handshake ---------------------------------------------------------------------------
@pytest.mark.parametrize("structured", [True, False])
def test_handshake_reaches_transmission_with_the_export_and_its_block_sizes(structured: bool) -> None:
    pair = Pair(structured=structured)
    ready = pair.ready()
    assert ready == Ready(SIZE, int(FLAGS), 1, 4096, 65536, None)
    assert pair.client.phase is Phase.TRANSMISSION and pair.client.structured is structured
    assert pair.server.structured_replies is structured and pair.server.export == DISK
    assert pair.server_events == [OptInfo("disk", (3,), go=True)]  # GO asked for NBD_INFO_BLOCK_SIZE


def test_handshake_survives_bytes_arriving_one_at_a_time() -> None:
    pair = Pair(block_status=True, delivery=1)
    assert pair.ready().meta_context_id == 1
    assert pair.call(Cmd.WRITE, 4096, 3, b"abc").error == 0
    assert pair.call(Cmd.READ, 4095, 5).data == b"\0abc\0"


def test_block_status_context_is_negotiated_and_extents_come_back() -> None:
    pair = connected(block_status=True)
    assert pair.client.meta_context_id == 1
    assert pair.call(Cmd.BLOCK_STATUS, 0, 65536).extents == [(32768, 0), (32768, 3)]


def test_without_block_status_no_context_is_asked() -> None:
    pair = connected(block_status=False)
    assert pair.client.meta_context_id is None
    assert not any(isinstance(e, OptMetaContext) for e in pair.server_events)


def test_a_refused_export_name_fails_the_handshake() -> None:
    pair = Pair(export="nope")
    events = pair.pump()
    assert len(events) == 1 and isinstance(events[0], HandshakeFailed)
    assert "'nope'" in events[0].reason and "no export 'nope'" in events[0].reason
    assert pair.client.phase is Phase.CLOSED
    assert isinstance(pair.client.next_event(), Closed)
    with pytest.raises(RuntimeError):
        pair.client.request(Cmd.READ, 0, 512)


def test_a_refused_guarded_export_name_keeps_its_secret_out_of_the_reason() -> None:
    """``NAME@SECRET`` (a peer guard's secret) is sent, but messages say ``NAME@...``."""
    pair = Pair(export="B@topsecret")
    events = pair.pump()
    assert pair.server_events[0] == OptInfo("B@topsecret", (3,), go=True)  # the wire name
    assert len(events) == 1 and isinstance(events[0], HandshakeFailed)
    ours = events[0].reason.partition(": ")[0]
    assert ours == "server refused export 'B@...'", events[0].reason
    assert "topsecret" not in ours
    assert Pair(export="x", shown="y").client.shown == "y" and Pair(export="disk").client.shown == "disk"


def test_requests_before_ready_are_refused() -> None:
    with pytest.raises(RuntimeError, match="await-greeting"):
        ClientConnection("disk").request(Cmd.READ, 0, 512)


def test_a_server_that_refuses_structured_replies_is_used_with_simple_ones() -> None:
    client = ClientConnection("disk")
    client.receive_data(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
    assert client.next_event() is NEED_DATA
    out = b"".join(bytes(p) for p in client.data_to_send())
    assert out[:4] == struct.pack(">I", 3) and struct.unpack_from(">QII", out, 4)[1] == 8  # STRUCTURED_REPLY
    client.receive_data(struct.pack(">QIII", 0x0003E889045565A9, 8, (1 << 31) | 1, 0))  # ERR_UNSUP
    assert client.next_event() is NEED_DATA
    go = b"".join(bytes(p) for p in client.data_to_send())
    assert struct.unpack_from(">QII", go)[1] == 7 and not client.structured  # NBD_OPT_GO


def test_not_an_nbd_server_is_closed() -> None:
    client = ClientConnection("disk")
    client.receive_data(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    event = client.next_event()
    assert isinstance(event, Closed) and "newstyle" in event.reason


def test_eof_during_the_handshake_is_closed() -> None:
    client = ClientConnection("disk")
    client.receive_data(b"")
    assert isinstance(client.next_event(), Closed)


# --- transmission --------------------------------------------------------------------------
@pytest.mark.parametrize("structured", [True, False])
def test_write_read_zero_trim_flush_round_trip(structured: bool) -> None:
    pair = connected(structured=structured)
    data = bytes(range(256)) * 64
    assert pair.call(Cmd.WRITE, 8192, len(data), data, CmdFlag.FUA).error == 0
    assert pair.call(Cmd.READ, 8192, len(data)).data == data
    assert pair.call(Cmd.WRITE_ZEROES, 8192 + 100, 200, flags=CmdFlag.NO_HOLE).error == 0
    assert pair.call(Cmd.TRIM, 8192 + 1000, 24).error == 0
    assert pair.call(Cmd.FLUSH, 0, 0).error == 0
    expect = bytearray(data)
    expect[100:300] = bytes(200)
    expect[1000:1024] = bytes(24)
    assert pair.call(Cmd.READ, 8192, len(data)).data == expect
    assert pair.disk[8192 : 8192 + len(data)] == expect


def every(n: int) -> Splitter:
    return lambda offset, length: [min(n, length - i) for i in range(0, length, n)] or [0]


@pytest.mark.parametrize("delivery", [0, 1, 7, 4096])
def test_a_read_in_many_chunks_of_data_and_holes_is_reassembled(delivery: int) -> None:
    pair = connected(split=every(1000), delivery=delivery)
    for o in range(0, 20000, 2000):  # every other 1000-byte piece is data, the rest holes
        pair.disk[o : o + 1000] = bytes([o // 2000 + 1]) * 1000
    reply = pair.call(Cmd.READ, 0, 20000)
    assert reply.error == 0 and reply.data == pair.disk[:20000]
    assert b"".join(bytes(p) for p in pair.server.data_to_send()) == b""  # nothing left over


def test_a_read_in_thousands_of_chunks_is_reassembled() -> None:
    """A sparse, fragmented file makes qemu-nbd send a chunk per extent: no recursion per chunk."""
    pair = connected(split=every(16))
    pair.disk[::32] = b"\x01" * (SIZE // 32)
    reply = pair.call(Cmd.READ, 0, 65536)  # 4096 chunks in one buffer
    assert reply.error == 0 and reply.data == pair.disk[:65536]


def test_many_requests_in_flight_complete_by_cookie() -> None:
    pair = connected(split=every(3000))
    cookies = {}
    for i in range(20):
        cookies[pair.client.request(Cmd.WRITE, i * 5000, 5000, 0, bytes([i + 1]) * 5000)] = None
    reads = {pair.client.request(Cmd.READ, i * 5000, 5000): i for i in range(20)}
    replies = {r.cookie: r for r in pair.pump() if isinstance(r, Reply)}
    assert set(replies) == set(cookies) | set(reads)
    for cookie, i in reads.items():
        assert replies[cookie].data == bytes([i + 1]) * 5000


@pytest.mark.parametrize("structured", [True, False])
def test_an_error_reply_carries_the_errno(structured: bool) -> None:
    pair = connected(structured=structured)
    reply = pair.call(Cmd.READ, SIZE - 512, 1024)
    assert reply.error == Errno.EINVAL
    if structured:
        assert reply.message == "beyond the end"
    assert pair.call(Cmd.WRITE, SIZE, 1, b"x").error == Errno.EINVAL
    assert pair.call(Cmd.READ, 0, 4).data == bytes(4)  # the connection goes on


def test_a_write_over_the_servers_maximum_is_refused_and_the_stream_stays_in_step() -> None:
    pair = connected()
    assert pair.call(Cmd.WRITE, 0, 65537, b"y" * 65537).error == Errno.EINVAL
    assert pair.call(Cmd.WRITE, 0, 2, b"ok").error == 0
    assert pair.call(Cmd.READ, 0, 3).data == b"ok\0"


def test_disconnect_is_a_clean_close_on_the_server() -> None:
    pair = connected()
    pair.client.request(Cmd.DISC, 0, 0)
    assert pair.pump() == []
    assert isinstance(pair.server_events[-1], Closed) and pair.server_events[-1].clean


# --- a server that breaks the protocol -----------------------------------------------------
def chunk(flags: int, type_: int, cookie: int, payload: bytes) -> bytes:
    return struct.pack(">IHHQI", STRUCTURED_MAGIC, flags, type_, cookie, len(payload)) + payload


@pytest.mark.parametrize(
    "reply, words",
    [
        (struct.pack(">IIQ", SIMPLE_MAGIC, 0, 99), "unknown cookie"),
        (struct.pack(">IIQ", 0x12345678, 0, 1), "bad reply magic"),
        (chunk(1, TYPE_OFFSET_DATA, 1, struct.pack(">Q", 4096 + 10) + b"x"), "outside"),
        (chunk(1, TYPE_OFFSET_DATA, 1, struct.pack(">Q", 4095) + b"x"), "outside"),
        (chunk(1, TYPE_OFFSET_HOLE, 1, struct.pack(">QI", 4096, 11)), "outside"),
        (chunk(1, TYPE_OFFSET_DATA, 1, b"\0\0\0\0"), "short"),
        (chunk(1, TYPE_OFFSET_HOLE, 1, b"\0" * 8), "short"),
        (chunk(1, 5, 1, struct.pack(">III", 1, 10, 0)), "unexpected"),  # block status to a read
        (chunk(1, (1 << 15) + 1, 1, b"\0"), "short"),
        (struct.pack(">IIQ", SIMPLE_MAGIC, 0, 1) + bytes(10), "simple reply to a read"),
    ],
)
def test_a_reply_that_does_not_fit_the_request_closes_the_connection(reply: bytes, words: str) -> None:
    pair = connected()
    pair.client.request(Cmd.READ, 4096, 10)
    pair.client.data_to_send()
    pair.client.receive_data(reply)
    event = pair.client.next_event()
    assert isinstance(event, Closed) and words in event.reason
    assert pair.client.phase is Phase.CLOSED


def test_a_structured_read_that_leaves_a_gap_closes_the_connection() -> None:
    """Bytes nobody sent must not come back as zeroes: a silent wrong copy."""
    pair = connected()
    pair.client.request(Cmd.READ, 0, 10)
    pair.client.data_to_send()
    pair.client.receive_data(
        chunk(0, TYPE_OFFSET_DATA, 1, struct.pack(">Q", 0) + b"abcd")
        + chunk(1, TYPE_OFFSET_HOLE, 1, struct.pack(">QI", 6, 4))
    )
    event = pair.client.next_event()
    assert isinstance(event, Closed) and "cover" in event.reason


def test_a_structured_read_without_data_or_error_closes_the_connection() -> None:
    pair = connected()
    pair.client.request(Cmd.READ, 0, 10)
    pair.client.data_to_send()
    pair.client.receive_data(chunk(1, 0, 1, b""))  # NBD_REPLY_TYPE_NONE, done
    assert isinstance(pair.client.next_event(), Closed)


# --- property: a model disk -----------------------------------------------------------------
OPS = st.lists(
    st.tuples(
        st.sampled_from([Cmd.WRITE, Cmd.READ, Cmd.READ, Cmd.WRITE_ZEROES, Cmd.TRIM, Cmd.FLUSH]),
        st.integers(0, SIZE // 512 - 1).map(lambda b: b * 512) | st.integers(0, SIZE - 1),
        st.integers(0, 70000),
        st.booleans(),  # pump after this request (else it stays in flight with the next ones)
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(
    ops=OPS,
    structured=st.booleans(),
    piece=st.sampled_from([1, 512, 4096, 100000]),
    delivery=st.sampled_from([0, 0, 1, 13, 4096]),
    seed=st.integers(0, 255),
)
def test_random_requests_keep_a_model_disk(
    ops: list[tuple[Cmd, int, int, bool]], structured: bool, piece: int, delivery: int, seed: int
) -> None:
    pair = connected(structured=structured, split=every(piece), delivery=delivery)
    model = bytearray(SIZE)
    expect: dict[int, tuple[int, bytes | None]] = {}  # cookie -> (errno, read data)
    replies: dict[int, Reply] = {}
    for i, (cmd, offset, length, pump) in enumerate(ops):
        if cmd is Cmd.FLUSH:
            offset = length = 0
        data = bytes([(seed + i) % 255 + 1]) * length if cmd is Cmd.WRITE else b""
        cookie = pair.client.request(cmd, offset, length, 0, data)
        if (cmd in (Cmd.READ, Cmd.WRITE) and length > DISK.max_block) or offset + length > SIZE:
            expect[cookie] = (Errno.EINVAL, None)
        else:
            if cmd is Cmd.WRITE:
                model[offset : offset + length] = data
            elif cmd in (Cmd.WRITE_ZEROES, Cmd.TRIM):
                model[offset : offset + length] = bytes(length)
            expect[cookie] = (0, bytes(model[offset : offset + length]) if cmd is Cmd.READ else None)
        if pump or i == len(ops) - 1:
            for event in pair.pump():
                assert isinstance(event, Reply), event
                replies[event.cookie] = event
    assert set(replies) == set(expect)
    for cookie, (error, data) in expect.items():
        assert replies[cookie].error == error
        if data is not None:
            assert replies[cookie].data == data
    assert pair.disk == model

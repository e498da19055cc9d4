"""NbdConnection's receive and send paths against a recording transport: a burst of small
reads leaves in one write, large write payloads reach the export without a copy, and
nothing is acknowledged before the export has the write."""

from __future__ import annotations

import asyncio
import ssl
import struct
import threading
import tracemalloc
from typing import Any

import pytest

from deltavol.backend.base import WriteJob
from deltavol.backend.gate import GateLayer, WriteGate
from deltavol.nbd.buffer import PayloadPool
from deltavol.nbd.constants import Cmd, Opt, Rep, TlsMode
from deltavol.nbd.server_conn import SINK_BUDGET, SinkBudget
from deltavol.server import nbd_connection
from deltavol.server.nbd_connection import NbdConnection
from tests.fakes import Disk
from tests.protocol.wire import chunks, client_flags, info_data, option, option_replies, request

SIZE = 64 << 20


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def writelines(self, pieces: list[bytes]) -> None:
        self.writes.append(b"".join(bytes(p) for p in pieces))

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


class Export:
    """What NbdConnection asks of an export, recording writes."""

    name = "vol"
    size = SIZE
    description = ""

    def __init__(self) -> None:
        self.written: list[tuple[int, Any]] = []

    def transmission_flags(self) -> int:
        return 1 | 4 | 128  # HAS_FLAGS, SEND_FLUSH, CAN_MULTI_CONN... (SEND_FUA is 8: not offered)

    def pread_cached(self, offset: int, length: int) -> bytes:
        return bytes([offset // 4096 % 256]) * length

    def pwrite_now(self, offset: int, data: Any) -> bool:
        return False  # every write takes the task path

    def pwrite_soon(self, offset: int, data: Any) -> Any:
        return None

    async def pwrite(self, offset: int, data: Any, fua: bool = False) -> None:
        await asyncio.sleep(0)
        self.written.append((offset, data))


class Directory:
    def __init__(self) -> None:
        self.export = Export()

    def export_names(self) -> list[str]:
        return ["vol"]

    def open_export(self, name: str) -> Any:
        return self.export

    def close_export(self, name: str) -> None:
        pass


def receive(conn: NbdConnection, data: bytes) -> None:
    pos = 0
    while pos < len(data):
        view = conn.get_buffer(-1)
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos : pos + n]
        conn.buffer_updated(n)
        pos += n


def connected() -> tuple[NbdConnection, Transport, Directory]:
    directory = Directory()
    conn = NbdConnection(directory, lambda _c: None)
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    receive(conn, client_flags(3) + option(Opt.STRUCTURED_REPLY) + option(Opt.GO, info_data("vol")))
    assert conn.export is directory.export
    transport.writes.clear()
    return conn, transport, directory


async def test_a_burst_of_small_reads_leaves_in_one_write() -> None:
    conn, transport, _ = connected()
    burst = b"".join(request(Cmd.READ, cookie=i, offset=i * 4096, length=4096) for i in range(32))
    receive(conn, burst)
    assert len(transport.writes) == 1
    got = chunks(transport.writes[0])
    assert [c.cookie for c in got] == list(range(32))
    for c in got:
        (offset,) = struct.unpack_from(">Q", c.payload)
        assert offset == c.cookie * 4096 and c.payload[8:] == bytes([c.cookie]) * 4096


async def test_large_write_reaches_the_export_in_its_receive_buffer_then_is_acked() -> None:
    conn, transport, directory = connected()
    payload = bytes(range(256)) * 8192  # 2 MiB
    stream = request(Cmd.WRITE, cookie=9, offset=4096, data=payload)
    receive(conn, stream[:100])
    view = conn.get_buffer(-1)
    assert len(view) == len(payload) - 72  # the payload's own buffer, the rest of it
    view[:] = stream[100:]
    conn.buffer_updated(len(view))
    assert transport.writes == []  # not acknowledged before the export has it
    await asyncio.wait_for(conn.idle.wait(), 5)
    [(offset, data)] = directory.export.written
    assert offset == 4096 and data == payload and data is view.obj
    await asyncio.sleep(0)  # the ack of a write leaves at the end of the loop's turn
    assert b"".join(transport.writes) == struct.pack(">IIQ", 0x67446698, 0, 9)


class Forgetful(Export):
    """An export that keeps a digest of each write, not its buffer."""

    async def pwrite(self, offset: int, data: Any, fua: bool = False) -> None:
        await asyncio.sleep(0)
        self.written.append((offset, (bytes(data[:64]), len(data))))


async def test_a_large_write_buffer_is_received_into_again_only_once_its_write_is_done() -> None:
    conn, _, directory = connected()
    directory.export = conn.export = Forgetful()  # type: ignore[assignment]
    pool = conn.conn._pool = PayloadPool()
    pool.get(1 << 20)  # a size asked for before: its buffers are kept

    def sink_of(stream: bytes) -> int:
        """Send a WRITE's first bytes; the id of the buffer its payload goes into."""
        receive(conn, stream[:100])
        view = conn.get_buffer(-1)
        sink = id(view.obj)
        view.release()
        return sink

    sinks = []
    for i in range(3):
        stream = request(Cmd.WRITE, cookie=i, offset=i << 20, data=bytes([i + 1]) * (1 << 20))
        sinks.append(sink_of(stream))
        receive(conn, stream[100:])
        if i == 0:  # a second write while the first is under way: another buffer
            other = request(Cmd.WRITE, cookie=9, offset=9 << 20, data=b"\x09" * (1 << 20))
            assert sink_of(other) != sinks[0]
            receive(conn, other[100:])
        await asyncio.wait_for(conn.idle.wait(), 5)
    assert sinks[0] == sinks[1] == sinks[2]  # each done before the next came: one buffer, reused
    assert pool.held == 2 << 20  # and only the two were ever made
    got = dict(directory.export.written)
    for i, fill in ((0, 1), (1, 2), (2, 3), (9, 9)):
        assert got[i << 20] == (bytes([fill]) * 64, 1 << 20)


async def test_bytes_received_before_start_tls_returns_are_parsed_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The TLS layer may hand the client's first encrypted options to the protocol before
    ``start_tls`` returns: they are kept, then answered over TLS, never parsed as plain."""
    directory = Directory()
    conn = NbdConnection(
        directory, lambda _c: None, tls_mode=TlsMode.REQUIRE, tls_context=ssl.create_default_context
    )
    plain, encrypted = Transport(), Transport()
    conn.connection_made(plain)  # type: ignore[arg-type]
    early = option(Opt.STRUCTURED_REPLY) + option(Opt.GO, info_data("vol"))

    async def start_tls(transport: Any, protocol: NbdConnection, context: Any, **kwargs: Any) -> Transport:
        view = protocol.get_buffer(-1)
        view[: len(early)] = early
        protocol.buffer_updated(len(early))
        assert conn.export is None  # held back, not parsed yet
        return encrypted

    monkeypatch.setattr(asyncio.get_running_loop(), "start_tls", start_tls)
    receive(conn, client_flags(3) + option(Opt.STARTTLS))
    assert conn._tls_task is not None
    await conn._tls_task
    assert conn.export is directory.export
    replies = option_replies(b"".join(encrypted.writes))
    assert (replies[0].opt, replies[0].rep) == (Opt.STRUCTURED_REPLY, Rep.ACK)
    assert replies[-1].opt == Opt.GO and replies[-1].rep == Rep.ACK


def answers(buf: bytes) -> list[tuple[int, int, bytes]]:
    """(cookie, errno, payload) of each simple reply or structured chunk in ``buf``."""
    out, pos = [], 0
    while pos < len(buf):
        (magic,) = struct.unpack_from(">I", buf, pos)
        if magic == 0x67446698:
            err, cookie = struct.unpack_from(">IQ", buf, pos + 4)
            out.append((cookie, err, b""))
            pos += 16
            continue
        _, _, type_, cookie, n = struct.unpack_from(">IHHQI", buf, pos)
        payload = buf[pos + 20 : pos + 20 + n]
        err = struct.unpack_from(">I", payload)[0] if type_ & 0x8000 else 0
        out.append((cookie, err, payload))
        pos += 20 + n
    return out


def write_header(cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, int(Cmd.WRITE), cookie, offset, length)


def test_write_headers_alone_do_not_buy_their_payloads_memory() -> None:
    """Each connection sends only the 28-byte header of a 32 MiB WRITE: memory must follow
    the bytes received, not the lengths declared (else 1000 such clients end the server)."""
    length, n = 32 << 20, 12
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        conns = [connected()[0] for _ in range(n)]
        for conn in conns:
            receive(conn, write_header(1, 0, length) + b"x" * 1000)
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown <= SINK_BUDGET + n * (1 << 20), f"{grown >> 20} MiB for {n} headers"
    for conn in conns:
        conn.connection_lost(None)


async def test_a_write_beyond_the_budget_is_received_into_the_buffer_and_is_whole() -> None:
    budget = SinkBudget(3 << 20)
    conn, _, directory = connected()
    conn.conn._budget = budget
    assert budget.take(2 << 20)  # as if another connection held 2 of its 3 MiB
    payload = bytes(range(256)) * 8192  # 2 MiB: does not fit in what is left
    receive(conn, request(Cmd.WRITE, cookie=5, offset=8192, data=payload))
    await asyncio.wait_for(conn.idle.wait(), 5)
    [(offset, data)] = directory.export.written
    assert offset == 8192 and bytes(data) == payload
    budget.give(2 << 20)
    receive(conn, write_header(6, 0, 2 << 20) + b"y" * 100)
    assert budget.held == 2 << 20  # fits now: a sink, counted
    conn.connection_lost(None)
    assert budget.held == 0  # given back when the connection goes mid-payload


@pytest.mark.parametrize(
    ("offset", "flags", "why"),
    [(SIZE - 4096, 0, "beyond the end"), (0, 0x80, "not valid for WRITE")],
)
async def test_a_bad_write_header_is_refused_without_a_sink_and_the_stream_stays_in_step(
    offset: int, flags: int, why: str
) -> None:
    budget = SinkBudget()
    conn, transport, directory = connected()
    conn.conn._budget = budget
    length = 1 << 20
    receive(conn, write_header(7, offset, length, flags))
    assert budget.held == 0 and len(conn.get_buffer(-1)) < length  # nothing set aside
    receive(conn, b"z" * length + request(Cmd.READ, cookie=8, offset=0, length=512))
    await asyncio.sleep(0)
    got = answers(b"".join(transport.writes))
    assert [(cookie, err) for cookie, err, _ in got] == [(7, 22), (8, 0)]  # EINVAL, then the read
    assert why.encode() in got[0][2]
    assert directory.export.written == []


class Broken(Export):
    def pread_cached(self, offset: int, length: int) -> bytes:
        raise RuntimeError("bug in the read path")

    def pwrite_now(self, offset: int, data: Any) -> bool:
        raise RuntimeError("bug in the write path")

    def pwrite_soon(self, offset: int, data: Any) -> Any:
        raise RuntimeError("bug in the write path")

    async def flush(self) -> None:
        pass


async def test_a_bug_in_an_inline_read_or_write_costs_that_request_not_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn, transport, directory = connected()
    conn.export = directory.export = Broken()
    stream = request(Cmd.READ, cookie=1, offset=0, length=512)
    stream += request(Cmd.WRITE, cookie=2, offset=0, data=b"a" * 512)
    stream += request(Cmd.FLUSH, cookie=3)
    receive(conn, stream)
    await asyncio.wait_for(conn.idle.wait(), 5)
    await asyncio.sleep(0)
    got = answers(b"".join(transport.writes))
    assert [(cookie, err) for cookie, err, _ in got] == [(1, 5), (2, 5), (3, 0)]  # EIO, EIO, ok
    assert "crashed" in caplog.text


@pytest.fixture
def small_writes_in_the_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bursts of 4 KiB writes go to the lane, as 64 KiB ones do: the lane's rules with
    small test payloads."""
    monkeypatch.setattr(nbd_connection, "LANE_MIN", 0)


class Lanes(Export):
    """Every write agreed to at once (``pwrite_soon``), done when the test lets it: the
    lane's worker blocks on ``release``. ``flush`` records how many writes had landed."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.flushed_after: list[int] = []

    def pwrite_soon(self, offset: int, data: Any) -> WriteJob:
        def run() -> None:
            assert self.release.wait(10)
            self.written.append((offset, bytes(data)))

        return WriteJob(run)

    async def flush(self) -> None:
        self.flushed_after.append(len(self.written))


async def test_a_flush_after_writes_in_the_lane_waits_for_all_of_them(small_writes_in_the_lane: None) -> None:
    conn, transport, directory = connected()
    conn.export = directory.export = export = Lanes()
    stream = b"".join(
        request(Cmd.WRITE, cookie=i, offset=i * 4096, data=bytes([i]) * 4096) for i in range(16)
    )
    receive(conn, stream + request(Cmd.FLUSH, cookie=99))
    await asyncio.sleep(0.05)
    assert answers(b"".join(transport.writes)) == []  # nothing acknowledged before it landed
    assert export.flushed_after == [], "the FLUSH ran ahead of the writes before it"
    export.release.set()
    await asyncio.wait_for(conn.idle.wait(), 10)
    await asyncio.sleep(0)
    got = answers(b"".join(transport.writes))
    assert [(cookie, err) for cookie, err, _ in got] == [(i, 0) for i in range(16)] + [(99, 0)]
    assert export.flushed_after == [16]
    assert export.written == [(i * 4096, bytes([i]) * 4096) for i in range(16)]  # in order


async def test_small_writes_are_done_at_once_a_burst_of_large_ones_goes_to_the_lane() -> None:
    conn, transport, directory = connected()
    conn.export = directory.export = export = Lanes()
    inline: list[int] = []
    export.pwrite_now = lambda offset, data: inline.append(offset) or True  # type: ignore[method-assign]
    receive(conn, request(Cmd.WRITE, cookie=1, offset=0, data=b"a" * 4096))
    assert inline == [0] and [c for c, _, _ in answers(b"".join(transport.writes))] == [1]
    small = b"".join(request(Cmd.WRITE, cookie=i, offset=i * 4096, data=b"b" * 4096) for i in (2, 3))
    receive(conn, small)
    assert inline == [0, 8192, 12288]  # a thread hop costs a small write more than its copy
    export.release.set()
    K64 = 64 * 1024
    large = b"".join(request(Cmd.WRITE, cookie=i, offset=i * K64, data=b"c" * K64) for i in (4, 5))
    receive(conn, large)
    await asyncio.wait_for(conn.idle.wait(), 10)
    assert inline == [0, 8192, 12288]  # the burst of large ones went to the lane
    assert export.written == [(4 * K64, b"c" * K64), (5 * K64, b"c" * K64)]


async def test_a_connection_lost_with_writes_in_the_lane_gives_its_export_back_after_them(
    small_writes_in_the_lane: None,
) -> None:
    conn, _, directory = connected()
    conn.export = directory.export = export = Lanes()
    closed: list[int] = []
    directory.close_export = lambda name: closed.append(len(export.written))  # type: ignore[method-assign]
    receive(conn, b"".join(request(Cmd.WRITE, cookie=i, offset=0, data=b"c" * 4096) for i in range(4)))
    conn.connection_lost(None)
    await asyncio.sleep(0.05)
    assert closed == [], "the export was given back while its writes were still to land"
    export.release.set()
    await asyncio.wait_for(conn.idle.wait(), 10)
    assert closed == [4]


class GatedLanes(Export):
    """Writes agreed to through a real write gate (``GateLayer``); the ``after`` of the
    write at ``BROKEN`` (the file's end: it runs before the gate's) raises."""

    BROKEN = 4096

    def __init__(self) -> None:
        super().__init__()
        self.gate = WriteGate()
        self.layer = GateLayer(Disk(SIZE), self.gate)

    def pwrite_soon(self, offset: int, data: Any) -> WriteJob | None:
        job = self.layer.pwrite_soon(offset, bytes(data))
        if job is not None and offset == self.BROKEN:

            def broken(error: BaseException | None) -> None:
                raise RuntimeError("bookkeeping bug")

            job.after.insert(0, broken)
        return job


async def test_a_bug_in_one_lane_writes_after_costs_that_write_not_the_gate_or_the_batch(
    caplog: pytest.LogCaptureFixture, small_writes_in_the_lane: None
) -> None:
    conn, transport, directory = connected()
    conn.export = directory.export = export = GatedLanes()
    burst = b"".join(request(Cmd.WRITE, cookie=i, offset=i * 4096, data=bytes([i]) * 4096) for i in range(4))
    receive(conn, burst)  # a burst: all four go to the lane
    await asyncio.wait_for(conn.idle.wait(), 10)  # before: the two after the bug never came back
    await asyncio.sleep(0)
    got = answers(b"".join(transport.writes))
    assert [(cookie, err) for cookie, err, _ in got] == [(0, 0), (1, 5), (2, 0), (3, 0)]
    assert "crashed" in caplog.text

    async def mark() -> None:
        async with export.gate.closed():  # before: the gate's writers leaked, a mark hung
            pass

    await asyncio.wait_for(mark(), 5)

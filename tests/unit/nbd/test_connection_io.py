"""NbdConnection's receive and send paths against a recording transport: a burst of small
reads leaves in one write, large write payloads reach the export without a copy, and
nothing is acknowledged before the export has the write."""

from __future__ import annotations

import asyncio
import ssl
import struct
from typing import Any

import pytest

from deltavol.nbd.constants import Cmd, Opt, Rep, TlsMode
from deltavol.server.nbd_connection import NbdConnection
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

"""Hand-built client bytes and strict parsers for server bytes, for protocol tests.

Everything here is written from NetworkBlockDevice/nbd ``doc/proto.md`` with plain
``struct`` formats, not from ``deltavol.nbd.constants``'s structs, so that a wrong layout
in the code under test cannot hide behind the same wrong layout in the test.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from deltavol.nbd.events import NEED_DATA, Closed
from deltavol.nbd.server_conn import ServerConnection

# Magic numbers, straight from the spec.
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

C_FIXED_NEWSTYLE = 1 << 0
C_NO_ZEROES = 1 << 1


# --- client -> server ---------------------------------------------------------------------
def client_flags(flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"", *, magic: int = IHAVEOPT) -> bytes:
    return struct.pack(">QII", magic, opt, len(data)) + data


def string(s: str | bytes) -> bytes:
    """A 32-bit length followed by the string's bytes."""
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack(">I", len(raw)) + raw


def info_data(name: str | bytes, requests: Sequence[int] = ()) -> bytes:
    """Payload of NBD_OPT_INFO / NBD_OPT_GO."""
    return string(name) + struct.pack(f">H{len(requests)}H", len(requests), *requests)


def meta_data(name: str | bytes, queries: Sequence[str | bytes]) -> bytes:
    """Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def request(
    cmd: int,
    *,
    cookie: int = 1,
    offset: int = 0,
    length: int | None = None,
    flags: int = 0,
    data: bytes = b"",
    magic: int = REQUEST_MAGIC,
) -> bytes:
    """One transmission request; ``length`` defaults to ``len(data)``."""
    if length is None:
        length = len(data)
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + data


# --- server -> client ---------------------------------------------------------------------
@dataclass(frozen=True)
class OptionReply:
    opt: int
    rep: int
    data: bytes


@dataclass(frozen=True)
class SimpleReply:
    error: int
    cookie: int
    data: bytes


@dataclass(frozen=True)
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes


def greeting(handshake_flags: int) -> bytes:
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, handshake_flags)


def option_replies(buf: bytes) -> list[OptionReply]:
    """Split ``buf`` into option replies; it must hold whole replies and nothing else."""
    out: list[OptionReply] = []
    pos = 0
    while pos < len(buf):
        assert len(buf) - pos >= 20, f"truncated option reply header at {pos}"
        magic, opt, rep, length = struct.unpack_from(">QIII", buf, pos)
        assert magic == OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x} at {pos}"
        pos += 20
        assert len(buf) - pos >= length, "truncated option reply payload"
        out.append(OptionReply(opt, rep, buf[pos : pos + length]))
        pos += length
    return out


def simple_reply(buf: bytes) -> SimpleReply:
    """One simple reply; whatever follows the 16-byte header is its data."""
    assert len(buf) >= 16, "truncated simple reply"
    magic, error, cookie = struct.unpack_from(">IIQ", buf)
    assert magic == SIMPLE_REPLY_MAGIC, f"bad simple reply magic {magic:#x}"
    return SimpleReply(error, cookie, buf[16:])


def chunks(buf: bytes) -> list[Chunk]:
    """Split ``buf`` into structured reply chunks; it must hold whole chunks only."""
    out: list[Chunk] = []
    pos = 0
    while pos < len(buf):
        assert len(buf) - pos >= 20, f"truncated chunk header at {pos}"
        magic, flags, type_, cookie, length = struct.unpack_from(">IHHQI", buf, pos)
        assert magic == STRUCTURED_REPLY_MAGIC, f"bad chunk magic {magic:#x} at {pos}"
        pos += 20
        assert len(buf) - pos >= length, "truncated chunk payload"
        out.append(Chunk(flags, type_, cookie, buf[pos : pos + length]))
        pos += length
    return out


# --- driving a ServerConnection -----------------------------------------------------------
def sent(conn: ServerConnection) -> bytes:
    """Everything the connection queued for the peer since the last call."""
    return b"".join(bytes(piece) for piece in conn.data_to_send())


def feed(conn: ServerConnection, data: bytes, pieces: Iterable[int] | None = None) -> None:
    """Feed ``data`` whole, or cut into pieces of the given sizes (the rest at the end)."""
    if pieces is None:
        conn.receive_data(data)
        return
    pos = 0
    for size in pieces:
        if pos >= len(data):
            break
        conn.receive_data(data[pos : pos + size])
        pos += size
    if pos < len(data):
        conn.receive_data(data[pos:])


def events_until_need_data(conn: ServerConnection) -> list[object]:
    """All events up to NEED_DATA or the first Closed (no option may become pending)."""
    out: list[object] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return out
        out.append(event)
        if isinstance(event, Closed):
            return out

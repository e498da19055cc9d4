"""Byte layouts of the NBD protocol and the functions that build and parse them.

The server (``server_conn``) and the client (``client_conn``) both speak through this
module, so a layout is written once: a ``struct.Struct`` per fixed-size piece, an
``encode`` function per message that one side sends, and a parser per variable-size
payload that the other side must check. Everything is big-endian, as the spec says.

Parsers of untrusted payloads never raise: they return the parsed value, or a ``str``
that says what is wrong (the caller turns it into NBD_REP_ERR_INVALID or a disconnect).
Names and strings are UTF-8 of at most ``MAX_STRING`` bytes without NUL.

Source: NetworkBlockDevice/nbd ``doc/proto.md`` (fixed newstyle handshake, options and
their replies, simple and structured replies). Extended headers are not spoken.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from deltavol.nbd import constants as c

# --- fixed layouts ---------------------------------------------------------------------------
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zero bytes)
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
DATA_CHUNK = struct.Struct(">IHHQIQ")  # a structured reply header, then OFFSET_DATA's offset
REPLY_MAGIC = struct.Struct(">I")  # the first field of either reply
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")  # string lengths, counts, meta context ids
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
ERROR_CHUNK = struct.Struct(">IH")  # errno, message length (then the message)
OFFSET = struct.Struct(">Q")  # the offset that opens an OFFSET_DATA chunk
HOLE_CHUNK = struct.Struct(">QI")  # offset, length of an OFFSET_HOLE chunk
DESCRIPTOR = struct.Struct(">II")  # block status: extent length, flags
NO_ZEROES_PAD = bytes(124)  # after EXPORT_NAME's reply unless NO_ZEROES was agreed


# --- strings -------------------------------------------------------------------------------
def message(text: str) -> bytes:
    """``text`` as a wire string: UTF-8, at most MAX_STRING bytes, never a cut character."""
    raw = text.encode()
    if len(raw) <= c.MAX_STRING:
        return raw
    return raw[: c.MAX_STRING].decode("utf-8", "ignore").encode()


def string(raw: bytes) -> bytes:
    """A 32-bit length, then the bytes."""
    return U32.pack(len(raw)) + raw


def read_string(data: bytes, pos: int) -> tuple[str, int] | str:
    """The length-prefixed string at ``pos`` and the position after it, or what is wrong."""
    if pos + 4 > len(data):
        return "truncated string length"
    (n,) = U32.unpack_from(data, pos)
    pos += 4
    if n > c.MAX_STRING:
        return f"string of {n} bytes is longer than {c.MAX_STRING}"
    if pos + n > len(data):
        return "string runs past the end of the option"
    raw = data[pos : pos + n]
    if b"\0" in raw:
        return "string contains NUL"
    try:
        return raw.decode("utf-8"), pos + n
    except UnicodeDecodeError:
        return "string is not UTF-8"


# --- handshake: client -> server -----------------------------------------------------------------
def option(opt: int, payload: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(c.IHAVEOPT, opt, len(payload)) + payload


def info_request(name: str, requests: Iterable[int]) -> bytes:
    """Payload of NBD_OPT_INFO / NBD_OPT_GO: export name, then the NBD_INFO_* wanted."""
    wanted = tuple(requests)
    return string(name.encode()) + struct.pack(f">H{len(wanted)}H", len(wanted), *wanted)


def parse_info_request(data: bytes) -> tuple[str, tuple[int, ...]] | str:
    got = read_string(data, 0)
    if isinstance(got, str):
        return got
    name, pos = got
    if pos + 2 > len(data):
        return "missing number of information requests"
    (count,) = U16.unpack_from(data, pos)
    pos += 2
    if len(data) != pos + 2 * count:
        return "length does not match the number of information requests"
    return name, struct.unpack_from(f">{count}H", data, pos)


def meta_request(name: str, queries: Iterable[str]) -> bytes:
    """Payload of NBD_OPT_LIST/SET_META_CONTEXT: export name, then the queries."""
    wanted = [q.encode() for q in queries]
    return string(name.encode()) + U32.pack(len(wanted)) + b"".join(string(q) for q in wanted)


def parse_meta_request(data: bytes) -> tuple[str, tuple[str, ...]] | str:
    got = read_string(data, 0)
    if isinstance(got, str):
        return got
    name, pos = got
    if pos + 4 > len(data):
        return "missing number of queries"
    (count,) = U32.unpack_from(data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        q = read_string(data, pos)
        if isinstance(q, str):
            return q
        queries.append(q[0])
        pos = q[1]
    if pos != len(data):
        return "trailing bytes after the queries"
    return name, tuple(queries)


# --- handshake: server -> client -----------------------------------------------------------------
def option_reply(opt: int, rep: int, payload_length: int = 0) -> bytes:
    """The header of an option reply; its payload follows separately."""
    return OPTION_REPLY_HEADER.pack(c.OPTION_REPLY_MAGIC, opt, rep, payload_length)


def server_entry(name: str) -> bytes:
    """Payload of NBD_REP_SERVER (one export of NBD_OPT_LIST)."""
    return string(name.encode())


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(c.Info.EXPORT, size, flags)


def info_text(kind: c.Info, text: str) -> bytes:
    """NBD_INFO_NAME / NBD_INFO_DESCRIPTION: the type, then the text (no length field)."""
    return U16.pack(kind) + text.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(c.Info.BLOCK_SIZE, minimum, preferred, maximum)


def parse_info(payload: bytes) -> tuple[int, tuple[int, ...]] | None:
    """An NBD_REP_INFO payload as (NBD_INFO type, values) for the two types a client
    needs (EXPORT: size, flags; BLOCK_SIZE: minimum, preferred, maximum); None for the
    rest and for payloads too short to hold them."""
    if len(payload) < 2:
        return None
    (kind,) = U16.unpack_from(payload)
    if kind == c.Info.EXPORT and len(payload) >= INFO_EXPORT.size:
        return kind, INFO_EXPORT.unpack_from(payload)[1:]
    if kind == c.Info.BLOCK_SIZE and len(payload) >= INFO_BLOCK_SIZE.size:
        return kind, INFO_BLOCK_SIZE.unpack_from(payload)[1:]
    return None


def meta_context(context_id: int, name: str) -> bytes:
    """Payload of NBD_REP_META_CONTEXT."""
    return U32.pack(context_id) + name.encode()


def parse_meta_context(payload: bytes) -> tuple[int, str] | None:
    if len(payload) < 4:
        return None
    (context_id,) = U32.unpack_from(payload)
    return context_id, payload[4:].decode("utf-8", "replace")


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    raw = EXPORT_NAME_REPLY.pack(size, flags)
    return raw if no_zeroes else raw + NO_ZEROES_PAD


# --- transmission ----------------------------------------------------------------------------
def request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    """A request header; a WRITE's payload follows separately."""
    return REQUEST.pack(c.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def simple_reply(cookie: int, errno: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, errno, cookie)


def chunk(flags: int, rtype: int, cookie: int, length: int) -> bytes:
    """A structured reply chunk's header; its payload follows."""
    return STRUCTURED_REPLY.pack(c.STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length)


def error_payload(errno: int, text: str) -> bytes:
    """Payload of NBD_REPLY_TYPE_ERROR: the errno and a message."""
    raw = message(text)
    return ERROR_CHUNK.pack(errno, len(raw)) + raw


def parse_error(payload: bytes | memoryview) -> tuple[int, str] | str:
    """(errno, message) of an ERROR / ERROR_OFFSET chunk."""
    if len(payload) < ERROR_CHUNK.size:
        return "short error chunk"
    errno, length = ERROR_CHUNK.unpack_from(payload)
    text = bytes(payload[ERROR_CHUNK.size : ERROR_CHUNK.size + length]).decode("utf-8", "replace")
    return errno, text


def hole_payload(offset: int, length: int) -> bytes:
    return HOLE_CHUNK.pack(offset, length)


def block_status_payload(context_id: int, extents: Iterable[tuple[int, int]]) -> bytes:
    """Payload of NBD_REPLY_TYPE_BLOCK_STATUS: the context id, then (length, flags) pairs."""
    return U32.pack(context_id) + b"".join(DESCRIPTOR.pack(length, flags) for length, flags in extents)


def parse_block_status(payload: bytes | memoryview) -> tuple[int, list[tuple[int, int]]] | str:
    """(context id, descriptors) of a BLOCK_STATUS chunk; a trailing partial descriptor is
    ignored."""
    if len(payload) < 4:
        return "short block status chunk"
    (context_id,) = U32.unpack_from(payload)
    count = (len(payload) - 4) // DESCRIPTOR.size
    extents = [DESCRIPTOR.unpack_from(payload, 4 + DESCRIPTOR.size * i) for i in range(count)]
    return context_id, extents

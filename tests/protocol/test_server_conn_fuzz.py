"""Property tests: ServerConnection never raises on hostile input and does not care how
its input is cut.

A small application (``answer``) replies to every event the way the real one does, so
the connection is driven through all its phases, not only the handshake.
"""

from __future__ import annotations

import itertools
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire import (
    REQUEST_MAGIC,
    client_flags,
    info_data,
    meta_data,
    option,
    request,
    sent,
)

from deltavol.nbd.constants import ALLOWED_CMD_FLAGS, Cmd, CmdFlag, Opt, TransmissionFlag
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
)
from deltavol.nbd.server_conn import ServerConnection

F = TransmissionFlag
MAX_BLOCK = 4096
EXPORTS = {
    "disk": ExportInfo(
        "disk",
        1 << 30,
        int(F.HAS_FLAGS | F.SEND_FLUSH | F.SEND_FUA | F.SEND_TRIM | F.SEND_WRITE_ZEROES | F.SEND_DF),
        description="fuzz disk",
        max_block=MAX_BLOCK,
    ),
    "ro": ExportInfo("ro", 1 << 20, int(F.HAS_FLAGS | F.READ_ONLY), max_block=MAX_BLOCK),
}
EVENT_TYPES = (OptExportName, OptInfo, OptList, OptMetaContext, Request, BadRequest, Closed)
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


# --- the application --------------------------------------------------------------------------
def answer(conn: ServerConnection, event: object) -> Closed | None:
    """Reply as deltavol's server would; return the Closed that a refusal produces."""
    if isinstance(event, OptExportName):
        if event.name in EXPORTS:
            conn.accept_export(EXPORTS[event.name])
            return None
        return conn.refuse_export_name(f"no export {event.name!r}")
    if isinstance(event, OptInfo):
        conn.reply_info(EXPORTS.get(event.name), f"no export {event.name!r}")
    elif isinstance(event, OptList):
        conn.reply_list(list(EXPORTS))
    elif isinstance(event, OptMetaContext):
        conn.reply_meta_context(event.name in EXPORTS, f"no export {event.name!r}")
    elif isinstance(event, BadRequest):
        conn.send_error(event.cookie, event.errno, event.reason)
    elif isinstance(event, Request):
        check_request(conn, event)
        if event.cmd is Cmd.READ:
            conn.send_read(event.cookie, event.offset, [(event.length, None)])
        elif event.cmd is Cmd.BLOCK_STATUS:
            conn.send_block_status(event.cookie, [(max(1, event.length), 0)])
        else:
            conn.send_ok(event.cookie)
    return None


def check_request(conn: ServerConnection, req: Request) -> None:
    """What every Request handed to the application must satisfy."""
    allowed = int(ALLOWED_CMD_FLAGS[req.cmd])
    assert conn.export is not None
    if conn.export.flags & F.SEND_FUA:
        allowed |= CmdFlag.FUA
    assert req.flags & ~allowed == 0, (req.cmd, req.flags)
    if req.cmd is Cmd.WRITE:
        assert len(req.data) == req.length
    else:
        assert req.data == b""
    if req.cmd in (Cmd.READ, Cmd.WRITE):
        assert req.length <= MAX_BLOCK
    if req.cmd is Cmd.BLOCK_STATUS:
        assert conn.meta_contexts


def pump(conn: ServerConnection) -> list[object]:
    """Events up to NEED_DATA or Closed, each answered by the application."""
    events: list[object] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        assert isinstance(event, EVENT_TYPES), event
        events.append(event)
        if isinstance(event, Closed):
            return events
        closed = answer(conn, event)
        if closed is not None:
            events.append(closed)
            return events


def run(pieces: list[bytes], eof: bool) -> tuple[list[object], bytes]:
    """Feed ``pieces`` one by one (then EOF); return the events and all bytes sent back."""
    conn = ServerConnection()
    out = [sent(conn)]
    events: list[object] = []
    for piece in [*pieces, b""] if eof else pieces:
        conn.receive_data(piece)
        events += pump(conn)
        out.append(sent(conn))
        if events and isinstance(events[-1], Closed):
            check_closed_stays_closed(conn, events[-1])
            break
    return events, b"".join(out)


def check_closed_stays_closed(conn: ServerConnection, closed: Closed) -> None:
    for more in (request(Cmd.FLUSH), option(Opt.LIST), b"\0" * 40, b""):
        conn.receive_data(more)
        assert conn.next_event() == closed
        assert sent(conn) == b""


def cut(stream: bytes, sizes: list[int]) -> list[bytes]:
    """``stream`` in pieces of ``sizes`` (cycled), so that every byte is fed once."""
    pieces = []
    pos = 0
    i = 0
    while pos < len(stream):
        size = sizes[i % len(sizes)] if sizes else len(stream)
        pieces.append(stream[pos : pos + size])
        pos += size
        i += 1
    return pieces


# --- strategies --------------------------------------------------------------------------------
names = st.sampled_from(["disk", "ro", "", "nope", "dïsk"])
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def random_option(draw: st.DrawFn) -> bytes:
    """An option header with the right magic around arbitrary, possibly lying, contents."""
    opt = draw(st.one_of(st.sampled_from(list(Opt)), u32))
    data = draw(st.binary(max_size=64))
    length = draw(st.one_of(st.just(len(data)), st.integers(0, 80), u32))
    return struct.pack(">QII", 0x49484156454F5054, opt, length) + data


@st.composite
def random_request(draw: st.DrawFn) -> bytes:
    """A request header with the right magic around arbitrary fields."""
    # Mostly known commands and single flags, so that many requests get through.
    if draw(st.integers(0, 4)):
        cmd = draw(st.sampled_from([c for c in Cmd if c is not Cmd.DISC]))
    else:
        cmd = draw(st.integers(0, 0xFFFF))
    if draw(st.integers(0, 4)):
        flags = draw(st.sampled_from([0, *(1 << bit for bit in range(16))]))
    else:
        flags = draw(st.integers(0, 0xFFFF))
    data = draw(st.binary(max_size=64))
    if draw(st.integers(0, 4)):  # mostly in step: a payload only on WRITE, of its length
        data = data if cmd == Cmd.WRITE else b""
        length = len(data) if cmd == Cmd.WRITE else draw(st.one_of(st.integers(0, 5000), u32))
    else:
        length = draw(st.one_of(st.just(len(data)), st.integers(0, 5000), u32))
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, draw(u64), draw(u64), length) + data


IN_TRANSMISSION = [
    client_flags() + option(Opt.GO, info_data("disk")),
    client_flags() + option(Opt.STRUCTURED_REPLY) + option(Opt.GO, info_data("disk")),
    client_flags()
    + option(Opt.STRUCTURED_REPLY)
    + option(Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation"]))
    + option(Opt.GO, info_data("disk")),
    client_flags(0) + option(Opt.EXPORT_NAME, b"ro"),
]
noise = st.binary(max_size=40)


def _concat(prefix: bytes, parts: list[bytes]) -> bytes:
    return prefix + b"".join(parts)


@st.composite
def random_streams(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 4))
    if kind == 0:  # pure noise, from the first byte or after the client flags
        prefix = draw(st.sampled_from([b"", client_flags()]))
        return _concat(prefix, draw(st.lists(noise, max_size=3)))
    if kind == 1:  # option headers with lying lengths and junk payloads, and some noise
        parts = st.lists(st.one_of(random_option(), noise), max_size=8)
        return _concat(client_flags(), draw(parts))
    # request headers with arbitrary fields, and some noise, in transmission
    parts = st.lists(st.one_of(random_request(), random_request(), noise), max_size=10)
    return _concat(draw(st.sampled_from(IN_TRANSMISSION)), draw(parts))


piece_sizes = st.lists(st.integers(1, 64), min_size=1, max_size=20)


@st.composite
def valid_streams(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid client: a handshake, some requests, maybe NBD_CMD_DISC.

    Returns the stream and the number of requests in it (DISC not counted).
    """
    parts = [client_flags(draw(st.sampled_from([0, 1, 2, 3])))]
    structured = False
    meta_for: str | None = None
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(
            st.sampled_from(["list", "info", "structured", "list-meta", "set-meta", "unsupported", "go-bad"])
        )
        if kind == "list":
            parts.append(option(Opt.LIST))
        elif kind == "info":
            parts.append(option(Opt.INFO, info_data(draw(names), draw(st.lists(st.integers(0, 5))))))
        elif kind == "structured":
            parts.append(option(Opt.STRUCTURED_REPLY))
            structured = True
        elif kind in ("list-meta", "set-meta"):
            name = draw(names)
            queries = draw(st.lists(st.sampled_from(["base:allocation", "base:", "x-a:b"])))
            opt = Opt.SET_META_CONTEXT if kind == "set-meta" else Opt.LIST_META_CONTEXT
            parts.append(option(opt, meta_data(name, queries)))
            if kind == "set-meta":
                selected = structured and name in EXPORTS and "base:allocation" in queries
                meta_for = name if selected else None
        elif kind == "unsupported":
            parts.append(option(draw(st.sampled_from([Opt.STARTTLS, 4, 11, 1234])), b"xyz"))
        else:
            parts.append(option(Opt.GO, info_data("nope")))
    export = EXPORTS[draw(st.sampled_from(list(EXPORTS)))]
    if draw(st.booleans()):
        parts.append(option(Opt.GO, info_data(export.name, draw(st.lists(st.integers(0, 3))))))
    else:
        parts.append(option(Opt.EXPORT_NAME, export.name.encode()))

    cmds = [Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES]
    if meta_for == export.name:
        cmds.append(Cmd.BLOCK_STATUS)
    count = draw(st.integers(0, 8))
    for _ in range(count):
        cmd = draw(st.sampled_from(cmds))
        allowed = int(ALLOWED_CMD_FLAGS[cmd])
        if export.flags & F.SEND_FUA:
            allowed |= CmdFlag.FUA
        if not (structured and export.flags & F.SEND_DF):  # DF only where SEND_DF is advertised
            allowed &= ~int(CmdFlag.DF)
        flags = draw(st.sampled_from([f for f in range(32) if f & ~allowed == 0]))
        if cmd is Cmd.WRITE:
            data = draw(st.binary(max_size=MAX_BLOCK // 8))
            parts.append(request(cmd, cookie=draw(u64), offset=draw(u64), flags=flags, data=data))
        else:
            length = draw(st.integers(0, MAX_BLOCK) if cmd is Cmd.READ else u32)
            parts.append(request(cmd, cookie=draw(u64), offset=draw(u64), flags=flags, length=length))
    if draw(st.booleans()):
        parts.append(request(Cmd.DISC))
    return b"".join(parts), count


@st.composite
def mutations(draw: st.DrawFn, stream: bytes) -> bytes:
    """``stream`` with a few bytes flipped, inserted or removed, or cut short."""
    data = bytearray(stream)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if kind == "flip" and pos < len(data):
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del data[pos:]
    return bytes(data)


# --- properties --------------------------------------------------------------------------------
@FUZZ
@given(random_streams(), piece_sizes, st.booleans())
def test_random_bytes_only_ever_produce_events(stream: bytes, sizes: list[int], eof: bool) -> None:
    run(cut(stream, sizes), eof)


@FUZZ
@given(valid_streams())
def test_valid_stream_gives_every_request_and_no_refusal(case: tuple[bytes, int]) -> None:
    stream, count = case
    events, _ = run([stream], eof=True)
    requests = [e for e in events if isinstance(e, Request)]
    assert len(requests) == count
    assert not any(isinstance(e, BadRequest) for e in events)
    assert isinstance(events[-1], Closed) and events[-1].clean


@FUZZ
@given(valid_streams(), st.data())
def test_mutated_valid_stream_never_raises(case: tuple[bytes, int], data: st.DataObject) -> None:
    stream = data.draw(mutations(case[0]))
    run(cut(stream, data.draw(piece_sizes)), data.draw(st.booleans()))


@FUZZ
@given(valid_streams(), st.lists(st.integers(0, 10_000), max_size=12), st.booleans())
def test_cutting_the_stream_anywhere_changes_nothing(
    case: tuple[bytes, int], cuts: list[int], eof: bool
) -> None:
    stream = case[0]
    points = sorted({p % (len(stream) + 1) for p in cuts} | {0, len(stream)})
    pieces = [stream[a:b] for a, b in itertools.pairwise(points)]  # never b"" (EOF)
    assert run(pieces, eof) == run([stream], eof)


@FUZZ
@given(valid_streams(), st.data())
def test_cutting_a_mutated_stream_anywhere_changes_nothing(
    case: tuple[bytes, int], data: st.DataObject
) -> None:
    stream = data.draw(mutations(case[0]))
    whole = run([stream], eof=True)
    assert run(cut(stream, data.draw(piece_sizes)), eof=True) == whole

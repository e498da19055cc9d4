"""A black-box NBD fuzzer written from the protocol specification (NetworkBlockDevice/nbd
doc/proto.md) alone: raw sockets, the standard library, no project code.

Several connections, with and without structured replies, pipeline READ, WRITE, TRIM,
WRITE_ZEROES, FLUSH, CACHE and BLOCK_STATUS at random offsets and lengths (tiny, unaligned,
large, at the end of the export) against an exact model of the export:

- a request is only sent when it cannot race one in flight (a request that changes data
  never overlaps another in flight), so the model is exact whatever order replies come in;
- the bytes a READ must return are taken from the model when it is sent; bytes after a TRIM
  are unknown (the spec lets them be anything) until written again;
- every read chunk, hole and block-status extent is checked against the model.

Other connections send invalid input (bad magic, flags, commands, lengths, truncated
requests, hang-ups mid-payload and with replies unread) and check what the spec asks for.
Run ``python nbdfuzz.py SOCKET EXPORT SECONDS [SEED]`` against any server.
"""

from __future__ import annotations

import random
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

# --- constants from the specification ----------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_ABORT, OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 2, 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA = 1, 2, 4, 8
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_SEND_DF = 32, 64, 128
TF_CAN_MULTI_CONN, TF_SEND_CACHE, TF_SEND_FAST_ZERO = 256, 1024, 2048
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 5, 6
CMD_BLOCK_STATUS = 7
CF_FUA, CF_NO_HOLE, CF_DF, CF_REQ_ONE, CF_FAST_ZERO = 1, 2, 4, 8, 16
REPLY_FLAG_DONE = 1
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR, CHUNK_ERROR_OFFSET = (1 << 15) + 1, (1 << 15) + 2
STATE_HOLE, STATE_ZERO = 1, 2
EINVAL, ENOTSUP, EOVERFLOW = 22, 95, 75
MUTATING = {CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES}


class Mismatch(AssertionError):
    """The server broke the specification or returned bytes the model says are wrong."""


# --- the model ---------------------------------------------------------------------------
class Model:
    """The export's bytes, which of them are known, and the requests in flight."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)  # a fresh export reads as zeroes
        self.known = bytearray(b"\x01" * size)
        self.lock = threading.Lock()
        self.inflight: dict[int, tuple[int, int, bool]] = {}  # token -> (start, end, mutating)
        self._token = 0

    def claim(self, start: int, end: int, mutating: bool) -> int | None:
        """Register a request unless it could race one in flight; None means "pick another"."""
        for s, e, m in self.inflight.values():
            if start < e and s < end and (m or mutating):
                return None
        self._token += 1
        self.inflight[self._token] = (start, end, mutating)
        return self._token

    def release(self, token: int) -> None:
        del self.inflight[token]

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self.known[offset : offset + len(data)] = b"\x01" * len(data)

    def forget(self, offset: int, length: int) -> None:
        self.known[offset : offset + length] = bytes(length)

    def expected(self, offset: int, length: int) -> tuple[bytes, bytes]:
        return bytes(self.data[offset : offset + length]), bytes(self.known[offset : offset + length])


def check_bytes(got: bytes, want: bytes, known: bytes, where: int) -> None:
    """``got`` must equal ``want`` wherever ``known`` is 1."""
    if len(got) != len(want):
        raise Mismatch(f"at {where}: {len(got)} bytes returned, {len(want)} expected")
    if got == want:
        return
    pos = 0
    while pos < len(known):
        start = known.find(b"\x01", pos)
        if start < 0:
            return
        end = known.find(b"\x00", start)
        end = len(known) if end < 0 else end
        if got[start:end] != want[start:end]:
            bad = next(i for i in range(start, end) if got[i] != want[i])
            raise Mismatch(f"byte {where + bad}: got {got[bad]:#04x}, model has {want[bad]:#04x}")
        pos = end


# --- wire helpers ------------------------------------------------------------------------
class Wire:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            more = self.sock.recv(min(n - got, 1 << 20))
            if not more:
                raise EOFError(f"server closed after {got} of {n} bytes")
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, got_opt, rep, length = struct.unpack(">QIII", self.recv(20))
        if magic != OPT_REPLY_MAGIC or got_opt != opt:
            raise Mismatch(f"bad option reply magic {magic:#x} / option {got_opt}")
        return rep, self.recv(length)


def request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(60)
    sock.connect(path)
    return sock


@dataclass
class Export:
    size: int
    flags: int
    max_block: int
    structured: bool
    meta_id: int | None


def handshake(path: str, name: str, structured: bool, meta: bool) -> tuple[Wire, Export]:
    wire = Wire(connect(path))
    magic, opt_magic, hflags = struct.unpack(">QQH", wire.recv(18))
    if (magic, opt_magic) != (NBDMAGIC, IHAVEOPT) or not hflags & FLAG_FIXED_NEWSTYLE:
        raise Mismatch(f"bad greeting {magic:#x} {opt_magic:#x} {hflags:#x}")
    wire.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))
    meta_id = None
    if structured:
        wire.option(OPT_STRUCTURED_REPLY)
        rep, _ = wire.option_reply(OPT_STRUCTURED_REPLY)
        structured = rep == REP_ACK
    if structured and meta:
        query = b"base:allocation"
        data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">II", 1, len(query)) + query
        wire.option(OPT_SET_META_CONTEXT, data)
        while True:
            rep, payload = wire.option_reply(OPT_SET_META_CONTEXT)
            if rep != REP_META_CONTEXT:
                break  # ACK, or an error: no context then
            if payload[4:] == query:
                meta_id = struct.unpack_from(">I", payload)[0]
    data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
    wire.option(OPT_GO, data)
    size = flags = -1
    max_block = 32 << 20  # the spec's default maximum payload
    while True:
        rep, payload = wire.option_reply(OPT_GO)
        if rep == REP_INFO and struct.unpack_from(">H", payload)[0] == INFO_EXPORT:
            size, flags = struct.unpack_from(">QH", payload, 2)
        elif rep == REP_INFO and struct.unpack_from(">H", payload)[0] == INFO_BLOCK_SIZE:
            _min, _pref, max_block = struct.unpack_from(">III", payload, 2)
        elif rep == REP_ACK:
            break
        elif rep != REP_INFO:
            raise Mismatch(f"NBD_OPT_GO for {name!r} refused: {rep:#x} {payload!r}")
    if flags & TF_SEND_DF and not structured:
        raise Mismatch(f"NBD_FLAG_SEND_DF advertised without structured replies ({flags:#x})")
    return wire, Export(size, flags, max_block, structured, meta_id)


# --- one valid connection ----------------------------------------------------------------
@dataclass
class Pending:
    cmd: int
    offset: int
    length: int
    flags: int
    token: int
    want: bytes = b""
    known: bytes = b""
    covered: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Stats:
    ops: dict[str, int] = field(default_factory=dict)
    bytes_checked: int = 0
    bad_inputs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.ops[name] = self.ops.get(name, 0) + n

    @property
    def total(self) -> int:
        return sum(self.ops.values())


NAMES = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write_zeroes",
    CMD_BLOCK_STATUS: "block_status",
}


class Client:
    def __init__(
        self, path: str, name: str, model: Model, stats: Stats, rng: random.Random, structured: bool
    ) -> None:
        self.wire, self.export = handshake(path, name, structured, meta=structured)
        if self.export.size != model.size:
            raise Mismatch(f"export size {self.export.size}, expected {model.size}")
        self.model, self.stats, self.rng = model, stats, rng
        self.cookie = rng.getrandbits(32) << 16

    def span(self, limit: int) -> tuple[int, int]:
        """A random (offset, length) inside the export: tiny, unaligned, large or at the end."""
        size, rng = self.model.size, self.rng
        limit = min(limit, self.export.max_block, size)
        kind = rng.random()
        if kind < 0.3:
            length = rng.randint(1, 16)
        elif kind < 0.9:
            length = rng.randint(1, min(limit, 65536))
        else:
            length = rng.randint(1, limit)
        if rng.random() < 0.15:
            offset = size - length  # right at the end
        elif rng.random() < 0.3:
            offset = rng.randrange(0, size - length + 1, 512) if size - length >= 512 else 0
        else:
            offset = rng.randint(0, size - length)
        return offset, length

    def pick(self) -> Pending | None:
        flags = self.export.flags
        ro = bool(flags & TF_READ_ONLY)
        cmds = [CMD_READ] * 4
        if not ro:
            cmds += [CMD_WRITE] * 4
            if flags & TF_SEND_TRIM:
                cmds.append(CMD_TRIM)
            if flags & TF_SEND_WRITE_ZEROES:
                cmds += [CMD_WRITE_ZEROES] * 2
        if flags & TF_SEND_FLUSH and self.rng.random() < 0.3:
            cmds.append(CMD_FLUSH)
        if flags & TF_SEND_CACHE:
            cmds.append(CMD_CACHE)
        if self.export.meta_id is not None:
            cmds += [CMD_BLOCK_STATUS] * 2
        cmd = self.rng.choice(cmds)
        rng = self.rng
        if cmd == CMD_FLUSH:
            offset, length = 0, 0
        elif cmd in (CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS):
            offset, length = self.span(8 << 20)
        else:
            offset, length = self.span(4 << 20)
        cflags = 0
        if flags & TF_SEND_FUA and cmd in MUTATING and rng.random() < 0.2:
            cflags |= CF_FUA
        if cmd == CMD_READ and flags & TF_SEND_DF and rng.random() < 0.2:
            cflags |= CF_DF
        if cmd == CMD_WRITE_ZEROES and rng.random() < 0.3:
            cflags |= CF_NO_HOLE
        if cmd == CMD_WRITE_ZEROES and flags & TF_SEND_FAST_ZERO and rng.random() < 0.2:
            cflags |= CF_FAST_ZERO
        if cmd == CMD_BLOCK_STATUS and rng.random() < 0.3:
            cflags |= CF_REQ_ONE
        with self.model.lock:
            token = self.model.claim(offset, offset + length, cmd in MUTATING)
            if token is None:
                return None
            p = Pending(cmd, offset, length, cflags, token)
            if cmd in (CMD_READ, CMD_BLOCK_STATUS):
                p.want, p.known = self.model.expected(offset, length)
        return p

    def round(self) -> None:
        """Send a batch of requests at once, then read and check every reply."""
        batch: dict[int, Pending] = {}
        out: list[bytes] = []
        for _ in range(self.rng.randint(1, 8)):
            p = None
            for _attempt in range(8):  # another request if this one would race one in flight
                p = self.pick()
                if p is not None:
                    break
            if p is None:
                continue
            self.cookie += 1
            batch[self.cookie] = p
            if p.cmd == CMD_WRITE:
                data = self.rng.randbytes(p.length) if self.rng.random() < 0.7 else bytes(p.length)
                out.append(request(CMD_WRITE, self.cookie, p.offset, p.length, p.flags) + data)
                with self.model.lock:
                    self.model.write(p.offset, data)  # nothing in flight overlaps it
            else:
                out.append(request(p.cmd, self.cookie, p.offset, p.length, p.flags))
                if p.cmd == CMD_TRIM:
                    with self.model.lock:
                        self.model.forget(p.offset, p.length)
                elif p.cmd == CMD_WRITE_ZEROES:
                    with self.model.lock:
                        self.model.write(p.offset, bytes(p.length))
        try:
            self.wire.sock.sendall(b"".join(out))
            while batch:
                self.reply(batch)
        finally:
            with self.model.lock:
                for p in batch.values():
                    self.model.release(p.token)

    def reply(self, batch: dict[int, Pending]) -> None:
        magic = struct.unpack(">I", self.wire.recv(4))[0]
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", self.wire.recv(12))
            p = batch.get(cookie)
            if p is None:
                raise Mismatch(f"simple reply for unknown cookie {cookie:#x}")
            if p.cmd == CMD_BLOCK_STATUS or (p.cmd == CMD_READ and self.export.structured and not error):
                raise Mismatch(f"simple reply to {NAMES[p.cmd]} with structured replies")
            self.done(batch, cookie, p, error)
            if p.cmd == CMD_READ and not error:
                check_bytes(self.wire.recv(p.length), p.want, p.known, p.offset)
                self.stats.bytes_checked += p.length
            return
        if magic != STRUCTURED_MAGIC or not self.export.structured:
            raise Mismatch(f"bad reply magic {magic:#x}")
        cflags, ctype, cookie, length = struct.unpack(">HHQI", self.wire.recv(16))
        p = batch.get(cookie)
        if p is None:
            raise Mismatch(f"chunk for unknown cookie {cookie:#x}")
        payload = self.wire.recv(length)
        covered = p.covered
        error = 0
        if ctype in (CHUNK_ERROR, CHUNK_ERROR_OFFSET):
            if length < 6:
                raise Mismatch(f"error chunk of {length} bytes")
            error = struct.unpack_from(">I", payload)[0]
            if not error:
                raise Mismatch("error chunk with error 0")
        elif ctype == CHUNK_OFFSET_DATA:
            if p.cmd != CMD_READ or length < 9:
                raise Mismatch(f"OFFSET_DATA chunk of {length} bytes for {NAMES[p.cmd]}")
            (offset,) = struct.unpack_from(">Q", payload)
            self.check_piece(p, offset, payload[8:], covered)
        elif ctype == CHUNK_OFFSET_HOLE:
            if p.cmd != CMD_READ or length != 12:
                raise Mismatch(f"OFFSET_HOLE chunk of {length} bytes for {NAMES[p.cmd]}")
            offset, hole = struct.unpack_from(">QI", payload)
            if hole == 0:
                raise Mismatch("OFFSET_HOLE of length 0")
            self.check_piece(p, offset, bytes(hole), covered)
        elif ctype == CHUNK_BLOCK_STATUS:
            if p.cmd != CMD_BLOCK_STATUS:
                raise Mismatch(f"BLOCK_STATUS chunk for {NAMES[p.cmd]}")
            self.check_extents(p, payload)
            covered.append((p.offset, p.offset + p.length))
        elif ctype != CHUNK_NONE or length:
            raise Mismatch(f"unexpected chunk type {ctype} ({length} bytes) for {NAMES[p.cmd]}")
        if p.cmd == CMD_READ and p.flags & CF_DF and len(covered) > 1:
            raise Mismatch("a READ with NBD_CMD_FLAG_DF was answered in several chunks")
        if error:
            self.done(batch, cookie, p, error)  # fails unless the spec allows this error
            if not cflags & REPLY_FLAG_DONE:
                raise Mismatch("an allowed error must end the request")
            return
        if cflags & REPLY_FLAG_DONE:
            if p.cmd == CMD_READ:
                total = sum(e - s for s, e in covered)
                if total != p.length:
                    raise Mismatch(f"READ {p.offset}+{p.length}: chunks cover {total} bytes")
            if p.cmd == CMD_BLOCK_STATUS and not covered:
                raise Mismatch("BLOCK_STATUS done without an extent chunk")
            self.done(batch, cookie, p, 0)

    def check_piece(self, p: Pending, offset: int, data: bytes, covered: list[tuple[int, int]]) -> None:
        start, end = offset, offset + len(data)
        if start < p.offset or end > p.offset + p.length:
            raise Mismatch(f"chunk {start}+{len(data)} outside READ {p.offset}+{p.length}")
        for s, e in covered:
            if start < e and s < end:
                raise Mismatch(f"chunk {start}+{len(data)} overlaps an earlier chunk")
        covered.append((start, end))
        rel = start - p.offset
        check_bytes(data, p.want[rel : rel + len(data)], p.known[rel : rel + len(data)], start)
        self.stats.bytes_checked += len(data)

    def check_extents(self, p: Pending, payload: bytes) -> None:
        if len(payload) < 12 or (len(payload) - 4) % 8:
            raise Mismatch(f"BLOCK_STATUS payload of {len(payload)} bytes")
        (ctx,) = struct.unpack_from(">I", payload)
        if ctx != self.export.meta_id:
            raise Mismatch(f"BLOCK_STATUS for context {ctx}, negotiated {self.export.meta_id}")
        extents = [struct.unpack_from(">II", payload, i) for i in range(4, len(payload), 8)]
        if p.flags & CF_REQ_ONE and len(extents) != 1:
            raise Mismatch(f"REQ_ONE answered with {len(extents)} extents")
        pos = p.offset
        for length, state in extents:
            if length == 0:
                raise Mismatch("a zero-length extent")
            if pos >= p.offset + p.length:
                raise Mismatch("extents go on past the end of the request")
            if pos + length > self.model.size:
                raise Mismatch(f"extent {pos}+{length} runs past the export's end")
            if state & STATE_ZERO:
                lo, hi = pos - p.offset, min(pos + length, p.offset + p.length) - p.offset
                check_bytes(bytes(hi - lo), p.want[lo:hi], p.known[lo:hi], pos)
            pos += length

    def done(self, batch: dict[int, Pending], cookie: int, p: Pending, error: int) -> None:
        if error:
            fast_zero = p.cmd == CMD_WRITE_ZEROES and p.flags & CF_FAST_ZERO and error == ENOTSUP
            if not fast_zero:
                raise Mismatch(f"{NAMES[p.cmd]} {p.offset}+{p.length} flags {p.flags:#x} failed: {error}")
            with self.model.lock:
                self.model.forget(p.offset, p.length)
        del batch[cookie]
        self.stats.count(NAMES[p.cmd])

    def close(self) -> None:
        try:
            self.wire.sock.sendall(request(CMD_DISC, 0, 0, 0))
        finally:
            self.wire.sock.close()


# --- invalid input -------------------------------------------------------------------------
def bad_input(path: str, name: str, size: int, rng: random.Random) -> str:
    """Open a connection and misbehave once; check the answer the spec asks for."""
    kind = rng.choice(
        [
            "garbage",
            "bad-client-flags",
            "bad-option-magic",
            "truncated-option",
            "bad-request-magic",
            "unknown-command",
            "bad-flags",
            "read-past-end",
            "oversized-read",
            "truncated-request",
            "hangup-mid-payload",
            "hangup-replies-unread",
            "zero-length-read",
        ]
    )
    if kind in ("garbage", "bad-client-flags", "bad-option-magic", "truncated-option"):
        sock = connect(path)
        try:
            Wire(sock).recv(18)
            if kind == "garbage":
                sock.sendall(rng.randbytes(rng.randint(1, 300)))
            elif kind == "bad-client-flags":
                sock.sendall(struct.pack(">I", 1 << rng.randint(2, 31)))
            elif kind == "bad-option-magic":
                sock.sendall(struct.pack(">I", 1) + struct.pack(">QII", rng.getrandbits(64), 7, 0))
            else:
                sock.sendall(struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, 7, 100) + b"xy")
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass  # the server may answer, but must end the connection
        except OSError:
            pass
        finally:
            sock.close()
        return kind
    wire, export = handshake(path, name, rng.random() < 0.5, meta=False)
    sock = wire.sock
    cookie = rng.getrandbits(64)
    try:
        if kind == "bad-request-magic":
            sock.sendall(struct.pack(">IHHQQI", rng.getrandbits(32) | 1, 0, 0, cookie, 0, 1))
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
            return kind
        if kind in ("unknown-command", "bad-flags", "read-past-end", "oversized-read"):
            if kind == "unknown-command":
                req = request(rng.randint(8, 0xFFFF), cookie, 0, 512)
            elif kind == "bad-flags":
                req = request(CMD_READ, cookie, 0, 512, 1 << rng.randint(5, 15))
            elif kind == "read-past-end":
                req = request(CMD_READ, cookie, size - rng.randint(0, 100), 512)
            else:
                req = request(CMD_READ, cookie, 0, export.max_block + 1)
            sock.sendall(req)
            try:
                check_refused(wire, export, cookie)
            except EOFError:
                if kind != "oversized-read":  # the spec lets a server hang up on this one
                    raise
                return kind
            sock.sendall(request(CMD_DISC, 0, 0, 0))
            return kind
        if kind == "zero-length-read":
            sock.sendall(request(CMD_READ, cookie, rng.randint(0, size), 0))
            check_empty_read(wire, export, cookie)
            sock.sendall(request(CMD_DISC, 0, 0, 0))
            return kind
        if kind == "truncated-request":
            sock.sendall(request(CMD_READ, cookie, 0, 512)[: rng.randint(1, 27)])
        elif kind == "hangup-mid-payload":
            length = rng.randint(2, 1 << 20)
            payload = rng.randbytes(rng.randint(0, length - 1))
            sock.sendall(request(CMD_WRITE, cookie, rng.randint(0, size - length), length) + payload)
        else:
            for i in range(rng.randint(1, 6)):
                length = rng.randint(1, min(4 << 20, export.max_block, size))
                sock.sendall(request(CMD_READ, cookie + i, rng.randint(0, size - length), length))
        return kind
    finally:
        sock.close()


def check_refused(wire: Wire, export: Export, cookie: int) -> None:
    magic = struct.unpack(">I", wire.recv(4))[0]
    if magic == SIMPLE_MAGIC:
        error, got = struct.unpack(">IQ", wire.recv(12))
    elif magic == STRUCTURED_MAGIC and export.structured:
        flags, ctype, got, length = struct.unpack(">HHQI", wire.recv(16))
        payload = wire.recv(length)
        if ctype not in (CHUNK_ERROR, CHUNK_ERROR_OFFSET) or not flags & REPLY_FLAG_DONE:
            raise Mismatch(f"invalid request answered with chunk type {ctype}, flags {flags}")
        error = struct.unpack_from(">I", payload)[0]
    else:
        raise Mismatch(f"bad reply magic {magic:#x}")
    if got != cookie or not error:
        raise Mismatch(f"invalid request answered for cookie {got:#x} with error {error}")


def check_empty_read(wire: Wire, export: Export, cookie: int) -> None:
    """A zero-length READ: an error, or success with no data (no chunk describes 0 bytes)."""
    while True:
        magic = struct.unpack(">I", wire.recv(4))[0]
        if magic == SIMPLE_MAGIC:
            _error, got = struct.unpack(">IQ", wire.recv(12))
            if got != cookie:
                raise Mismatch(f"zero-length READ answered for cookie {got:#x}")
            return
        if magic != STRUCTURED_MAGIC or not export.structured:
            raise Mismatch(f"bad reply magic {magic:#x}")
        flags, ctype, got, length = struct.unpack(">HHQI", wire.recv(16))
        wire.recv(length)
        if got != cookie:
            raise Mismatch(f"zero-length READ answered for cookie {got:#x}")
        if (ctype == CHUNK_OFFSET_DATA and length < 9) or ctype == CHUNK_OFFSET_HOLE:
            raise Mismatch(f"zero-length READ answered with chunk type {ctype} of {length} bytes")
        if flags & REPLY_FLAG_DONE:
            return


# --- the run -------------------------------------------------------------------------------
def read_back(path: str, name: str, model: Model) -> None:
    """Read the whole export on a fresh connection; every known byte must match the model."""
    wire, export = handshake(path, name, structured=False, meta=False)
    step = min(export.max_block, 1 << 20)
    for offset in range(0, model.size, step):
        length = min(step, model.size - offset)
        wire.sock.sendall(request(CMD_READ, offset, offset, length))
        magic, error, cookie = struct.unpack(">IIQ", wire.recv(16))
        if (magic, error, cookie) != (SIMPLE_MAGIC, 0, offset):
            raise Mismatch(f"final read at {offset}: {magic:#x} {error} {cookie:#x}")
        want, known = model.expected(offset, length)
        check_bytes(wire.recv(length), want, known, offset)
    wire.sock.sendall(request(CMD_DISC, 0, 0, 0))
    wire.sock.close()


def fuzz(path: str, name: str, size: int, seconds: float, seed: int, connections: int = 4) -> Stats:
    """Drive the export for ``seconds``; raise Mismatch (naming the seed) on any violation."""
    model, stats = Model(size), Stats()
    failures: list[BaseException] = []
    wire, export = handshake(path, name, structured=False, meta=False)
    wire.sock.close()
    if not export.flags & TF_CAN_MULTI_CONN:
        connections = 1  # without it, one connection need not see another's writes at once
    stop = time.monotonic() + seconds

    def valid(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        try:
            client = Client(path, name, model, stats, rng, structured=i % 2 == 0)
            while time.monotonic() < stop and not failures:
                client.round()
            client.close()
        except BaseException as exc:  # reported by the caller
            failures.append(exc)

    def invalid(i: int) -> None:
        rng = random.Random(seed * 1000 + 500 + i)
        try:
            while time.monotonic() < stop and not failures:
                bad_input(path, name, size, rng)
                with stats.lock:
                    stats.bad_inputs += 1
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=valid, args=(i,)) for i in range(connections)]
    threads += [threading.Thread(target=invalid, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise Mismatch(f"seed {seed}: {failures[0]!r}") from failures[0]
    read_back(path, name, model)
    return stats


if __name__ == "__main__":
    sock_path, export_name, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
    run_seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    wire0, info = handshake(sock_path, export_name, False, False)
    wire0.sock.close()
    result = fuzz(sock_path, export_name, info.size, secs, run_seed)
    print(f"seed {run_seed}: {result.total} checked requests {result.ops}, {result.bad_inputs} bad inputs")

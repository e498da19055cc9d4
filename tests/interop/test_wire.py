"""Hostile and broken clients on a real socket: each gets the reply the NBD specification
asks for (or a closed connection), a log line, and changes no byte; the server goes on
serving everyone else."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness import Server
from tests.interop.peers import qemu_io
from tests.protocol.wire import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    client_flags,
    info_data,
    option,
    request,
)

pytestmark = pytest.mark.interop

OPT_GO, OPT_ABORT = 7, 2
REP_ACK, REP_INFO = 1, 3
ERR_UNSUP, ERR_UNKNOWN = 2**31 + 1, 2**31 + 6
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
EINVAL, ENOSPC = 22, 28
SIZE = 1 << 20


class Wire:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            more = self.sock.recv(n - len(buf))
            if not more:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += more
        return buf

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.recv(20))
        assert magic == OPTION_REPLY_MAGIC
        return opt, rep, self.recv(length)

    def simple_reply(self, data_len: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == SIMPLE_REPLY_MAGIC
        return error, cookie, self.recv(data_len) if not error else b""

    def closed(self) -> bool:
        self.sock.settimeout(10)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


@contextmanager
def connect(server: Server) -> Iterator[Wire]:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(server.sock))
    try:
        yield Wire(sock)
    finally:
        sock.close()


@contextmanager
def handshake(server: Server) -> Iterator[Wire]:
    """Fixed newstyle to OPT_GO on volume ``v``, simple replies."""
    with connect(server) as w:
        magic, opt_magic, _flags = struct.unpack(">QQH", w.recv(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        w.sock.sendall(client_flags() + option(OPT_GO, info_data("v")))
        while True:
            _opt, rep, _data = w.option_reply()
            if rep == REP_ACK:
                break
            assert rep == REP_INFO, hex(rep)
        yield w


@pytest.fixture
def vol(server: Server) -> bytes:
    server.cli("volume", "create", "v", "--size", str(SIZE))
    qemu_io(server.uri("v"), f"write -P 0x3c 0 {SIZE}")
    return server.image("v")


def still_serving(server: Server, image: bytes) -> None:
    assert server.proc is not None and server.proc.poll() is None
    assert server.image("v") == image
    qemu_io(server.uri("v"), f"read -P 0x3c 0 {SIZE}", read_only=True)


def test_garbage_instead_of_a_handshake_closes_only_that_connection(server: Server, vol: bytes) -> None:
    with connect(server) as w:
        w.recv(18)
        w.sock.sendall(b"\xff" * 4 + b"GET / HTTP/1.1\r\n\r\n" * 10)
        assert w.closed()
    still_serving(server, vol)


def test_unknown_option_and_unknown_export(server: Server, vol: bytes) -> None:
    with connect(server) as w:
        w.recv(18)
        w.sock.sendall(client_flags() + option(0x7777, b"junk"))
        assert w.option_reply()[:2] == (0x7777, ERR_UNSUP)
        w.sock.sendall(option(OPT_GO, info_data("no-such-volume")))
        opt, rep, message = w.option_reply()
        assert (opt, rep) == (OPT_GO, ERR_UNKNOWN) and b"no-such-volume" in message
        w.sock.sendall(option(OPT_ABORT))
        assert w.option_reply()[:2] == (OPT_ABORT, REP_ACK)
        assert w.closed()
    assert "no-such-volume" in server.log_path.read_text()
    still_serving(server, vol)


def test_out_of_range_read_and_write_change_nothing(server: Server, vol: bytes) -> None:
    with handshake(server) as w:
        w.sock.sendall(request(CMD_READ, cookie=1, offset=SIZE - 512, length=1024))
        assert w.simple_reply()[:2] == (EINVAL, 1)
        w.sock.sendall(request(CMD_WRITE, cookie=2, offset=SIZE - 512, data=b"\x99" * 1024))
        error, cookie, _ = w.simple_reply()
        assert cookie == 2 and error in (EINVAL, ENOSPC)
        w.sock.sendall(request(CMD_WRITE, cookie=3, offset=2**63, data=b"\x99" * 512))
        assert w.simple_reply()[:2] in ((EINVAL, 3), (ENOSPC, 3))
        w.sock.sendall(request(CMD_READ, cookie=4, offset=0, length=512))
        assert w.simple_reply(512) == (0, 4, b"\x3c" * 512)  # the connection goes on
    still_serving(server, vol)


def test_unknown_command_and_flags_are_refused(server: Server, vol: bytes) -> None:
    with handshake(server) as w:
        w.sock.sendall(request(0x55, cookie=7, offset=0, length=0))
        assert w.simple_reply()[:2] == (EINVAL, 7)
        w.sock.sendall(request(CMD_READ, cookie=8, offset=0, length=512, flags=0x8000))
        assert w.simple_reply()[:2] == (EINVAL, 8)
        w.sock.sendall(request(CMD_DISC, cookie=9))
        assert w.closed()
    still_serving(server, vol)


def test_client_vanishing_mid_payload_writes_nothing(server: Server, vol: bytes) -> None:
    gone = "closing: peer closed the connection"
    before = server.log_path.read_text().count(gone)
    path = Path(json.loads(server.cli("volume", "info", "v", "--json"))["path"])
    with handshake(server) as w:
        whole = request(CMD_WRITE, cookie=1, offset=4096, data=b"\xee" * 65536)
        w.sock.sendall(whole[: 28 + 30000])
    deadline = time.monotonic() + 30  # a loaded machine may run the server late
    while server.log_path.read_text().count(gone) == before:  # it saw the payload cut short
        assert time.monotonic() < deadline, "the server never saw the client go"
        time.sleep(0.05)
    still_serving(server, vol)
    # and once it has stopped, nothing it might still have been doing can land: the volume
    # holds no byte of the cut write
    server.stop()
    assert path.read_bytes() == vol


def test_a_bad_request_magic_closes_the_connection(server: Server, vol: bytes) -> None:
    with handshake(server) as w:
        w.sock.sendall(request(CMD_WRITE, offset=0, data=b"\x01" * 512, magic=0x12345678))
        assert w.closed()
    still_serving(server, vol)

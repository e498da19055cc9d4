"""Clients that hang up with requests in flight, on a real socket: the server goes on
serving, and nothing a client does puts a traceback in its log."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from tests.harness import Server
from tests.protocol.wire import client_flags, info_data, option, request

pytestmark = pytest.mark.interop

OPT_GO, OPT_STRUCTURED_REPLY = 7, 8
REP_ACK = 1
CMD_READ = 0
SIZE = 64 << 20


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        more = sock.recv(n - len(buf))
        if not more:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += more
    return buf


def option_reply(sock: socket.socket) -> int:
    _magic, _opt, rep, length = struct.unpack(">QIII", recv_exactly(sock, 20))
    recv_exactly(sock, length)
    return int(rep)


def go(path: str, name: str, *, structured: bool) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(path)
    recv_exactly(sock, 18)
    sock.sendall(client_flags())
    if structured:
        sock.sendall(option(OPT_STRUCTURED_REPLY))
        assert option_reply(sock) == REP_ACK
    sock.sendall(option(OPT_GO, info_data(name)))
    while option_reply(sock) != REP_ACK:
        pass
    return sock


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_hang_ups_with_reads_in_flight_leave_no_traceback(server: Server, structured: bool) -> None:
    server.cli("volume", "create", "v", "--size", str(SIZE))
    rng = random.Random(13)
    for _ in range(150):
        sock = go(str(server.sock), "v", structured=structured)
        for _ in range(rng.randint(1, 6)):
            length = rng.randint(1, 4 << 20)
            offset = rng.randint(0, SIZE - length)
            sock.sendall(request(CMD_READ, cookie=rng.getrandbits(64), offset=offset, length=length))
        sock.close()  # no reply read: the server finds the socket gone mid-request
    # The server still serves, and the log holds no traceback.
    sock = go(str(server.sock), "v", structured=False)
    sock.sendall(request(CMD_READ, cookie=7, offset=SIZE - 4096, length=4096))
    header = recv_exactly(sock, 16)
    assert struct.unpack(">IIQ", header)[1:] == (0, 7)
    assert recv_exactly(sock, 4096) == bytes(4096)
    sock.close()
    server.log.flush()
    log = server.log_path.read_text()
    assert "Traceback" not in log and "exception=" not in log, log[-4000:]

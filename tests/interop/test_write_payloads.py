"""Large WRITE payloads on a real socket: they are received into buffers the server reuses
once a write is done, so a reused buffer must never change a write already acknowledged,
over plain text and TLS; a payload sent a few bytes at a time, and one cut off by a hang-up,
leave the stream (and the next payload received into the same buffer) whole."""

from __future__ import annotations

import hashlib
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import SYSTEM_PYTHON, Server, require
from tests.interop.peers import run
from tests.interop.test_hangups import go, recv_exactly
from tests.interop.tls import TlsServer
from tests.protocol.wire import request

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 32 * MiB
CMD_READ, CMD_WRITE = 0, 1

# Rounds of writes, many in flight, each of its own random bytes: 1 MiB ones over every
# MiB of the volume, then sizes that share no buffer with them (and 64 KiB + 1 byte, the
# smallest received in place), at offsets that overlap the last round's.
PIPELINED = """
import hashlib, random
h.set_uri_allow_local_file(True)  # the CA of an nbds:// URI's tls-certificates
h.connect_uri(URI)
rng = random.Random(21)
size, MiB = h.get_size(), 1 << 20
image = bytearray(size)
for rnd in range(4):
    slots = list(range(0, size, MiB))
    rng.shuffle(slots)
    for slot in slots:
        length = MiB if rnd % 2 == 0 else rng.choice((65537, 256 * 1024, 2 * MiB - 512))
        offset = min(slot + (rnd * 4096 if rnd % 2 else 0), size - length)
        data = rng.randbytes(length)
        h.aio_pwrite(data, offset)
        image[offset:offset + length] = data
        while h.aio_in_flight() >= 32:
            h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
print(hashlib.sha256(image).hexdigest())
"""


@pytest.fixture(params=["plain", "tls"])
def uri_and_server(
    request: pytest.FixtureRequest, tmp_path: Path, tls_certs: Path
) -> Iterator[tuple[str, Server]]:
    if request.param == "plain":
        srv: Server = Server(tmp_path / "data")
    else:
        srv = TlsServer(tmp_path / "data", "--tls", "require", "--tls-certificates", str(tls_certs))
    srv.start()
    try:
        srv.cli("volume", "create", "v", "--size", str(SIZE))
        yield (srv.uri("v") if request.param == "plain" else srv.nbds("v", tls_certs)), srv  # type: ignore[attr-defined]
    finally:
        srv.stop()
        srv.log.close()
    assert "Traceback" not in srv.log_path.read_text()


def test_pipelined_large_writes_of_distinct_bytes_land_whole(uri_and_server: tuple[str, Server]) -> None:
    uri, srv = uri_and_server
    require("nbdsh")
    expected = run(SYSTEM_PYTHON, "-m", "nbd", "-c", f"URI = {uri!r}\n{PIPELINED}").stdout.strip()
    assert hashlib.sha256(srv.image("v")).hexdigest() == expected


def write(sock: socket.socket, cookie: int, offset: int, data: bytes, piece: int = 0) -> None:
    """A WRITE, its payload in pieces of 1 to ``piece`` bytes (all at once when 0)."""
    sock.sendall(request(CMD_WRITE, cookie=cookie, offset=offset, length=len(data)))
    if not piece:
        sock.sendall(data)
        return
    rng, pos = random.Random(cookie), 0
    while pos < len(data):
        n = rng.randint(1, piece)
        sock.sendall(data[pos : pos + n])
        pos += n


def reply(sock: socket.socket) -> tuple[int, int]:
    _magic, error, cookie = struct.unpack(">IIQ", recv_exactly(sock, 16))
    return error, cookie


def test_payloads_in_tiny_pieces_and_cut_off_by_hang_ups_leave_writes_whole(server: Server) -> None:
    server.cli("volume", "create", "v", "--size", str(SIZE))
    rng = random.Random(3)
    sent: dict[int, bytes] = {}
    # Hang-ups mid-payload: each leaves a buffer partly filled (given back to the pool).
    for i in range(12):
        sock = go(str(server.sock), "v", structured=False)
        sock.sendall(request(CMD_WRITE, cookie=i, offset=i * MiB, length=MiB))
        sock.sendall(rng.randbytes(rng.randint(1, MiB - 1)))
        sock.close()
    # Then whole writes: the same size, so received into those buffers, some a few bytes
    # at a time; every one acknowledged, and its bytes are the file's.
    sock = go(str(server.sock), "v", structured=False)
    for i in range(8):
        data = rng.randbytes(MiB if i % 2 else 128 * 1024)
        write(sock, cookie=100 + i, offset=i * 2 * MiB, data=data, piece=13 if i < 3 else 0)
        sent[i * 2 * MiB] = data
    for _ in range(8):
        error, cookie = reply(sock)
        assert error == 0 and 100 <= cookie < 108
    image = server.image("v")
    for offset, data in sent.items():
        assert image[offset : offset + len(data)] == data, f"write at {offset} is not whole"
    for i in range(1, 12, 2):  # a payload cut off was never written (and no whole write is there)
        assert image[i * MiB : (i + 1) * MiB] == bytes(MiB), f"a cut-off payload landed at {i} MiB"
    sock.sendall(request(CMD_READ, cookie=7, offset=2 * MiB, length=4096))
    assert reply(sock) == (0, 7) and recv_exactly(sock, 4096) == sent[2 * MiB][:4096]
    sock.close()
    server.log.flush()
    log = server.log_path.read_text()
    assert "Traceback" not in log and "exception=" not in log, log[-4000:]

"""The asyncio NBD client against real servers: qemu-nbd on a file, nbdkit's memory plugin."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltavol.nbd.client import NbdClient, NbdConnectionError, NbdError, parse_uri
from tests.sessions.targets import nbdkit_memory_cmd, qemu_nbd_cmd, serving, uri

MiB = 1 << 20


@pytest.mark.parametrize(
    "text, host, port, socket, export",
    [
        ("nbd://example.org/disk", "example.org", 10809, None, "disk"),
        ("nbd://10.0.0.1:10900/a%20b", "10.0.0.1", 10900, None, "a b"),
        ("nbd://h", "h", 10809, None, ""),
        ("nbd+unix:///vol?socket=/run/x.sock", None, 10809, "/run/x.sock", "vol"),
    ],
)
def test_parse_uri(text: str, host: str | None, port: int, socket: str | None, export: str) -> None:
    u = parse_uri(text)
    assert (u.host, u.port, u.socket, u.export) == (host, port, socket, export)


@pytest.mark.parametrize("bad", ["http://h/x", "nbd:///x", "nbd+unix:///x", "nbd://h:99999999/x", "disk"])
def test_parse_uri_refuses_bad_uris(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid NBD URI"):
        parse_uri(bad)


@pytest.fixture(params=["qemu-nbd", "nbdkit"])
def server_uri(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    sock = tmp_path / "s.sock"
    if request.param == "qemu-nbd":
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(64 * MiB))
        cmd = qemu_nbd_cmd(image, sock)
    else:
        cmd = nbdkit_memory_cmd(64 * MiB, sock)
    with serving(cmd, sock):
        yield uri(sock)


async def test_pipelined_writes_zeroes_trim_and_reads(server_uri: str) -> None:
    client = await NbdClient.connect(server_uri)
    try:
        rng = random.Random(5)
        blocks = {i: rng.randbytes(65536) for i in range(0, 256, 3)}
        await asyncio.gather(*(client.pwrite(i * 65536, data) for i, data in blocks.items()))
        await client.flush()
        got = await asyncio.gather(*(client.pread(i * 65536, 65536) for i in blocks))
        assert got == list(blocks.values())
        big = rng.randbytes(40 * MiB)  # larger than any server's maximum request: split
        await client.pwrite(8 * MiB, big)
        assert await client.pread(8 * MiB, 40 * MiB) == big
        assert client.can_zero
        await client.zero(8 * MiB, MiB)
        assert await client.pread(8 * MiB, MiB) == bytes(MiB)
        if client.can_trim:
            await client.trim(9 * MiB, MiB)  # trimmed contents are unspecified; the call must work
        with pytest.raises(NbdError):
            await client.pread(64 * MiB - 512, 1024)  # past the end: the server's error
    finally:
        await client.close()


async def test_a_server_that_dies_fails_pending_requests(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with serving(nbdkit_memory_cmd(64 * MiB, sock), sock) as proc:
        client = await NbdClient.connect(uri(sock))
        await client.pwrite(0, b"x" * 4096)
        proc.kill()
        proc.wait()
    with pytest.raises((NbdConnectionError, NbdError)):
        await asyncio.wait_for(client.pread(0, 4096), 10)
    await client.close()


async def test_connecting_to_nothing_is_a_connection_error(tmp_path: Path) -> None:
    with pytest.raises(NbdConnectionError):
        await NbdClient.connect(f"nbd+unix:///x?socket={tmp_path}/none.sock", timeout=5)

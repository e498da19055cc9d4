"""The asyncio NBD client against real servers: qemu-nbd on a file, nbdkit's memory plugin."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from deltavol.server.nbd_client import NbdClient, NbdConnectionError, NbdError, parse_uri
from tests.harness import require
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


@pytest.mark.parametrize(
    "text, host, port, socket, export, certs",
    [
        ("nbds://backup.example:10900/vol", "backup.example", 10900, None, "vol", None),
        ("nbds://10.0.0.2/vol?tls-certificates=/etc/pki/dv", "10.0.0.2", 10809, None, "vol", "/etc/pki/dv"),
        ("nbds+unix:///vol?socket=/run/x.sock&tls-certificates=/c", None, 10809, "/run/x.sock", "vol", "/c"),
        ("nbds+unix:///vol?socket=/run/x.sock", None, 10809, "/run/x.sock", "vol", None),
    ],
)
def test_parse_tls_uri(
    text: str, host: str | None, port: int, socket: str | None, export: str, certs: str | None
) -> None:
    u = parse_uri(text)
    assert (u.host, u.port, u.socket, u.export, u.tls, u.tls_certificates) == (
        host,
        port,
        socket,
        export,
        True,
        certs,
    )
    assert not parse_uri("nbd://h/x").tls


@pytest.mark.parametrize(
    "bad",
    [
        "http://h/x",
        "nbd:///x",
        "nbd+unix:///x",
        "nbd://h:99999999/x",
        "disk",
        "nbds:///x",
        "nbds+unix:///x?tls-certificates=/c",
        "nbd://h/x?tls-certificates=/c",  # certificates without TLS would be ignored: refused
    ],
)
def test_parse_uri_refuses_bad_uris(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid NBD URI"):
        parse_uri(bad)


async def test_an_nbds_uri_without_a_tls_context_is_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="needs a TLS context"):
        await NbdClient.connect("nbds://127.0.0.1:1/vol")


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


@pytest.mark.interop  # qemu-nbd, nbdkit
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


@pytest.mark.interop  # qemu-nbd, nbdkit
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


def _all_threads_stopped(pid: int) -> bool:
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        if stat.rpartition(")")[2].split()[0] != "T":  # the state follows "(comm)"
            return False
    return True


@contextmanager
def stopped(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """The server hangs (SIGSTOP): its connections stay open, nothing is answered.

    The signal takes effect asynchronously (each thread stops when it next runs), so a
    request sent at once could still be answered: wait until every thread shows state T."""
    proc.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while not _all_threads_stopped(proc.pid):
            assert time.monotonic() < deadline, f"process {proc.pid} did not stop"
            time.sleep(0.001)
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


@pytest.mark.interop  # qemu-nbd, nbdkit
async def test_a_server_that_stops_answering_fails_the_connection(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with serving(nbdkit_memory_cmd(64 * MiB, sock), sock) as proc:
        client = await NbdClient.connect(uri(sock), timeout=0.5)
        try:
            await client.pwrite(0, b"x" * 4096)
            with stopped(proc):
                loop = asyncio.get_running_loop()
                began = loop.time()
                with pytest.raises(NbdConnectionError, match=r"no reply in 0\.5 s"):
                    await asyncio.wait_for(client.pwrite(4096, b"y" * 4096), 10)
                assert loop.time() - began < 5
                with pytest.raises(NbdConnectionError, match="no reply"):  # the connection is done
                    await asyncio.wait_for(client.flush(), 1)
        finally:
            await client.close()


@pytest.mark.interop  # qemu-nbd, nbdkit
async def test_a_slow_server_that_keeps_answering_is_not_timed_out(tmp_path: Path) -> None:
    """The deadline runs from the server's last reply, not from each request's start: eight
    writes, one at a time, 0.5 s each, all sent at once, outlast a 2 s timeout (a loaded
    machine may answer one a good deal later than its 0.5 s, never as late as 2 s)."""
    sock = tmp_path / "s.sock"
    cmd = ["nbdkit", "-f", "-t", "1", "-U", str(sock), "-e", "t", "--filter=delay", "memory", "1M"]
    with serving([*cmd, "wdelay=500ms"], sock):
        client = await NbdClient.connect(uri(sock), timeout=2.0)
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            await asyncio.gather(*(client.pwrite(i * 4096, bytes([i + 1]) * 4096) for i in range(8)))
            assert loop.time() - began > 2.0  # they did queue behind each other
            assert await client.pread(0, 8 * 4096) == b"".join(bytes([i + 1]) * 4096 for i in range(8))
        finally:
            await client.close()


async def test_connecting_to_a_host_that_does_not_answer_times_out() -> None:
    """A TCP listener whose accept queue is full drops SYNs, as a blackholed host does: the
    connect itself, not only the handshake, has the deadline."""
    listener = socket.socket()
    fill: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            fill.append(s)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
        with pytest.raises(NbdConnectionError, match=r"no answer in 0\.5 s"):
            await asyncio.wait_for(NbdClient.connect(f"nbd://127.0.0.1:{port}/x", timeout=0.5), 10)
    finally:
        for s in fill:
            s.close()
        listener.close()


@pytest.mark.interop  # qemu-nbd, nbdkit
async def test_a_connection_that_timed_out_is_reset_not_closed(tmp_path: Path) -> None:
    """What the socket still queues must not reach the server after the caller gave up on
    it (it could land over what is written since on a new connection): the connection is
    reset (SO_LINGER 0), which discards the queue, not closed, which delivers it."""
    sock = tmp_path / "s.sock"
    frozen = asyncio.Event()  # the server's answers stop reaching the client
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def proxy(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_unix_connection(str(sock))

        async def answers() -> None:
            while data := await server_r.read(65536):
                if not frozen.is_set():
                    client_w.write(data)

        pump = asyncio.create_task(answers())
        try:
            while data := await client_r.read(65536):
                server_w.write(data)
            ended.set_result("closed")
        except ConnectionResetError:
            ended.set_result("reset")
        finally:
            pump.cancel()
            server_w.close()
            client_w.close()

    with serving(nbdkit_memory_cmd(MiB, sock), sock):
        listener = await asyncio.start_server(proxy, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        try:
            client = await NbdClient.connect(f"nbd://127.0.0.1:{port}/", timeout=0.5)
            await client.pwrite(0, b"x" * 4096)
            frozen.set()
            with pytest.raises(NbdConnectionError, match="no reply"):
                await asyncio.wait_for(client.pwrite(4096, b"y" * 4096), 10)
            assert await asyncio.wait_for(ended, 10) == "reset"
            await client.close()
        finally:
            listener.close()
            await listener.wait_closed()


@pytest.mark.interop  # qemu-nbd, nbdkit
async def test_a_request_the_server_never_answers_fails_while_others_are_answered(tmp_path: Path) -> None:
    """A stuck request behind a server that keeps answering the others: the connection is
    never silent for ``timeout``, yet that request must not wait for ever."""
    sock = tmp_path / "s.sock"
    require("nbdkit")
    cmd = [
        "nbdkit", "-f", "-t", "4", "-U", str(sock), "-e", "t", "eval",
        "thread_model=echo parallel",
        "get_size=echo 1048576",
        "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        "pwrite=if [ $4 = 4096 ]; then sleep 10; fi; cat >/dev/null",
        "can_write=exit 0",
        "can_flush=exit 0",
        "flush=exit 0",
    ]  # fmt: skip
    with serving(cmd, sock):
        # each answer runs a shell: a loaded machine may take a second for one, never 2 s
        client = await NbdClient.connect(uri(sock), timeout=2.0, age=3.0)
        try:
            stuck = asyncio.ensure_future(client.pwrite(4096, b"s" * 4096))
            loop = asyncio.get_running_loop()
            began = loop.time()
            while not stuck.done() and loop.time() - began < 8:
                with contextlib.suppress(NbdConnectionError):
                    await client.pwrite(0, b"x" * 4096)  # answered: the connection is alive
                await asyncio.sleep(0.1)
            assert stuck.done(), "a request the server never answers waited for ever"
            with pytest.raises(NbdConnectionError, match="unanswered for 3 s"):
                stuck.result()
        finally:
            stuck.cancel()
            await client.close()


@pytest.mark.interop  # nbdkit
async def test_a_close_with_requests_outstanding_waits_for_them_or_resets(tmp_path: Path) -> None:
    """A write whose caller stopped waiting (a copy cancelled) may still be queued: a close
    waits for its reply, and when none comes within the timeout, resets the connection
    rather than deliver the write late; a DISC goes out only once nothing is outstanding."""
    sock = tmp_path / "s.sock"
    frozen = asyncio.Event()  # the server's answers stop reaching the client
    ends: list[asyncio.Future[str]] = []

    async def proxy(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        ended = ends[-1]
        server_r, server_w = await asyncio.open_unix_connection(str(sock))

        async def answers() -> None:
            while data := await server_r.read(65536):
                if not frozen.is_set():
                    client_w.write(data)

        pump = asyncio.create_task(answers())
        try:
            while data := await client_r.read(65536):
                server_w.write(data)
            ended.set_result("closed")
        except ConnectionResetError:
            ended.set_result("reset")
        finally:
            pump.cancel()
            server_w.close()
            client_w.close()

    cmd = ["nbdkit", "-f", "-t", "1", "-U", str(sock), "-e", "t", "--filter=delay", "memory", "1M"]
    require("nbdkit")
    with serving([*cmd, "wdelay=200ms"], sock):
        listener = await asyncio.start_server(proxy, "127.0.0.1", 0)
        where = f"nbd://127.0.0.1:{listener.sockets[0].getsockname()[1]}/"
        try:
            ends.append(asyncio.get_running_loop().create_future())
            client = await NbdClient.connect(where, timeout=2.0)
            writes = [asyncio.ensure_future(client.pwrite(i * 4096, b"w" * 4096)) for i in range(4)]
            await asyncio.sleep(0)  # sent
            for w in writes:
                w.cancel()
            assert client.outstanding == 4
            await client.close()  # answered one after the other, 0.8 s: they landed first
            assert client.outstanding == 0
            assert await asyncio.wait_for(ends[-1], 10) == "closed"
            reader = await NbdClient.connect(uri(sock))
            assert await reader.pread(0, 4 * 4096) == b"w" * 4 * 4096
            await reader.close()

            ends.append(asyncio.get_running_loop().create_future())
            client = await NbdClient.connect(where, timeout=0.5)
            frozen.set()
            write = asyncio.ensure_future(client.pwrite(0, b"x" * 4096))
            await asyncio.sleep(0)
            write.cancel()
            loop = asyncio.get_running_loop()
            began = loop.time()
            await client.close()  # no answer in 0.5 s: reset, not closed
            assert loop.time() - began < 5
            assert await asyncio.wait_for(ends[-1], 10) == "reset"
        finally:
            listener.close()
            await listener.wait_closed()


@pytest.mark.interop  # nbdkit
async def test_a_drain_waits_for_the_requests_sent_before_it_not_those_after(tmp_path: Path) -> None:
    """A pause drains its stopped copy's requests while clients go on writing: their
    copy-before-writes keep some requests in flight all the time, each answered in time.
    The drain waits for those sent before it, not for ever."""
    sock = tmp_path / "s.sock"
    require("nbdkit")
    cmd = [
        "nbdkit",
        "-f",
        "-t",
        "8",
        "-U",
        str(sock),
        "-e",
        "t",
        "--filter=delay",
        "memory",
        "1M",
        "wdelay=200ms",
    ]
    with serving(cmd, sock):
        client = await NbdClient.connect(uri(sock), timeout=5.0)
        stop = asyncio.Event()

        async def stream() -> None:  # a new write every 50 ms: four always in flight
            writes = []
            while not stop.is_set():
                writes.append(asyncio.ensure_future(client.pwrite(8192, b"c" * 4096)))
                await asyncio.sleep(0.05)
            await asyncio.gather(*writes)

        try:
            others = asyncio.ensure_future(stream())
            await asyncio.sleep(0.3)
            first = asyncio.ensure_future(client.pwrite(0, b"d" * 4096))
            await asyncio.sleep(0)  # sent
            async with asyncio.timeout(3):  # each answer in 0.2 s: never 3 s
                await client.drain()
            await asyncio.sleep(0)  # its reply is in: its caller resumes in this step
            assert first.done(), "the drain returned before the request sent before it"
            assert client.outstanding > 0 and not others.done()
        finally:
            stop.set()
            await others
            await client.close()
        assert client.outstanding == 0

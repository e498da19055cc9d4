"""A copy to a remote target that is stopped (pause, cancel, remove) cancels the waits for
its requests, not the requests: their bytes may still be queued in the client's transport
and socket. Closing the target must not deliver them after it returned, when a next
connection (a new session's, the next update's) writes the same blocks: they would land
over its data, after its flush.

The target is nbdkit behind its rate filter (writes trickle in, so that many are queued
on this side) and its log filter (every request that reaches it, and every connection's
end, so that the test knows when the old connections have run all they got)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltavol.copy.targets import NbdTarget
from deltavol.server.nbd_client import NbdClient
from deltavol.tls import client_tls
from tests.harness import Server, free_port, require
from tests.interop.tls import target
from tests.sessions.common import apply, start_update, wait_for

pytestmark = pytest.mark.interop

K = 256 * 1024
BLOCKS = 256
OLD, NEW = 0xAA, 0x00


def nbdkit_rate(port: int, log: Path, certs: Path | None, rate: str = "80M", threads: int = 16) -> list[str]:
    """``threads`` requests of a connection run at a time, the others wait in its socket."""
    require("nbdkit")
    tls = ["--tls=require", f"--tls-certificates={certs}"] if certs is not None else []
    return [
        "nbdkit", "-f", "-t", str(threads), *tls, "-i", "127.0.0.1", "-p", str(port), "-e", "t",
        "--filter=log", "--filter=rate", "memory", str(BLOCKS * K), f"rate={rate}", f"logfile={log}",
    ]  # fmt: skip


@pytest.fixture(params=["plain", "tls"])
def server(request: pytest.FixtureRequest, tmp_path: Path, tls_certs: Path) -> Iterator[tuple[str, Path]]:
    port, log = free_port(), tmp_path / "nbdkit.log"
    certs = tls_certs if request.param == "tls" else None
    scheme = "nbds" if certs is not None else "nbd"
    query = f"?tls-certificates={certs}" if certs is not None else ""
    with target(nbdkit_rate(port, log, certs), port=port):
        yield f"{scheme}://127.0.0.1:{port}/t{query}", log


def connections_over(log: Path) -> tuple[int, int]:
    """Connections opened and ended so far, as the log filter saw them."""
    text = log.read_text() if log.exists() else ""
    return text.count(" Connect "), text.count(" Disconnect ")


def writes_at_server(log: Path) -> tuple[int, int]:
    """Write and zero requests the server has read, and those it has answered."""
    lines = log.read_text().splitlines() if log.exists() else []
    read = sum(1 for line in lines if " Write " in line or " Zero " in line)
    return read, sum(1 for line in lines if "...Write " in line or "...Zero " in line)


def writes_landed(log: Path) -> int:
    """Write and zero requests the server has carried out (their successful return)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(1 for line in lines if ("...Write " in line or "...Zero " in line) and " return=0" in line)


def wait_all_over(log: Path) -> bool:
    """Until every connection the server got has ended (it ran all it read by then): False
    if one is still open after a minute."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        opened, ended = connections_over(log)
        if opened and opened == ended:
            return True
        time.sleep(0.05)
    return False


async def copy(to: NbdTarget, byte: int, stop_after: int | None = None) -> None:
    """Write every block (``NEW``: as zero requests, which overtake queued data); with
    ``stop_after``, cancel the writers once that many writes have their replies, as a
    pause, a cancel or a remove cancels the copy task."""
    data = bytes([byte]) * K
    blocks = iter(range(BLOCKS))
    done = 0
    enough = asyncio.Event()

    async def writer() -> None:
        nonlocal done
        for i in blocks:
            if byte == NEW:
                assert await to.zero(i * K, K)
            else:
                await to.pwrite(i * K, data)
            done += 1
            if stop_after is not None and done >= stop_after:
                enough.set()

    tasks = [asyncio.ensure_future(writer()) for _ in range(to.inflight)]
    if stop_after is None:
        await asyncio.gather(*tasks)
        return
    await enough.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_closed_targets_writes_land_before_close_returns(server: tuple[str, Path]) -> None:
    uri, log = server
    old = await NbdTarget(uri).open()
    assert len(old._clients) == NbdTarget.CONNECTIONS  # memory: multi-conn, each its own queue
    await copy(old, OLD, stop_after=8)
    await old.close()
    # every write the stopped copy sent has run when close returns: none arrives later
    seen = writes_landed(log)
    new = await NbdTarget(uri).open()
    await copy(new, NEW)
    await new.flush()
    await new.close()
    assert await asyncio.to_thread(wait_all_over, log), connections_over(log)
    reader = await NbdClient.connect(uri, **client_tls(uri))
    try:
        stale = [i for i in range(BLOCKS) if (await reader.pread(i * K, 1)) != bytes([NEW])]
    finally:
        await reader.close()
    assert stale == [], f"{len(stale)} blocks hold the stopped copy's data after the new copy's flush"
    assert writes_landed(log) - seen == BLOCKS  # only the new copy's zeroes came after


async def test_drained_target_sends_no_write_later(server: tuple[str, Path]) -> None:
    """A pause drains the kept connection (``Copier.drain``): once it returned, no write of
    the cancelled copy reaches the server any more, though the connection stays open."""
    uri, log = server
    old = await NbdTarget(uri).open()
    await copy(old, OLD, stop_after=8)
    await old.drain()
    assert all(c.outstanding == 0 for c in old._clients)
    seen = writes_landed(log)
    await old.close()
    assert await asyncio.to_thread(wait_all_over, log), connections_over(log)
    assert writes_landed(log) == seen


@pytest.fixture
def deltavol(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "data", "--retry-limit", "0")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        srv.log.close()
    assert "Traceback" not in srv.log_path.read_text()


@pytest.mark.parametrize("stop", ["pause", "remove"])
def test_stopped_session_writes_nothing_after(deltavol: Server, tmp_path: Path, stop: str) -> None:
    """A full update to a slow target, stopped half-way: once ``session pause`` or
    ``session remove`` returned, no write of it reaches the target any more (a pause
    keeps the connection; the remove that follows it has nothing left to send)."""
    size = BLOCKS * K
    deltavol.cli("volume", "create", "src", "--size", str(size))
    apply(deltavol, "src", f"write -P {OLD} 0 {size}")
    port, log = free_port(), tmp_path / "nbdkit.log"
    with target(nbdkit_rate(port, log, None, rate="32M", threads=4), port=port):
        deltavol.cli("session", "create", "s", "--source", "src", "--target", f"nbd://127.0.0.1:{port}/t")
        start_update(deltavol)
        wait_for(deltavol, lambda s: s["update"]["bytes_done"] > 0, "copying")
        deltavol.cli("session", stop, "s")
        read, answered = writes_at_server(log)
        assert 0 < read < BLOCKS, read  # stopped half-way
        assert read == answered, f"{read - answered} writes still running on the target after {stop}"
        if stop == "pause":
            deltavol.cli("session", "remove", "s")
        over = wait_all_over(log)
        assert writes_at_server(log) == (read, answered), f"writes reached the target after {stop}"
        assert over, f"connections still open on the target: {connections_over(log)}"

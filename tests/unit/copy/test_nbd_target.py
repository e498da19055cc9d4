"""A remote NBD export as a copy target: copy progress is recorded only once a FLUSH covers
it, so a server that cannot flush is refused, with an error that says why."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deltavol.copy.targets import NbdTarget
from deltavol.errors import TargetError
from deltavol.server.nbd_client import NbdClient
from tests.fakes import until
from tests.harness import require
from tests.sessions.targets import nbdkit_memory_cmd, serving, uri

SIZE = 1 << 20


def nbdkit_without_flush_cmd(sock: Path) -> list[str]:
    """A writable export whose server does not advertise NBD_FLAG_SEND_FLUSH (nor FUA)."""
    require("nbdkit")
    return [
        "nbdkit", "-f", "-U", str(sock), "-e", "t", "eval",
        f"get_size=echo {SIZE}",
        "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        "pwrite=cat >/dev/null",
        "can_write=exit 0",
        "can_flush=exit 3",  # the sh/eval plugins' "false"
    ]  # fmt: skip


@pytest.mark.interop  # qemu-nbd, nbdkit
async def test_a_server_that_cannot_flush_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with (
        serving(nbdkit_without_flush_cmd(sock), sock),
        pytest.raises(TargetError, match="does not support FLUSH") as ei,
    ):
        await NbdTarget(uri(sock)).open()
    assert uri(sock) in ei.value.message


@pytest.mark.interop  # qemu-nbd, nbdkit
async def test_a_server_that_can_flush_is_flushed(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with serving(nbdkit_memory_cmd(SIZE, sock), sock):
        target = await NbdTarget(uri(sock)).open()
        try:
            await target.pwrite(0, b"x" * 4096)
            flushes = []
            client = target._clients[0]
            real = client.flush

            async def counted() -> None:
                flushes.append(1)
                await real()

            client.flush = counted
            await target.flush()
            assert flushes == [1]
            assert await target.pread(0, 4096) == b"x" * 4096
        finally:
            await target.close()


class FakeClient:
    """A connection as NbdTarget.open sees it."""

    read_only = False
    can_flush = True
    can_multi_conn = True
    size = SIZE

    def __init__(self) -> None:
        self.closed = False

    async def drain(self) -> None:  # nothing was sent on it
        pass

    async def close(self) -> None:
        self.closed = True


async def test_an_open_cancelled_half_way_closes_the_connections_it_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[FakeClient] = []
    calls = 0

    async def connect(uri: str, *, timeout: float) -> FakeClient:
        nonlocal calls
        calls += 1
        if calls == NbdTarget.CONNECTIONS:
            await asyncio.Event().wait()  # the last one never connects
        client = FakeClient()
        made.append(client)
        return client

    monkeypatch.setattr(NbdClient, "connect", connect)
    opening = asyncio.create_task(NbdTarget("nbd://dr/x").open())
    await until(lambda: len(made) == NbdTarget.CONNECTIONS - 1, "all but the last connection")
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert len(made) == NbdTarget.CONNECTIONS - 1
    assert all(c.closed for c in made), "a connection made before the cancel stays open"


@pytest.mark.interop  # nbdkit
async def test_a_closed_target_refuses_writes_and_flushes_as_a_target_error(tmp_path: Path) -> None:
    """A copy-before-write that took the target before its session dropped it may write
    after the close: it fails as the target's error (the mark is given up), not as a bug."""
    sock = tmp_path / "s.sock"
    with serving(nbdkit_memory_cmd(SIZE, sock), sock):
        target = await NbdTarget(uri(sock)).open()
        await target.close()
        with pytest.raises(TargetError, match="closed"):
            await target.pwrite(0, b"x" * 4096)
        with pytest.raises(TargetError, match="closed"):
            await target.flush()

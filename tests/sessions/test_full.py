"""Full updates (DESIGN §2): to a local volume, qemu-nbd and nbdkit, while fio writes to the
source; the target is protected until done and ends equal to the source byte for byte; the
catch-up pass copies exactly what was written during the copy; holes stay holes."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.harness import Server, require
from tests.interop.peers import dump_sha, qemu_io, run
from tests.sessions.common import G, MiB, start_update, volume_path, wait_for
from tests.sessions.targets import nbdkit_memory_cmd, qemu_nbd_cmd, serving, uri

pytestmark = pytest.mark.interop

SIZE = 64 * MiB


def fill_source(server: Server) -> None:
    server.cli("volume", "create", "src", "--size", str(SIZE))
    qemu_io(server.uri("src"), "write -P 0xa1 0 24M", "write -P 0xa2 40M 24M")  # and a hole


def fio_chunks(iolog: Path, g: int = G) -> set[int]:
    """The chunks fio wrote, from its --write_iolog (``time file write OFFSET LENGTH``)."""
    chunks: set[int] = set()
    for line in iolog.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[2] == "write":
            offset, length = int(parts[3]), int(parts[4])
            chunks.update(range(offset // g, (offset + length - 1) // g + 1))
    return chunks


@pytest.mark.parametrize("kind", ["local", "qemu-nbd", "nbdkit"])
def test_full_update_while_fio_writes(server: Server, tmp_path: Path, kind: str) -> None:
    require("fio", "nbdcopy", "qemu-io")
    fill_source(server)
    with ExitStack() as stack:
        sock = tmp_path / "target.sock"
        if kind == "local":
            server.cli("volume", "create", "dst", "--size", str(SIZE))
            target = "dst"
            target_uri = server.uri("dst")
        else:
            image = tmp_path / "target.img"
            image.write_bytes(b"\x77" * SIZE)
            cmd = qemu_nbd_cmd(image, sock) if kind == "qemu-nbd" else nbdkit_memory_cmd(SIZE, sock)
            stack.enter_context(serving(cmd, sock))
            target = target_uri = uri(sock)
        # stale contents the copy must replace, over the source's hole too
        qemu_io(target_uri, f"write -P 0x77 0 {SIZE}")
        server.cli("session", "create", "s", "--source", "src", "--target", target)
        qemu_io(server.uri("src"), "write -P 0xa3 60M 1M")  # tracked: the full update clears it at start
        assert server.status()["tracked_bytes"] == 1 * MiB
        # 48 MiB of data: about 12 s, fio (2 MiB of 4 KiB writes) ends well before on a loaded machine
        started = start_update(server, "--full", "--max-rate", "4MiB/s")
        assert started["update"]["kind"] == "full" and not started["consistent"]
        assert started["tracked_bytes"] == 0
        iolog = tmp_path / "fio.iolog"
        fio = run(
            "fio", "--name=w", "--ioengine=nbd", f"--uri={server.uri('src')}", "--rw=randwrite",
            "--bs=4k", "--iodepth=8", "--size=64M", "--io_size=2M", "--randseed=7",
            f"--write_iolog={iolog}",
        )  # fmt: skip
        assert fio.returncode == 0
        during = server.status()
        # fio wrote during the first (unmarked) pass: no point in time yet, no copy-on-first-write
        assert during["state"] == "copying" and during["update"]["marked_at"] is None, "fio outlived the copy"
        assert during["update"]["cofw_saved_bytes"] == 0
        written = fio_chunks(iolog)
        assert 0 < len(written) <= 512
        assert during["tracked_bytes"] == len(written) * G
        st = wait_for(server, lambda s: s["state"] == "idle", "idle", timeout=120)
        assert (
            st["consistent"]
            and st["update"]["kind"] == "full"
            and st["update"]["id"] == started["update"]["id"]
        )
        assert st["point_in_time"] == st["update"]["marked_at"] is not None
        # the catch-up pass copied exactly the chunks fio wrote, nothing else
        assert st["update"]["catchup_bytes"] == len(written) * G
        assert st["update"]["bytes_total"] == SIZE + len(written) * G
        assert st["update"]["bytes_done"] == st["update"]["bytes_total"]
        assert st["tracked_bytes"] == 0
        assert dump_sha(target_uri, tmp_path) == dump_sha(server.uri("src"), tmp_path)
        if kind == "local":  # and the file itself, behind the exports
            assert server.image("dst") == server.image("src")


def test_local_target_is_protected_during_and_after_a_full_update(server: Server) -> None:
    fill_source(server)
    server.cli("volume", "create", "dst", "--size", str(SIZE))
    server.cli("session", "create", "s", "--source", "src", "--target", "dst")
    # 48 MiB of data at 1 MiB/s: far longer than the checks below, however loaded the machine
    start_update(server, "--full", "--max-rate", "1MiB/s")
    st = server.status()
    assert st["state"] == "copying" and not st["consistent"]
    # cannot even be opened, read-only or not; the refusal names the session
    for read_only in (True, False):
        text = qemu_io(server.uri("dst"), "read 0 4k", ok=False, read_only=read_only)
        assert "can't open" in text and "session 's'" in text, text
    text = qemu_io(server.uri("dst"), "write -P 1 0 4k", ok=False)
    assert "can't open" in text and "session 's'" in text, text
    out = server.run("volume", "remove", "dst")
    assert out.returncode == 1 and "session" in out.stderr and "Traceback" not in out.stderr
    assert server.status()["state"] == "copying", "the checks outlived the copy: slow it down"
    # cancelled, the target is as inconsistent as during the copy; a full update at full
    # speed then makes it the source
    server.cli("session", "cancel", "s")
    assert not server.status()["consistent"]
    text = qemu_io(server.uri("dst"), "read 0 4k", ok=False, read_only=True)
    assert "can't open" in text and "session 's'" in text, text
    server.cli("session", "update", "s", "--full", "--wait")
    st = server.status()
    assert st["state"] == "idle" and st["consistent"] and st["update"]["kind"] == "full", st
    # readable now, and exactly the source
    qemu_io(
        server.uri("dst"), "read -P 0xa1 0 24M", "read -P 0 24M 16M", "read -P 0xa2 40M 24M", read_only=True
    )
    # but exported read-only while the session exists
    text = qemu_io(server.uri("dst"), "write -P 1 0 4k", ok=False)
    assert "failed" in text or "read-only" in text.lower() or "permission" in text.lower(), text
    assert server.image("dst") == server.image("src")
    server.cli("session", "remove", "s")
    qemu_io(server.uri("dst"), "write -P 1 0 4k", "read -P 1 0 4k")  # released
    assert server.image("dst")[:4096] == b"\x01" * 4096


def test_sparse_8g_volume_full_copies_only_its_data(server: Server) -> None:
    server.cli("volume", "create", "big", "--size", "8GiB")
    server.cli("volume", "create", "copy", "--size", "8GiB")
    qemu_io(server.uri("big"), "write -P 0x5e 1G 8M", "write -P 0x5f 7G 8M")
    server.cli("session", "create", "s", "--source", "big", "--target", "copy")
    start = time.monotonic()
    server.cli("session", "update", "s", "--full", "--wait")
    took = time.monotonic() - start
    st = server.status()
    assert st["consistent"] and st["update"]["bytes_sent"] == 16 * MiB
    assert st["update"]["bytes_done"] == 8 << 30  # every chunk accounted for, holes as holes
    path = volume_path(server, "copy")
    assert path.stat().st_blocks * 512 <= 32 * MiB  # the copy stays sparse
    assert took < 30, f"8 GiB of holes took {took:.1f} s"
    after = (1 << 30) + 8 * MiB
    qemu_io(server.uri("copy"), "read -P 0x5e 1G 8M", f"read -P 0 {after} 1M", "read -P 0x5f 7G 8M",
            "read -P 0 8191M 1M", read_only=True)  # fmt: skip
    # an incremental update of one chunk then sends the chunk's data (its hole goes as a
    # hole to a local volume), and the copy stays sparse
    qemu_io(server.uri("big"), "write -P 0x60 4G 4k")
    server.cli("session", "update", "s", "--wait")
    st = server.status()
    assert st["update"]["kind"] == "incremental" and st["update"]["bytes_sent"] == 4096
    assert path.stat().st_blocks * 512 <= 32 * MiB + G
    qemu_io(
        server.uri("copy"), "read -P 0x60 4G 4k", f"read -P 0 {(4 << 30) + 4096} {G - 4096}", read_only=True
    )

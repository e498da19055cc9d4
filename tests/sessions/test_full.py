"""Full updates (DESIGN §2): to a local volume, qemu-nbd and nbdkit, while fio writes to the
source; the target is protected until done and ends equal to the source byte for byte."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.harness import Server, require
from tests.interop.peers import dump_sha, qemu_io, run
from tests.sessions.targets import nbdkit_memory_cmd, qemu_nbd_cmd, serving, uri

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 64 * MiB
G = 64 * 1024


def fill_source(server: Server) -> None:
    server.cli("volume", "create", "src", "--size", str(SIZE))
    qemu_io(server.uri("src"), "write -P 0xa1 0 24M", "write -P 0xa2 40M 24M")  # and a hole


@pytest.mark.parametrize("kind", ["local", "qemu-nbd", "nbdkit"])
def test_full_update_while_fio_writes(server: Server, tmp_path: Path, kind: str) -> None:
    require("fio", "nbdcopy")
    fill_source(server)
    with ExitStack() as stack:
        sock = tmp_path / "target.sock"
        if kind == "local":
            server.cli("volume", "create", "dst", "--size", str(SIZE))
            target, target_uri = "dst", None
        else:
            image = tmp_path / "target.img"
            image.write_bytes(b"\x77" * SIZE)  # stale contents the copy must replace, holes too
            cmd = qemu_nbd_cmd(image, sock) if kind == "qemu-nbd" else nbdkit_memory_cmd(SIZE, sock)
            stack.enter_context(serving(cmd, sock))
            target = target_uri = uri(sock)
        server.cli("session", "create", "s", "--source", "src", "--target", target)
        server.cli("session", "update", "s", "--full", "--max-rate", "24MiB/s")  # about 3 s
        fio = run(
            "fio", "--name=w", "--ioengine=nbd", f"--uri={server.uri('src')}", "--rw=randwrite",
            "--bs=4k", "--iodepth=8", "--size=64M", "--io_size=2M", "--randseed=7",
        )  # fmt: skip
        assert fio.returncode == 0
        assert server.status()["state"] == "copying", "fio outlived the copy: slow it down"
        st = server.wait_state("idle", timeout=120)
        assert st["consistent"] and st["update"]["kind"] == "full"
        # the catch-up pass copied what fio wrote (at most 512 writes of 4 KiB -> chunks), not everything
        assert 0 < st["update"]["catchup_bytes"] <= 512 * G
        source_sha = dump_sha(server.uri("src"), tmp_path)
        target_sha = dump_sha(target_uri or server.uri("dst"), tmp_path)
        assert source_sha == target_sha


def test_local_target_is_protected_during_and_after_a_full_update(server: Server) -> None:
    fill_source(server)
    server.cli("volume", "create", "dst", "--size", str(SIZE))
    server.cli("session", "create", "s", "--source", "src", "--target", "dst")
    server.cli("session", "update", "s", "--full", "--max-rate", "16MiB/s")
    assert server.status()["state"] == "copying" and not server.status()["consistent"]
    text = qemu_io(server.uri("dst"), "read 0 4k", ok=False, read_only=True)
    assert "session 's'" in text or "inconsistent" in text, text  # cannot even be opened
    out = server.run("volume", "remove", "dst")
    assert out.returncode == 1 and "session" in out.stderr
    server.wait_state("idle", timeout=120)
    qemu_io(server.uri("dst"), "read -P 0xa1 0 24M", "read -P 0 24M 16M", read_only=True)
    text = qemu_io(server.uri("dst"), "write -P 1 0 4k", ok=False)
    assert "failed" in text or "read-only" in text.lower() or "permission" in text.lower(), text
    server.cli("session", "remove", "s")
    qemu_io(server.uri("dst"), "write -P 1 0 4k", "read -P 1 0 4k")  # released


def test_sparse_8g_volume_full_copies_only_its_data(server: Server) -> None:
    server.cli("volume", "create", "big", "--size", "8GiB")
    server.cli("volume", "create", "copy", "--size", "8GiB")
    qemu_io(server.uri("big"), "write -P 0x5e 1G 8M", "write -P 0x5f 7G 8M")
    server.cli("session", "create", "s", "--source", "big", "--target", "copy")
    start = time.monotonic()
    server.cli("session", "update", "s", "--full", "--wait")
    took = time.monotonic() - start
    st = server.status()
    assert st["update"]["bytes_sent"] == 16 * MiB and st["consistent"]
    path = Path(json.loads(server.cli("volume", "info", "copy", "--json"))["path"])
    assert path.stat().st_blocks * 512 <= 32 * MiB  # the copy stays sparse
    assert took < 30, f"8 GiB of holes took {took:.1f} s"
    after = (1 << 30) + 8 * MiB
    qemu_io(server.uri("copy"), "read -P 0x5e 1G 8M", f"read -P 0 {after} 1M", "read -P 0x5f 7G 8M",
            read_only=True)  # fmt: skip

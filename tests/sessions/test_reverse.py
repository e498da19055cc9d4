"""``session reverse``: failover to the copy and failback, each update copying only the chunks
changed on either side since the last point in time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import Server
from tests.interop.peers import qemu_io
from tests.sessions.common import (
    G,
    MiB,
    Model,
    apply,
    refused_open,
    session_with_copy,
    start_update,
)
from tests.sessions.targets import nbdkit_memory_cmd, serving, uri

pytestmark = pytest.mark.interop

SIZE = 8 * MiB


def update_bytes(server: Server) -> int:
    """An incremental update to its end; the bytes it had to copy."""
    u = start_update(server)["update"]
    assert u["kind"] == "incremental", u
    done = server.wait_idle(u["id"])
    assert done["consistent"], done
    total: int = done["update"]["bytes_total"]
    return total


def reverse(server: Server) -> dict:
    st: dict = json.loads(server.cli("session", "reverse", "s", "--json"))
    return st


def test_failover_and_failback_copy_only_what_changed_on_either_side(server: Server) -> None:
    model = session_with_copy(server, SIZE)
    apply(server, "src", *model.chunks(0x01, [0, 1, 2]))
    assert update_bytes(server) == 3 * G
    # the production site goes on writing after the last point in time, then fails
    lost = [5, 6, 40]
    apply(server, "src", *model.chunks(0x02, lost))

    st = reverse(server)  # failover: dst is the writable source now
    assert (st["source"], st["target"]) == ("dst", "src"), st
    assert st["state"] == "idle" and not st["consistent"] and st["tracked_bytes"] == len(lost) * G, st
    refused_open(server, "src")  # the old source is a target, inconsistent: cannot be opened
    dst = Model(SIZE)
    dst.data[:] = server.image("dst")
    written = [6, 7, 100, 101]
    qemu_io(server.uri("dst"), *dst.chunks(0x03, written), dst.write(0x04, 120 * G + 4096, 512))
    written.append(120)
    # a restart between: the direction and what it tracked are durable
    server.kill9()
    server.start()
    st = server.status()
    assert (st["source"], st["target"]) == ("dst", "src") and st["tracked_bytes"] == 7 * G, st
    assert update_bytes(server) == len(set(lost) | set(written)) * G  # both sides, no more
    assert server.image("src") == server.image("dst") == dst.snapshot()
    qemu_io(server.uri("src"), f"read -P 0x03 {7 * G} {G}", read_only=True)  # consistent: readable

    # failback: writes on dst after the update (lost: src wins), reverse, writes on src, update
    at_mark = Model(SIZE)
    at_mark.data[:] = dst.data
    qemu_io(server.uri("dst"), *dst.chunks(0x05, [10, 11]))
    st = reverse(server)
    assert (st["source"], st["target"]) == ("src", "dst") and st["tracked_bytes"] == 2 * G, st
    qemu_io(server.uri("src"), *at_mark.chunks(0x06, [11, 12, 13]))
    assert update_bytes(server) == len({10, 11, 12, 13}) * G
    assert server.image("src") == server.image("dst") == at_mark.snapshot()
    verify = json.loads(server.cli("session", "verify", "s", "--json"))
    assert verify["ok"] and verify["chunks_compared"] == SIZE // G, verify
    # the target is guarded again: clients' writes to it are refused
    text = qemu_io(server.uri("dst"), f"write -P 0x66 0 {G}", ok=False)
    assert "failed" in text or "can't open" in text, text
    assert server.image("dst") == at_mark.snapshot()


def test_reverse_twice_at_once_gives_back_the_first_direction(server: Server) -> None:
    model = session_with_copy(server, SIZE)
    apply(server, "src", *model.chunks(0x07, [3, 4]))
    reverse(server)
    qemu_io(server.uri("dst"), f"write -P 0x08 {9 * G} {G}")
    st = reverse(server)
    assert (st["source"], st["target"]) == ("src", "dst") and st["tracked_bytes"] == 3 * G, st
    model.write(0x00 + 0xAA, 9 * G, G)  # dst's chunk 9 goes back to src's contents
    assert update_bytes(server) == 3 * G
    assert server.image("dst") == server.image("src") == model.snapshot()


def _refused(server: Server, *words: str) -> None:
    out = server.run("session", "reverse", "s")
    assert out.returncode == 1 and out.stderr.startswith("deltavol: ") and "Traceback" not in out.stderr
    for w in words:
        assert w in out.stderr, (w, out.stderr)


def test_refusals_change_nothing(server: Server, tmp_path: Path) -> None:
    model = session_with_copy(server, SIZE)
    apply(server, "src", model.write(0x09, 0, 2 * MiB))
    start_update(server, "--max-rate", "64KiB/s")
    _refused(server, "cannot be reversed", "copying")
    server.cli("session", "cancel", "s")
    server.cli("volume", "create", "big", "--size", str(2 * SIZE))
    server.cli("volume", "create", "src2", "--size", str(SIZE))
    server.cli("session", "create", "t", "--source", "src2", "--target", "big")
    server.cli("session", "update", "t", "--full", "--wait")
    out = server.run("session", "reverse", "t")
    assert out.returncode == 1 and "larger" in out.stderr, out.stderr
    sock = tmp_path / "m.sock"
    with serving(nbdkit_memory_cmd(SIZE, sock), sock):
        server.cli("session", "create", "r", "--source", "src2", "--target", uri(sock))
        server.cli("session", "update", "r", "--full", "--wait")
        out = server.run("session", "reverse", "r")
        assert out.returncode == 1 and "restore" in out.stderr and "NBD server" in out.stderr, out.stderr
        assert server.status("r")["target"] == uri(sock)
    out = server.run("session", "reverse", "nope")
    assert out.returncode == 1 and "does not exist" in out.stderr, out.stderr
    st = server.status()
    assert (st["source"], st["target"]) == ("src", "dst"), st

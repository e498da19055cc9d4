"""Incremental updates (DESIGN §2): mark, copy-on-first-write, copy only what changed, unmark;
pause / resume / cancel; a target that dies; verify; the scheduler; several sessions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.harness import Server
from tests.interop.peers import dump_sha, qemu_io
from tests.sessions.targets import qemu_nbd_cmd, serving, uri

pytestmark = pytest.mark.interop

MiB = 1 << 20
G = 64 * 1024
SIZE = 16 * MiB
NCHUNKS = SIZE // G


def setup(server: Server, target: str = "dst", *extra: str) -> None:
    """Pattern A everywhere on the source, a session, a finished full update."""
    server.cli("volume", "create", "src", "--size", str(SIZE))
    if not target.startswith("nbd"):
        server.cli("volume", "create", target, "--size", str(SIZE))
    qemu_io(server.uri("src"), f"write -P 0xaa 0 {SIZE}")
    server.cli("session", "create", "s", "--source", "src", "--target", target, *extra)
    server.cli("session", "update", "s", "--full", "--wait")


def write_chunks(server: Server, chunks: list[int], pattern: int) -> None:
    qemu_io(server.uri("src"), *(f"write -P {pattern} {c * G} {G}" for c in chunks))


def target_chunks(server: Server, volume: str = "dst") -> list[int]:
    """The first byte of every chunk of a local target (each chunk is written whole)."""
    image = server.image(volume)
    return [image[c * G] for c in range(NCHUNKS)]


def test_incremental_sends_only_the_changed_chunks(server: Server) -> None:
    setup(server)
    changed = [0, 5, 6, 7, 100, NCHUNKS - 1]
    write_chunks(server, changed, 0xBB)
    assert server.status()["tracked_bytes"] == len(changed) * G
    server.cli("session", "update", "s", "--wait")
    u = server.status()["update"]
    assert u["kind"] == "incremental" and u["bytes_total"] == len(changed) * G
    assert u["bytes_sent"] == len(changed) * G
    assert target_chunks(server) == [0xBB if c in changed else 0xAA for c in range(NCHUNKS)]
    assert server.status()["tracked_bytes"] == 0


@pytest.mark.parametrize("save_limit", [None, "128KiB"])
def test_copy_on_first_write_keeps_the_point_in_time(tmp_path: Path, save_limit: str | None) -> None:
    extra = ("--save-limit", save_limit) if save_limit else ()
    server = Server(tmp_path / "data", *extra)
    server.start()
    try:
        setup(server)
        b_set, d_set = list(range(10, 40)), list(range(100, 130))
        write_chunks(server, b_set, 0xBB)
        server.cli("session", "update", "s", "--max-rate", "256KiB/s")  # marked: B is the point in time
        write_chunks(server, b_set, 0xCC)  # at once: C over the chunks still owed
        write_chunks(server, d_set, 0xDD)  # and D on others
        st = server.wait_state("idle", timeout=120)
        if save_limit is None:
            assert st["update"]["cofw_saved_bytes"] > 0
        want = [0xBB if c in b_set else 0xAA for c in range(NCHUNKS)]
        assert target_chunks(server) == want  # A with B: no C, no D
        assert server.image("dst") == b"".join(bytes([w]) * G for w in want)
        server.cli("session", "update", "s", "--wait")  # the next update brings C and D
        want = [0xCC if c in b_set else 0xDD if c in d_set else 0xAA for c in range(NCHUNKS)]
        assert target_chunks(server) == want
        assert server.status()["update"]["bytes_total"] == (len(b_set) + len(d_set)) * G
    finally:
        server.stop()


def test_pause_resume_cancel(server: Server) -> None:
    setup(server)
    write_chunks(server, list(range(0, 64)), 0xBB)
    server.cli("session", "update", "s", "--max-rate", "512KiB/s")
    time.sleep(0.5)
    server.cli("session", "pause", "s")
    paused = server.wait_state("paused")
    done = paused["update"]["bytes_done"]
    assert 0 < done < 64 * G
    time.sleep(0.5)
    assert server.status()["update"]["bytes_done"] == done  # really stopped
    server.cli("session", "resume", "s")
    server.cli("session", "cancel", "s")
    st = server.wait_state("idle")
    # part old, part new: no point in time holds, until the next update copies the rest
    assert not st["consistent"]
    assert st["tracked_bytes"] >= 64 * G - st["update"]["bytes_done"]  # the rest goes back to tracking
    server.cli("session", "update", "s", "--wait")
    assert server.status()["consistent"]
    assert target_chunks(server) == [0xBB if c < 64 else 0xAA for c in range(NCHUNKS)]


def test_a_killed_target_fails_the_session_and_resume_finishes_it(server: Server, tmp_path: Path) -> None:
    sock, image = tmp_path / "t.sock", tmp_path / "t.img"
    image.write_bytes(bytes(SIZE))
    server.cli("volume", "create", "src", "--size", str(SIZE))
    qemu_io(server.uri("src"), f"write -P 0xaa 0 {SIZE}")
    with serving(qemu_nbd_cmd(image, sock), sock):
        server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
        server.cli("session", "update", "s", "--full", "--max-rate", "2MiB/s")
        time.sleep(1.5)
    st = server.wait_state("failed")  # qemu-nbd was killed mid-copy
    assert "nbd+unix" in st["last_error"] or "t.sock" in st["last_error"], st["last_error"]
    with serving(qemu_nbd_cmd(image, sock), sock):
        server.cli("session", "resume", "s")  # a no-op if the retry policy got there first
        st = server.wait_state("idle", timeout=60)
        assert st["consistent"]
        u = st["update"]
        assert u["bytes_total"] <= u["bytes_sent"] + 4 * MiB  # catch-up sent nothing: no writes
        assert u["bytes_sent"] <= u["bytes_total"] + 16 * 4 * MiB  # within one pipeline window
        assert dump_sha(uri(sock), tmp_path) == dump_sha(server.uri("src"), tmp_path)


def test_verify_finds_a_difference_planted_in_the_target(server: Server) -> None:
    setup(server)
    assert "OK" in server.cli("session", "verify", "s")
    path = Path(json.loads(server.cli("volume", "info", "dst", "--json"))["path"])
    with open(path, "r+b") as f:
        f.seek(7 * G + 123)
        f.write(b"\x00")
    out = server.run("session", "verify", "s", "--json")
    assert out.returncode == 1, out
    report = json.loads(out.stdout)
    assert report["mismatches"] == 1 and report["mismatch_offsets"] == [7 * G]


def test_scheduler_and_two_sessions_on_one_source(server: Server) -> None:
    setup(server)
    server.cli("volume", "create", "dst2", "--size", str(SIZE))
    server.cli("session", "create", "s2", "--source", "src", "--target", "dst2", "--every", "1s")
    first = server.wait_state("idle", session="s2")["update"]["id"]
    write_chunks(server, [3, 4], 0xBB)
    deadline = time.monotonic() + 30
    while target_chunks(server, "dst2")[3] != 0xBB:  # the scheduler catches up by itself
        assert time.monotonic() < deadline, server.status("s2")
        time.sleep(0.2)
    assert server.status("s2")["update"]["id"] > first
    server.cli("session", "update", "s", "--wait")
    assert target_chunks(server, "dst") == target_chunks(server, "dst2")
    assert server.image("dst") == server.image("src")


def test_refusals_change_nothing(server: Server) -> None:
    setup(server)
    server.cli("volume", "create", "small", "--size", str(SIZE // 2))
    server.cli("volume", "create", "other", "--size", str(SIZE))
    before = server.cli("session", "list", "--json")
    create = ["session", "create", "x", "--source"]
    cases = [
        ([*create, "src", "--target", "small"], 2, "smaller"),
        ([*create, "src", "--target", "src"], 2, "source"),
        ([*create, "src", "--target", "dst"], 1, "session"),
        ([*create, "src", "--target", "other", "--granularity", "3KiB"], 2, "granularity"),
        ([*create, "src", "--target", "other", "--granularity", "32MiB"], 2, "granularity"),
        ([*create, "nope", "--target", "other"], 1, "nope"),
        (["session", "update", "nope"], 1, "nope"),
        (["volume", "remove", "src"], 1, "session"),
        (["volume", "remove", "dst"], 1, "session"),
    ]  # fmt: skip
    for args, code, word in cases:
        out = server.run(*args)
        assert out.returncode == code, (args, out.stderr)
        assert word in out.stderr.lower() and "Traceback" not in out.stderr, (args, out.stderr)
    assert server.cli("session", "list", "--json") == before
    text = qemu_io(server.uri("dst"), "write -P 1 0 4k", ok=False)  # exported read-only
    assert "failed" in text or "read-only" in text.lower() or "permission" in text.lower(), text
    assert server.image("dst")[:4096] == b"\xaa" * 4096

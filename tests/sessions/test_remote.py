"""Remote targets that fail (DESIGN §2): a qemu-nbd target killed mid-update moves the session
to ``failed`` naming the target; once it is back, ``resume`` copies only what is left (what
the target never flushed counts as left) and the copy is exact. A target restarted between
updates is reconnected. Remote refusals."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltavol.sessions.session import CHECKPOINT_SECONDS
from tests.harness import Server
from tests.interop.peers import qemu_io
from tests.sessions.common import G, KiB, MiB, Model, apply, differing_chunks, start_update, wait_for
from tests.sessions.targets import nbdkit_memory_cmd, qemu_nbd_cmd, serving, uri

pytestmark = pytest.mark.interop

SIZE = 16 * MiB


def window(rate: int) -> int:
    """What a throttled copy has in flight: two requests of a quarter second each."""
    return 2 * (rate // 4)


@pytest.fixture
def no_retry_server(tmp_path: Path) -> Iterator[Server]:
    """A server that never retries by itself: ``failed`` stays until the test resumes."""
    server = Server(tmp_path / "data", "--retry-limit", "0")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.log.close()
    assert "Traceback" not in server.log_path.read_text()


def assert_image(image: Path, want: bytes) -> None:
    got = image.read_bytes()
    assert got == want, f"target differs in chunks {differing_chunks(got, want)}"


def wait_failed(server: Server, sock: Path) -> dict:
    """The session after its target was killed mid-copy: failed, naming the target."""
    st = wait_for(server, lambda s: s["state"] == "failed", "failed", failed_ok=True)
    assert str(sock) in st["last_error"], st["last_error"]
    # mid-copy; what the target acknowledged since the last checkpoint is not done (never
    # flushed), so before the first checkpoint nothing is
    assert 0 <= st["update"]["bytes_done"] < st["update"]["bytes_total"]
    return st


def test_a_killed_target_fails_a_full_update_and_resume_finishes_it(
    no_retry_server: Server, tmp_path: Path
) -> None:
    server, sock, image = no_retry_server, tmp_path / "t.sock", tmp_path / "t.img"
    image.write_bytes(b"\x77" * SIZE)
    server.cli("volume", "create", "src", "--size", str(SIZE))
    model = Model(SIZE)
    apply(server, "src", model.write(0xAA, 0, 12 * MiB))  # and a hole at the end
    with serving(qemu_nbd_cmd(image, sock), sock):
        server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
        # about 6 s: the kill comes 3 s before the end, however late this process runs
        start_update(server, "--full", "--max-rate", "2MiB/s")
        wait_for(server, lambda s: s["update"]["bytes_done"] >= 6 * MiB, "copying")
    failed = wait_failed(server, sock)  # qemu-nbd was killed mid-copy
    assert not failed["consistent"]
    apply(server, "src", *model.chunks(0xBB, [0, 250]))  # while failed: tracked for the catch-up
    with serving(qemu_nbd_cmd(image, sock), sock):
        server.cli("session", "resume", "s")
        st = wait_for(server, lambda s: s["state"] == "idle", "idle", timeout=120)
    assert st["consistent"] and st["last_error"] is None
    u = st["update"]
    assert u["catchup_bytes"] == 2 * G
    assert u["bytes_done"] == u["bytes_total"] == SIZE + 2 * G
    data = 12 * MiB + 2 * G  # the hole goes as a zero write, not as data
    again = int(CHECKPOINT_SECONDS * 2 * MiB) + window(2 * MiB)  # unflushed at the kill, in flight
    assert data <= u["bytes_sent"] <= data + again  # resumed, not started over
    assert_image(image, model.snapshot())


def test_a_killed_target_fails_an_incremental_update_and_resume_keeps_the_point_in_time(
    no_retry_server: Server, tmp_path: Path
) -> None:
    server, sock, image = no_retry_server, tmp_path / "t.sock", tmp_path / "t.img"
    image.write_bytes(bytes(SIZE))
    server.cli("volume", "create", "src", "--size", str(SIZE))
    model = Model(SIZE)
    apply(server, "src", model.write(0xAA, 0, SIZE))
    with serving(qemu_nbd_cmd(image, sock), sock):
        server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
        server.cli("session", "update", "s", "--wait")
        apply(server, "src", model.write(0xBB, 0, 4 * MiB))
        at_mark = model.snapshot()
        # about 8 s: the kill comes 4 s before the end, however late this process runs
        start_update(server, "--max-rate", "512KiB/s")
        wait_for(server, lambda s: s["update"]["bytes_done"] >= 2 * MiB, "copying")
    failed = wait_failed(server, sock)  # qemu-nbd was killed mid-copy
    assert not failed["consistent"]  # part of the target is as of the new mark
    assert failed["point_in_time"]  # the last point in time is still the session's
    # while failed, the chunks still owed stay protected
    apply(server, "src", model.write(0xCC, 0, 4 * MiB))
    assert server.status()["update"]["cofw_saved_bytes"] > 0
    with serving(qemu_nbd_cmd(image, sock), sock):
        server.cli("session", "resume", "s")
        st = wait_for(server, lambda s: s["state"] == "idle", "idle", timeout=120)
        assert st["consistent"] and st["point_in_time"] == st["update"]["marked_at"]
        u = st["update"]
        assert u["bytes_done"] == u["bytes_total"] == 4 * MiB
        # copied again: what the last checkpoint before the kill still owed (qemu-nbd never
        # flushed it), at most a checkpoint period of copying, and what was in flight
        again = int(CHECKPOINT_SECONDS * 512 * KiB) + window(512 * KiB)
        assert u["bytes_total"] <= u["bytes_sent"] <= u["bytes_total"] + again
        assert_image(image, at_mark)  # B, not C
        server.cli("session", "update", "s", "--wait")
    assert_image(image, model.snapshot())


def test_a_target_restarted_between_updates_is_reconnected(server: Server, tmp_path: Path) -> None:
    sock, image = tmp_path / "t.sock", tmp_path / "t.img"
    image.write_bytes(bytes(SIZE))
    server.cli("volume", "create", "src", "--size", str(SIZE))
    model = Model(SIZE)
    apply(server, "src", model.write(0xAA, 0, SIZE))
    with serving(qemu_nbd_cmd(image, sock), sock):
        server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
        server.cli("session", "update", "s", "--wait")
    assert_image(image, model.snapshot())
    apply(server, "src", *model.chunks(0xBB, [5, 6, 7]))
    with serving(qemu_nbd_cmd(image, sock), sock):  # the remote server was restarted meanwhile
        out = server.run("session", "update", "s", "--wait")
        assert out.returncode == 0, out.stderr
    st = server.status()
    assert st["consistent"] and st["update"]["bytes_total"] == 3 * G
    assert_image(image, model.snapshot())
    with serving(qemu_nbd_cmd(image, sock), sock):  # and again: verify reconnects too
        out = server.run("session", "verify", "s")
        assert out.returncode == 0 and "OK" in out.stdout, out.stderr


def test_remote_targets_refused(server: Server, tmp_path: Path) -> None:
    server.cli("volume", "create", "src", "--size", str(SIZE))
    before = server.cli("session", "list", "--json")
    create = ["session", "create", "x", "--source", "src", "--target"]
    small = tmp_path / "small.sock"
    with serving(nbdkit_memory_cmd(SIZE - 512, small), small):
        out = server.run(*create, uri(small))
        assert out.returncode == 2 and "smaller" in out.stderr, out.stderr
    ro_sock, ro_image = tmp_path / "ro.sock", tmp_path / "ro.img"
    ro_image.write_bytes(bytes(SIZE))
    with serving([*qemu_nbd_cmd(ro_image, ro_sock), "-r"], ro_sock):
        out = server.run(*create, uri(ro_sock))
        assert out.returncode == 1 and "read-only" in out.stderr, out.stderr
    gone = tmp_path / "nobody.sock"
    out = server.run(*create, uri(gone))
    assert out.returncode == 1 and str(gone) in out.stderr, out.stderr
    for text in (out.stderr,):
        assert text.count("\n") == 1 and "Traceback" not in text
    assert server.cli("session", "list", "--json") == before
    assert ro_image.read_bytes() == bytes(SIZE)


def test_nbdkit_target_incremental_updates(server: Server, tmp_path: Path) -> None:
    """An in-memory target: full, then incremental updates with copy-on-first-write."""
    sock = tmp_path / "k.sock"
    server.cli("volume", "create", "src", "--size", str(SIZE))
    model = Model(SIZE)
    apply(server, "src", model.write(0xAA, 0, SIZE // 2))
    with serving(nbdkit_memory_cmd(SIZE, sock), sock):
        qemu_io(uri(sock), f"write -P 0x77 0 {SIZE}")  # stale bytes, over the source's hole too
        server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
        server.cli("session", "update", "s", "--wait")
        apply(server, "src", *model.chunks(0xBB, list(range(0, 256, 8))))
        at_mark = model.snapshot()
        start_update(server, "--max-rate", "256KiB/s")  # 2 MiB: about 8 s
        apply(server, "src", *model.chunks(0xCC, list(range(0, 256, 4))[::-1]))
        assert server.status()["state"] == "copying", "the writes outlived the update"
        wait_for(server, lambda s: s["state"] == "idle", "idle", timeout=120)
        dump = tmp_path / "dump.img"
        subprocess.run(["nbdcopy", uri(sock), str(dump)], check=True)
        got = dump.read_bytes()
        assert got == at_mark, f"target differs in chunks {differing_chunks(got, at_mark)}"
        server.cli("session", "update", "s", "--wait")
        dump.unlink()
        subprocess.run(["nbdcopy", uri(sock), str(dump)], check=True)
        assert dump.read_bytes() == model.snapshot()

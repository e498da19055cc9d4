"""A remote target that stops answering (qemu-nbd stopped with SIGSTOP: its connections stay
open, nothing is answered, as with a hung server or a network that drops packets) fails the
session within ``serve --target-timeout``; it never hangs the source's writes, nor a stop
of the server (DESIGN §3)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness import Server
from tests.sessions.common import G, MiB, Model, apply, start_update, wait_for
from tests.sessions.targets import qemu_nbd_cmd, serving, uri

pytestmark = pytest.mark.interop

SIZE = 8 * MiB


@contextmanager
def stopped(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


@contextmanager
def running(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()
        server.log.close()
    assert "Traceback" not in server.log_path.read_text()


def copy_of(server: Server, image: Path, sock: Path) -> Model:
    """Source ``src`` (pattern 0xAA) with session ``s`` to the qemu-nbd at ``sock``, updated."""
    server.cli("volume", "create", "src", "--size", str(SIZE))
    model = Model(SIZE)
    apply(server, "src", model.write(0xAA, 0, SIZE))
    server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
    server.cli("session", "update", "s", "--wait")
    return model


def test_a_stopped_target_fails_the_update_and_the_source_keeps_its_writes(tmp_path: Path) -> None:
    """No save area: the writes to chunks the update owes copy them to the target first; with
    the target stopped, they give up the update's mark after the timeout instead of failing,
    and resume copies everything as of a new mark."""
    sock, image = tmp_path / "t.sock", tmp_path / "t.img"
    image.write_bytes(bytes(SIZE))
    extra = ("--target-timeout", "1", "--retry-limit", "0", "--save-limit", "0")
    server = Server(tmp_path / "data", *extra)
    with running(server), serving(qemu_nbd_cmd(image, sock), sock) as proc:
        model = copy_of(server, image, sock)
        apply(server, "src", *model.chunks(0xBB, list(range(64))))
        marked_at = start_update(server, "--max-rate", "512KiB/s")["update"]["marked_at"]  # about 8 s
        with stopped(proc):
            began = time.monotonic()
            apply(server, "src", *model.chunks(0xCC, [63, 62, 61, 60]))  # still owed: the copy goes up
            # (waiting for the stopped target is waiting for ever: a loaded machine may take
            # some seconds over qemu-io and the one-second timeout)
            assert time.monotonic() - began < 30, "the writes waited for the stopped target"
            st = wait_for(server, lambda s: s["state"] == "failed", "failed", timeout=20, failed_ok=True)
            assert str(sock) in st["last_error"], st["last_error"]  # no reply, or the mark given up
            remark = st["update"]["remark"]
            assert remark and "copy-before-write" in remark and str(sock) in remark, remark
            apply(server, "src", *model.chunks(0xDD, [10, 100]))  # and while failed
        server.cli("session", "resume", "s")
        st = wait_for(server, lambda s: s["state"] == "idle", "idle", timeout=120)
        u = st["update"]
        assert st["consistent"] and u["marked_at"] != marked_at and st["point_in_time"] == u["marked_at"]
        assert st["last_error"] is None
        assert image.read_bytes() == model.snapshot()
        assert st["tracked_bytes"] == 0 and u["bytes_total"] >= 65 * G  # chunks 0-63 and 100


def test_the_server_stops_promptly_with_its_target_stopped(tmp_path: Path) -> None:
    """SIGTERM while copying flushes the target for a checkpoint: within the timeout. The next
    start goes on with the update and ends with an exact copy."""
    sock, image = tmp_path / "t.sock", tmp_path / "t.img"
    image.write_bytes(bytes(SIZE))
    server = Server(tmp_path / "data", "--target-timeout", "3")
    with running(server), serving(qemu_nbd_cmd(image, sock), sock) as proc:
        model = copy_of(server, image, sock)
        apply(server, "src", *model.chunks(0xBB, list(range(32))))
        at_mark = model.snapshot()
        start_update(server, "--max-rate", "256KiB/s")  # about 8 s
        with stopped(proc):
            began = time.monotonic()
            server.stop()  # SIGTERM: exit 0 within 30 s, or the test fails
            assert time.monotonic() - began < 15
        server.start()
        st = wait_for(server, lambda s: s["state"] == "idle", "idle", timeout=120)
        assert st["consistent"] and st["point_in_time"] == st["update"]["marked_at"]
        assert image.read_bytes() == at_mark

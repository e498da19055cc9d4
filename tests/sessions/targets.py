"""Remote NBD targets for session tests: qemu-nbd on a file, nbdkit's memory plugin."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.harness import require


def _wait_socket(sock: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30  # a loaded machine starts a server slowly
    while time.monotonic() < deadline:
        if sock.exists():
            return
        assert proc.poll() is None, f"target server exited with {proc.returncode}"
        time.sleep(0.025)
    raise AssertionError("target server did not start")


@contextmanager
def serving(cmd: list[str], sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        _wait_socket(sock, proc)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def qemu_nbd_cmd(image: Path, sock: Path) -> list[str]:
    require("qemu-nbd")
    return ["qemu-nbd", "-f", "raw", "-x", "t", "-k", str(sock), "--persistent", "--shared=8", str(image)]


def nbdkit_memory_cmd(size: int, sock: Path) -> list[str]:
    require("nbdkit")
    return ["nbdkit", "-f", "-U", str(sock), "-e", "t", "memory", str(size)]


def uri(sock: Path) -> str:
    return f"nbd+unix:///t?socket={sock}"

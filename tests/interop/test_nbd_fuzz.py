"""The black-box, model-checked NBD fuzz (``nbdfuzz``) against deltavol, and against nbdkit
and qemu-nbd (a quarter of the time each) to show the fuzz itself holds to the specification.
Seeded; DELTAVOL_NBD_FUZZ_SECONDS runs it longer (DELTAVOL_NBD_FUZZ_SEED picks another seed)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import Server, require
from tests.interop.nbdfuzz import fuzz

pytestmark = [pytest.mark.interop, pytest.mark.slow]

SECONDS = float(os.environ.get("DELTAVOL_NBD_FUZZ_SECONDS", "40"))
SEED = int(os.environ.get("DELTAVOL_NBD_FUZZ_SEED", "1"))
SIZE = (8 << 20) + 1536  # the last requests end off any 4 KiB boundary
MAX_RSS = 1 << 30


def rss_peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_fuzz_deltavol(server: Server) -> None:
    server.cli("volume", "create", "v", "--size", str(SIZE))
    stats = fuzz(str(server.sock), "v", SIZE, SECONDS, SEED)
    print(f"deltavol, seed {SEED}: {stats.total} requests {stats.ops}, {stats.bad_inputs} bad inputs")
    assert stats.total > 1000 and stats.bad_inputs > 100 and all(stats.ops.values())
    assert server.proc is not None and server.proc.poll() is None  # alive
    assert rss_peak(server.proc.pid) < MAX_RSS
    server.log.flush()
    log = server.log_path.read_text()
    assert "Traceback" not in log and "exception=" not in log, log[-4000:]


def _fuzz_peer(argv: list[str], sock: Path) -> None:
    """The fuzz against a peer server listening on ``sock``: the same checks pass there."""
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30  # a loaded machine starts a server slowly
        while not sock.exists():
            assert proc.poll() is None, f"{argv[0]} exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{argv[0]} did not start"
            time.sleep(0.05)
        stats = fuzz(str(sock), "", SIZE, SECONDS / 4, SEED)
        assert stats.total > 100 and all(stats.ops.values())
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)


def test_fuzz_nbdkit(tmp_path: Path) -> None:
    require("nbdkit")
    sock = tmp_path / "nbdkit.sock"
    _fuzz_peer(["nbdkit", "--foreground", "--threads", "1", "-U", str(sock), "memory", str(SIZE)], sock)


def test_fuzz_qemu_nbd(tmp_path: Path) -> None:
    require("qemu-nbd", "qemu-img")
    sock, image = tmp_path / "qemu.sock", tmp_path / "disk.img"
    create = ["qemu-img", "create", "-f", "raw", str(image), str(SIZE)]
    subprocess.run(create, check=True, capture_output=True)
    _fuzz_peer(["qemu-nbd", "-f", "raw", "-k", str(sock), "-e", "8", "-t", str(image)], sock)

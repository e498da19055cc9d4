"""A full disk: on the volume, writes fail with ENOSPC and nothing acknowledged is lost;
on the data dir, copy-on-first-write falls back to copy-before-write and the copy stays
exact. The data dirs here are small tmpfs mounts (the tests run as root)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import DELTAVOL, Server
from tests.interop.peers import qemu_io_run

pytestmark = pytest.mark.crash
MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.fail(f"cannot mount a tmpfs for the ENOSPC tests: {done.stderr.decode()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_volume_fails_writes_with_enospc_and_keeps_acknowledged_ones(
    small_fs: Path, tmp_path: Path
) -> None:
    srv = Server(small_fs / "data", log_path=tmp_path / "server.log")
    srv.start()
    try:
        srv.cli("volume", "create", "v", "--size", "64MiB")
        uri = srv.uri("v")
        acked = []
        for i in range(40):  # 40 MiB of data into 12 MiB of space
            out = qemu_io_run(uri, f"write -P {i + 1} {i}M 1M")
            if "No space left" in out.stdout + out.stderr:
                break
            assert out.returncode == 0 and "wrote" in out.stdout, out
            acked.append(i)
        else:
            pytest.fail("the volume never ran out of space")
        assert acked, "not even one write fitted"
        # the server is still up and every acknowledged write is intact
        checks = [f"read -P {i + 1} {i}M 1M" for i in acked]
        out = qemu_io_run(uri, *checks, read_only=True)
        assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out.stdout
        assert "No space left" in srv.log_path.read_text() or "no space" in srv.log_path.read_text()
    finally:
        srv.stop()


def test_full_data_dir_falls_back_to_copy_before_write(small_fs: Path, tmp_path: Path) -> None:
    srv = Server(small_fs / "data", log_path=tmp_path / "server.log")
    srv.start()
    try:
        # volumes live on the big disk; bitmaps and save areas on the small data dir
        for name in ("src", "dst"):
            path = tmp_path / f"{name}.img"
            with open(path, "wb") as f:
                f.truncate(32 * MiB)
            srv.cli("volume", "import", name, "--path", str(path))
        srv.cli("session", "create", "s", "--source", "src", "--target", "dst")
        src, dst = srv.uri("src"), srv.uri("dst")
        assert qemu_io_run(src, "write -P 0xa1 0 32M").returncode == 0
        srv.cli("session", "update", "s", "--full", "--wait")
        assert qemu_io_run(src, "write -P 0xb2 0 8M").returncode == 0
        # fill the data dir so that no save area record fits
        free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
        filler = small_fs / "filler"
        with open(filler, "wb") as f:
            f.write(b"\xff" * max(0, free - 256 * 1024))
        # the throttled copy of the 8 MiB owed takes 32 s: qemu-io may be slow on a loaded
        # machine, and what the throttle let through meanwhile must stay well under 4 MiB
        rate = 256 * 1024
        marked = time.monotonic()
        srv.cli("session", "update", "s", "--max-rate", f"{rate}B/s")
        before = srv.status()
        assert before["state"] == "copying" and before["update"]["bytes_done"] < 2 * MiB, before
        out = qemu_io_run(src, "write -P 0xc3 0 8M")  # overwrites chunks the update still owes
        assert out.returncode == 0 and "wrote" in out.stdout, out
        after = srv.status()["update"]
        # at most this much can have gone through the throttle since the mark (two requests
        # of a quarter second each may be in debt)
        throttled = rate * (time.monotonic() - marked) + rate // 2
        filler.unlink()
        # every owed chunk the overwrite found was saved first or copied at once; the save
        # area could not hold half of them, so copy-before-write copied them, outside the
        # throttle
        assert after["bytes_done"] + after["cofw_saved_bytes"] >= 8 * MiB, after
        assert after["cofw_saved_bytes"] < 4 * MiB, after
        assert after["bytes_done"] - throttled >= 4 * MiB, (throttled, after)
        st = srv.wait_idle(2, timeout=60)
        assert st["consistent"], st
        out = qemu_io_run(dst, "read -P 0xb2 0 8M", "read -P 0xa1 8M 24M", read_only=True)
        assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out.stdout
    finally:
        srv.stop()


def serve_once(srv: Server) -> subprocess.CompletedProcess[str] | None:
    """Start ``serve``: its outcome if it refused to start, None if it started (then stopped)."""
    (srv.root / "api.sock").unlink(missing_ok=True)
    proc = subprocess.Popen(
        [DELTAVOL, "serve", "--nbd-socket", str(srv.sock)],
        env=srv.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and not (srv.root / "api.sock").exists():
        assert time.monotonic() < deadline, "serve neither started nor refused"
        time.sleep(0.05)
    if proc.poll() is None:
        proc.terminate()
        proc.communicate(timeout=30)
        return None
    out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_full_data_dir_at_start_up_keeps_the_session_and_its_point_in_time(
    small_fs: Path, tmp_path: Path
) -> None:
    """The usual aftermath of a crash: a full data dir. Whatever step runs out of space
    first (the lock, the database, a session's bitmaps), serve says so and changes nothing:
    no file is taken for corrupt or set aside, and once space is freed the session is as it
    was (its point in time, its tracked chunks: no full copy)."""
    srv = Server(small_fs / "data", log_path=tmp_path / "server.log")
    srv.start()
    try:
        for name in ("src", "dst"):
            path = tmp_path / f"{name}.img"
            with open(path, "wb") as f:
                f.truncate(8 * MiB)
            srv.cli("volume", "import", name, "--path", str(path))
        srv.cli("session", "create", "s", "--source", "src", "--target", "dst")
        assert qemu_io_run(srv.uri("src"), "write -P 0xa1 0 8M").returncode == 0
        srv.cli("session", "update", "s", "--full", "--wait")
        assert qemu_io_run(srv.uri("src"), "write -P 0xb2 1M 64k").returncode == 0
        before = srv.status()
    finally:
        srv.stop()
    filler = small_fs / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):  # to the last byte
        while True:
            f.write(b"\xff" * 65536)
    said = []
    for _ in range(32):  # free a page at a time until it starts
        out = serve_once(srv)
        if out is None:
            break
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        # SQLite says "disk I/O error" when it cannot grow its shared-memory file
        assert "no space" in out.stderr or "I/O error" in out.stderr, out.stderr
        assert "corrupt" not in out.stderr, out.stderr
        assert not list((small_fs / "data").rglob("*.corrupt-*"))
        said.append(out.stderr)
        os.truncate(filler, filler.stat().st_size - 4096)
    else:
        pytest.fail("serve never started")
    assert any("session s: cannot load its files" in e for e in said), said
    filler.unlink()
    srv.start()
    try:
        st = srv.status()
        assert (st["state"], st["consistent"], st["point_in_time"]) == ("idle", True, before["point_in_time"])
        assert st["tracked_bytes"] == before["tracked_bytes"] > 0
    finally:
        srv.stop()

"""A full disk: on the volume, writes fail with ENOSPC and nothing acknowledged is lost;
on the data dir, copy-on-first-write falls back to copy-before-write and the copy stays
exact. The data dirs here are small tmpfs mounts (the tests run as root)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Server

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


def qemu_io(uri: str, *cmds: str, read_only: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for cmd in cmds:
        args += ["-c", cmd]
    return subprocess.run([*args, uri], capture_output=True, text=True)


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
            out = qemu_io(uri, f"write -P {i + 1} {i}M 1M")
            if "No space left" in out.stdout + out.stderr:
                break
            assert out.returncode == 0 and "wrote" in out.stdout, out
            acked.append(i)
        else:
            pytest.fail("the volume never ran out of space")
        assert acked, "not even one write fitted"
        # the server is still up and every acknowledged write is intact
        checks = [f"read -P {i + 1} {i}M 1M" for i in acked]
        out = qemu_io(uri, *checks, read_only=True)
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
        assert qemu_io(src, "write -P 0xa1 0 32M").returncode == 0
        srv.cli("session", "update", "s", "--full", "--wait")
        assert qemu_io(src, "write -P 0xb2 0 8M").returncode == 0
        # fill the data dir so that no save area record fits
        free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
        filler = small_fs / "filler"
        with open(filler, "wb") as f:
            f.write(b"\xff" * max(0, free - 256 * 1024))
        rate = 512 * 1024  # the throttled copy of the 8 MiB owed takes 16 s
        marked = time.monotonic()
        srv.cli("session", "update", "s", "--max-rate", f"{rate}B/s")
        before = srv.status()
        assert before["state"] == "copying" and before["update"]["bytes_done"] < 2 * MiB, before
        out = qemu_io(src, "write -P 0xc3 0 8M")  # overwrites chunks the update still owes
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
        out = qemu_io(dst, "read -P 0xb2 0 8M", "read -P 0xa1 8M 24M", read_only=True)
        assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out.stdout
    finally:
        srv.stop()

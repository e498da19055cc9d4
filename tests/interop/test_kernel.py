"""The kernel as a client: nbdfuse exposes a volume as a file, a loop device puts ext4 on it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness import Server, require
from tests.interop.peers import run

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@contextmanager
def loop_device(server: Server, volume: str, tmp: Path) -> Iterator[str]:
    """nbdfuse mounts the export as tmp/fuse/nbd; losetup makes a block device of it."""
    require("nbdfuse", "losetup", "fusermount3")
    fuse = tmp / "fuse"
    fuse.mkdir(parents=True)
    proc = subprocess.Popen(["nbdfuse", str(fuse), server.uri(volume)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30  # a loaded machine starts nbdfuse slowly
        while not (fuse / "nbd").exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "nbdfuse did not mount"
            time.sleep(0.05)
        dev = run("losetup", "-f", "--show", str(fuse / "nbd")).stdout.strip()
        try:
            yield dev
        finally:
            run("losetup", "-d", dev, ok=False)
    finally:
        run("fusermount3", "-u", str(fuse), ok=False)
        proc.wait(30)


@contextmanager
def mounted(dev: str, where: Path) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    run("mount", dev, str(where))
    try:
        yield where
    finally:
        run("umount", str(where))


def test_ext4_on_a_volume_through_nbdfuse_and_a_loop_device(server: Server, tmp_path: Path) -> None:
    require("mkfs.ext4", "e2fsck")
    server.cli("volume", "create", "fs", "--size", "64MiB")
    files = {f"f{i}.bin": os.urandom(100_000 * (i + 1)) for i in range(5)}
    with loop_device(server, "fs", tmp_path) as dev:
        run("mkfs.ext4", "-q", "-F", dev)
        with mounted(dev, tmp_path / "mnt") as mnt:
            for name, data in files.items():
                (mnt / name).write_bytes(data)
            run("sync")
        run("e2fsck", "-fn", dev)
    # a second time from scratch: everything came back through the server, not a cache
    with loop_device(server, "fs", tmp_path / "again") as dev, mounted(dev, tmp_path / "mnt2") as mnt:
        for name, data in files.items():
            assert hashlib.sha256((mnt / name).read_bytes()).digest() == hashlib.sha256(data).digest()

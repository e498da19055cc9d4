"""File-system helpers for durability by ordering (write, fsync, rename, fsync dir)."""

from __future__ import annotations

import functools
import os
import uuid
from pathlib import Path


def sync_dir(path: Path) -> None:
    """Make a rename or create in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def boot_id() -> bytes:
    """This boot of the machine (16 bytes; empty if unknown). Page-cache writes outlive a
    killed process but not a reboot, so files tagged with the boot they were written in
    tell which of their unsynced writes may be gone."""
    try:
        return uuid.UUID(Path("/proc/sys/kernel/random/boot_id").read_text().strip()).bytes
    except (OSError, ValueError):
        return b""

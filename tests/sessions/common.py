"""What the session tests share: volumes with known patterns, a byte model of what a volume
must hold, and updates started and followed through the CLI's JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.harness import Server
from tests.interop.peers import qemu_io

KiB = 1 << 10
MiB = 1 << 20
G = 64 * KiB


class Model:
    """The bytes a volume must hold, kept beside the qemu-io commands that write them."""

    def __init__(self, size: int, fill: int = 0) -> None:
        self.data = bytearray([fill]) * size

    def write(self, pattern: int, offset: int, length: int) -> str:
        self.data[offset : offset + length] = bytes([pattern]) * length
        return f"write -P {pattern} {offset} {length}"

    def zero(self, offset: int, length: int) -> str:
        self.data[offset : offset + length] = bytes(length)
        return f"write -z {offset} {length}"

    def discard(self, offset: int, length: int) -> str:
        self.data[offset : offset + length] = bytes(length)  # deltavol reads trimmed ranges as zeroes
        return f"discard {offset} {length}"

    def chunks(self, pattern: int, chunks: list[int], g: int = G) -> list[str]:
        return [self.write(pattern, c * g, g) for c in chunks]

    def snapshot(self) -> bytes:
        return bytes(self.data)


def apply(server: Server, volume: str, *commands: str) -> None:
    """Write through deltavol's NBD export with qemu-io (every command must succeed)."""
    qemu_io(server.uri(volume), *commands)


def start_update(server: Server, *args: str, session: str = "s") -> dict[str, Any]:
    """``session update`` (returns once marked): the session's JSON at that moment."""
    st: dict[str, Any] = json.loads(server.cli("session", "update", session, "--json", *args))
    return st


def wait_for(
    server: Server, pred: Any, what: str, timeout: float = 60, session: str = "s", failed_ok: bool = False
) -> dict[str, Any]:
    """Poll the session's status until ``pred(status)`` holds (a failed session is an error at
    once unless ``failed_ok``)."""
    deadline = time.monotonic() + timeout
    while True:
        st = server.status(session)
        if pred(st):
            return st
        assert failed_ok or st["state"] != "failed", (
            f"session {session} failed while waiting to be {what}: {st}"
        )
        assert time.monotonic() < deadline, f"session {session}: never {what}: {st}"
        time.sleep(0.05)


def volume_path(server: Server, name: str) -> Path:
    return Path(json.loads(server.cli("volume", "info", name, "--json"))["path"])


def differing_chunks(got: bytes, want: bytes, g: int = G) -> list[int]:
    """Chunk numbers where two images differ (an assertion message that says where)."""
    assert len(got) >= len(want), (len(got), len(want))
    return [
        c for c in range(0, (len(want) + g - 1) // g) if got[c * g : (c + 1) * g] != want[c * g : (c + 1) * g]
    ]


def session_with_copy(server: Server, size: int, granularity: int = G, target: str = "dst") -> Model:
    """Pattern 0xAA everywhere on a new source, session ``s`` to a new local volume, a finished
    full update; returns the model of the source."""
    server.cli("volume", "create", "src", "--size", str(size))
    server.cli("volume", "create", target, "--size", str(size))
    model = Model(size)
    apply(server, "src", model.write(0xAA, 0, size))
    server.cli(
        "session", "create", "s", "--source", "src", "--target", target, "--granularity", str(granularity)
    )
    server.cli("session", "update", "s", "--full", "--wait")
    assert server.image(target) == model.snapshot()
    return model


def refused_open(server: Server, volume: str) -> str:
    """qemu-io cannot open ``volume`` even read-only; the refusal's text."""
    text = qemu_io(server.uri(volume), "read 0 4k", ok=False, read_only=True)
    assert "can't open" in text, text
    return text

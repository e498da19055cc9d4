"""Damaged metadata is found on open and named: a session whose bitmap or save area is
corrupt or truncated comes back ``failed`` with ``last_error`` naming the file, and
``update --full`` brings it back; a corrupt database stops the server with its name."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import DELTAVOL, Server

pytestmark = pytest.mark.crash
SIZE = 8 * 1024 * 1024


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path / "data")
    server.start()
    server.cli("volume", "create", "src", "--size", str(SIZE))
    server.cli("volume", "create", "dst", "--size", str(SIZE))
    server.cli("session", "create", "s", "--source", "src", "--target", "dst")
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x44 0 8M", server.uri("src")],
        check=True,
        capture_output=True,
    )
    server.cli("session", "update", "s", "--full", "--wait")
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x45 1M 1M", server.uri("src")],
        check=True,
        capture_output=True,
    )
    yield server
    server.stop()


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "magic":
        data[0:8] = b"XXXXXXXX"
    elif how == "header":
        data[20] ^= 0xFF  # a geometry byte: the CRC no longer matches
    elif how == "truncated":
        data = data[: len(data) - 16]
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["magic", "header", "truncated", "empty"])
def test_corrupt_tracking_bitmap_fails_the_session_naming_the_file(srv: Server, how: str) -> None:
    srv.stop()
    tracking = srv.root / "bitmaps" / "s.tracking"
    damage(tracking, how)
    srv.start()
    st = srv.status()
    assert st["state"] == "failed"
    assert not st["consistent"]
    assert str(tracking) in st["last_error"]
    assert "--full" in st["last_error"]
    assert list(tracking.parent.glob("s.tracking.corrupt-*")), "the damaged file is kept for inspection"
    # an incremental update cannot pretend to know what changed: it is a full one
    out = json.loads(srv.cli("session", "update", "s", "--wait", "--json"))
    assert out["update"]["kind"] == "full"
    assert out["state"] == "idle" and out["consistent"]
    assert srv.image("src") == srv.image("dst")


def test_truncated_transfer_bitmap_of_a_paused_update(srv: Server) -> None:
    srv.cli("session", "update", "s", "--max-rate", "64KiB/s")
    srv.cli("session", "pause", "s")
    srv.stop()
    transfer = srv.root / "bitmaps" / "s.transfer"
    damage(transfer, "truncated")
    srv.start()
    st = srv.status()
    assert st["state"] == "failed" and str(transfer) in st["last_error"], st
    refused = srv.run("session", "resume", "s")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    srv.cli("session", "update", "s", "--full", "--wait")
    assert srv.image("src") == srv.image("dst")


def test_corrupt_save_area(srv: Server) -> None:
    srv.cli("session", "update", "s", "--max-rate", "64KiB/s")
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x46 1M 1M", srv.uri("src")], check=True, capture_output=True
    )
    srv.cli("session", "pause", "s")
    srv.stop()
    save = srv.root / "save" / "s.save"
    damage(save, "magic")
    srv.start()
    st = srv.status()
    assert st["state"] == "failed" and str(save) in st["last_error"], st
    srv.cli("session", "update", "s", "--full", "--wait")
    assert srv.image("src") == srv.image("dst")


def test_an_unreadable_bitmap_stops_the_start_up_and_keeps_the_files(srv: Server) -> None:
    """An I/O error is no corruption: nothing is set aside and no full copy is asked for;
    the server says what and why, and starts as before once the cause is gone."""
    before = srv.status()
    srv.stop()
    tracking = srv.root / "bitmaps" / "s.tracking"
    kept = tracking.with_name("kept")
    tracking.rename(kept)
    tracking.mkdir()  # reading it fails with EISDIR, as a bad sector fails with EIO
    out = subprocess.run(
        [DELTAVOL, "serve", "--nbd-socket", str(srv.sock)],
        env=srv.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    assert "session s" in out.stderr and str(tracking) in out.stderr and "Traceback" not in out.stderr
    assert not list(tracking.parent.glob("*.corrupt-*"))
    tracking.rmdir()
    kept.rename(tracking)
    srv.start()
    st = srv.status()
    assert (st["state"], st["consistent"], st["point_in_time"]) == ("idle", True, before["point_in_time"])
    assert st["tracked_bytes"] == before["tracked_bytes"] > 0


def test_corrupt_database_is_refused_by_name(tmp_path: Path) -> None:
    root = tmp_path / "data"
    server = Server(root)
    server.start()
    server.cli("volume", "create", "v", "--size", "1MiB")
    server.stop()
    db = root / "deltavol.db"
    for extra in root.glob("deltavol.db-*"):
        extra.unlink()
    db.write_bytes(b"this is not a database" * 100)
    out = subprocess.run(
        [DELTAVOL, "serve", "--data-dir", str(root), "--nbd-socket", str(root / "n.sock")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert str(db) in out.stderr and "Traceback" not in out.stderr

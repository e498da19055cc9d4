"""The CLI's contract (DESIGN §4): one-line messages, exit 0 / 1 (failed) / 2 (usage), no
tracebacks, nothing changed by a refused command; the server's lock and its clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.harness import DELTAVOL, SYSTEM_PYTHON, Server, require
from tests.interop.peers import qemu_io

pytestmark = pytest.mark.interop
AIO_WRITER = Path(__file__).with_name("aio_writer.py")
DEAD = {"0", "ENOTCONN", "ESHUTDOWN", "ECONNRESET", "EPIPE"}  # libnbd: the connection went away


def pattern(tag: int, length: int) -> bytes:
    head = tag.to_bytes(8, "little")
    return (head * (length // 8 + 1))[:length]


def refused(server: Server, code: int, *args: str) -> str:
    """Run a command that must fail with ``code``; returns its one-line message."""
    before = server.cli("volume", "list", "--json")
    out = server.run(*args)
    assert out.returncode == code, (args, out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()
    # a failed operation is one line; a usage error may come after click's usage synopsis
    assert len(lines) == 1 or (code == 2 and lines[0].startswith("Usage:")), lines
    message = lines[-1]
    assert server.cli("volume", "list", "--json") == before  # nothing changed
    return message


def test_volume_lifecycle_and_json(server: Server) -> None:
    server.cli("volume", "create", "a", "--size", "1MiB")
    server.cli("volume", "create", "b", "--size", "2G")
    listing = json.loads(server.cli("volume", "list", "--json"))
    assert {v["name"]: v["size"] for v in listing} == {"a": 1 << 20, "b": 2 << 30}
    info = json.loads(server.cli("volume", "info", "a", "--json"))
    assert info["name"] == "a" and info["size"] == 1 << 20 and Path(info["path"]).stat().st_size == 1 << 20
    server.cli("volume", "remove", "a")
    assert not Path(info["path"]).exists()
    assert [v["name"] for v in json.loads(server.cli("volume", "list", "--json"))] == ["b"]


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["volume", "create", "a/b", "--size", "1M"], 2, "name"),
        (["volume", "create", "", "--size", "1M"], 2, "name"),
        (["volume", "create", "x" * 65, "--size", "1M"], 2, "name"),
        (["volume", "create", "odd", "--size", "1000"], 2, "512"),
        (["volume", "create", "junk", "--size", "12 parsecs"], 2, "size"),
        (["volume", "create", "dup", "--size", "1M"], 1, "exists"),
        (["volume", "info", "nope"], 1, "nope"),
        (["volume", "remove", "nope"], 1, "nope"),
        (["volume", "import", "imp", "--path", "/no/such/file"], 1, "/no/such/file"),
        (["session", "update", "nope"], 1, "nope"),
    ],
)
def test_refusals(server: Server, args: list[str], code: int, words: str) -> None:
    server.cli("volume", "create", "dup", "--size", "1M")
    assert words in refused(server, code, *args).lower()


def test_import_serves_a_file_in_place(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x42" * (1 << 20))
    server.cli("volume", "import", "disk", "--path", str(image))
    qemu_io(server.uri("disk"), "read -P 0x42 0 1M", "write -P 0x43 4096 4096")
    server.stop()
    assert image.read_bytes()[4096:8192] == b"\x43" * 4096


def test_no_server_running_says_how_to_start_one(tmp_path: Path) -> None:
    env = {**os.environ, "DELTAVOL_DATA_DIR": str(tmp_path / "none")}
    out = subprocess.run([DELTAVOL, "volume", "list"], env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "deltavol serve" in out.stderr


def test_a_second_server_on_the_same_data_dir_is_refused(server: Server) -> None:
    out = subprocess.run(
        [DELTAVOL, "serve", "--nbd-socket", str(server.root / "other.sock")],
        env=server.env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert str(server.proc.pid if server.proc else "") in out.stderr or "lock" in out.stderr.lower()
    server.cli("volume", "list")  # the first one is unharmed


def test_sigterm_drains_writes_in_flight_and_exits_0(server: Server) -> None:
    require(SYSTEM_PYTHON)
    g, count = 64 * 1024, 256
    server.cli("volume", "create", "w", "--size", str(g * count))
    path = Path(json.loads(server.cli("volume", "info", "w", "--json"))["path"])
    writer = subprocess.Popen(
        [SYSTEM_PYTHON, str(AIO_WRITER), server.uri("w"), str(count), str(g)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert writer.stdout is not None
        head = []
        while not head or head[-1] != "sent\n":  # 16 MiB of writes queued at once
            head.append(writer.stdout.readline())
            assert head[-1], "the writer failed"
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        out = writer.stdout.read()  # what readline() read ahead is in its buffer
        assert writer.wait(30) == 0
    finally:
        writer.kill()
    log = server.log_path.read_text()
    assert "stopping" in log and "stopped" in log
    assert all(line[:4].isdigit() for line in log.splitlines() if line.strip())  # structured lines
    events = [line.split() for line in "".join(head).splitlines() + out.splitlines()]
    acked = {int(e[1]) for e in events if e[0] == "ack"}
    failed = [e for e in events if e[0] == "err"]
    assert len(acked) + len(failed) == count, (len(acked), len(failed))
    # the server failed no write: those it had not taken fail with the connection
    assert not [e for e in failed if e[3] not in DEAD], failed[:5]
    # every acknowledged write is in the volume; one not acknowledged holds all old or all
    # new bytes (the server may have answered it after the client, still sending, saw the
    # socket close: libnbd then drops the replies it has not read)
    data = path.read_bytes()
    lost = [c for c in sorted(acked) if data[c * g : (c + 1) * g] != pattern(c + 1, g)]
    assert not lost, f"acknowledged writes lost: {lost[:20]}"
    torn = [c for c in range(count) if data[c * g : (c + 1) * g] not in (pattern(c + 1, g), bytes(g))]
    assert not torn, torn[:20]


def test_sigterm_keeps_every_acknowledged_write(server: Server) -> None:
    server.cli("volume", "create", "k", "--size", "4MiB")
    qemu_io(server.uri("k"), *(f"write -P {i + 1} {i * 65536} 65536" for i in range(64)))
    path = Path(json.loads(server.cli("volume", "info", "k", "--json"))["path"])
    server.stop()
    data = path.read_bytes()
    assert all(data[i * 65536 : (i + 1) * 65536] == bytes([i + 1]) * 65536 for i in range(64))

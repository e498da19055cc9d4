"""The CLI's contract (DESIGN §4): one-line messages, exit 0 / 1 (failed) / 2 (usage), no
tracebacks, nothing changed by a refused command; the server's lock and its clean stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from tests.harness import DELTAVOL, Server
from tests.interop.peers import qemu_io
from tests.interop.test_wire import handshake
from tests.protocol.wire import SIMPLE_REPLY_MAGIC, request

pytestmark = pytest.mark.interop
CMD_WRITE, FUA = 1, 1 << 0  # a FUA write is never done inline: it is in flight for its fdatasync


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
        (["volume", "import", "imp", "--path", "/"], 2, "not a regular file"),
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
    """Raw NBD FUA writes stream in while SIGTERM arrives. A plain socket client, which reads
    every reply until the server closes (libnbd gives up on unread replies once a send
    fails), so the writes that landed and the writes acknowledged can be compared."""
    g, count = 64 * 1024, 256
    server.cli("volume", "create", "v", "--size", str(g * count))
    path = Path(json.loads(server.cli("volume", "info", "v", "--json"))["path"])
    under_way = threading.Event()
    with handshake(server) as w:
        w.sock.settimeout(30)

        def send() -> None:
            with contextlib.suppress(OSError):  # the server closed: the rest is not sent
                for c in range(count):
                    data = pattern(c + 1, g)
                    w.sock.sendall(request(CMD_WRITE, cookie=c + 1, offset=c * g, data=data, flags=FUA))
                    if c == 31:
                        under_way.set()
            under_way.set()

        sender = threading.Thread(target=send)
        sender.start()
        assert under_way.wait(30)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        replies = b""
        with contextlib.suppress(ConnectionResetError):  # after the replies it had
            while more := w.sock.recv(1 << 16):
                replies += more
        sender.join(30)
    assert server.proc.wait(30) == 0
    log = server.log_path.read_text()
    assert "stopping" in log and "stopped" in log
    assert all(line[:4].isdigit() for line in log.splitlines() if line.strip())  # structured lines
    acked = set()
    assert len(replies) % 16 == 0, len(replies)
    for at in range(0, len(replies), 16):
        magic, error, cookie = struct.unpack(">IIQ", replies[at : at + 16])
        assert magic == SIMPLE_REPLY_MAGIC and error == 0, (magic, error, cookie)  # none failed
        acked.add(cookie - 1)
    # every write the server carried out it acknowledged before closing, and every one it
    # acknowledged is in the volume; the others left no byte
    data = path.read_bytes()
    landed = {c for c in range(count) if data[c * g : (c + 1) * g] == pattern(c + 1, g)}
    assert landed == acked, (sorted(acked - landed)[:20], sorted(landed - acked)[:20])
    assert all(data[c * g : (c + 1) * g] == bytes(g) for c in range(count) if c not in landed)


def test_sigterm_keeps_every_acknowledged_write(server: Server) -> None:
    server.cli("volume", "create", "k", "--size", "4MiB")
    qemu_io(server.uri("k"), *(f"write -P {i + 1} {i * 65536} 65536" for i in range(64)))
    path = Path(json.loads(server.cli("volume", "info", "k", "--json"))["path"])
    server.stop()
    data = path.read_bytes()
    assert all(data[i * 65536 : (i + 1) * 65536] == bytes([i + 1]) * 65536 for i in range(64))

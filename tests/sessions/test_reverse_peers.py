"""``session reverse`` between two deltavol servers: L's session S (A -> nbd://R/B, created with
``--peer-api``) is handed over to R as B -> nbd://L/A, seeded with L's tracking and point in
time, and back again; every update copies only the chunks changed on either side. The peer
guards its volume (only the session's copier writes it), and the exchange survives a kill -9
of either server at its critical steps."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Server
from tests.interop.peers import qemu_io
from tests.sessions.common import G, MiB, Model, apply, start_update, wait_for

pytestmark = pytest.mark.interop

SIZE = 8 * MiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Peer(Server):
    """A server with its API on loopback TCP too (its peer calls it there)."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        super().__init__(root, "--api", f"127.0.0.1:{self.port}")

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sessions(self) -> list[str]:
        return [s["name"] for s in json.loads(self.cli("session", "list", "--json"))]

    @property
    def peer_token(self) -> str:
        return (self.root / "peer.token").read_text().strip()

    def sha(self, volume: str) -> str:
        return hashlib.sha256(self.image(volume)).hexdigest()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Peer, Peer]]:
    servers = Peer(tmp_path / "L"), Peer(tmp_path / "R")
    for srv in servers:
        srv.start()
    try:
        yield servers
    finally:
        for srv in servers:
            if srv.proc is not None and srv.proc.poll() is None:
                srv.stop()
            srv.log.close()
    for srv in servers:
        assert "Traceback" not in srv.log_path.read_text()


def connect(left: Peer, right: Peer, volumes: bool = True) -> Model:
    """A (0xAA everywhere) on L, B on R, session s: A -> nbd://R/B with R's API, full copy."""
    if volumes:
        left.cli("volume", "create", "A", "--size", str(SIZE))
        right.cli("volume", "create", "B", "--size", str(SIZE))
    model = Model(SIZE)
    apply(left, "A", model.write(0xAA, 0, SIZE))
    left.cli(
        "session", "create", "s", "--source", "A", "--target", right.uri("B"),
        "--peer-api", right.api, "--peer-token-file", str(right.root / "peer.token"),
    )  # fmt: skip
    left.cli("session", "update", "s", "--full", "--wait")
    assert left.sha("A") == right.sha("B") == hashlib.sha256(model.snapshot()).hexdigest()
    return model


def update_bytes(server: Server) -> int:
    """An incremental update of s to its end; the bytes it had to copy."""
    u = start_update(server)["update"]
    assert u["kind"] == "incremental", u
    done = server.wait_idle(u["id"])
    assert done["consistent"], done
    total: int = done["update"]["bytes_total"]
    return total


def refused_write(server: Server, volume: str) -> None:
    """qemu-io cannot write ``volume`` through ``server``, and the volume is unchanged."""
    before = hashlib.sha256(server.image(volume)).hexdigest()
    text = qemu_io(server.uri(volume), "write -P 0x66 0 65536", ok=False)
    low = text.lower()
    assert "read-only" in low or "permission" in low or "failed" in low, text
    assert "wrote" not in low, text
    assert hashlib.sha256(server.image(volume)).hexdigest() == before


def tracked_chunks(server: Peer) -> list[int]:
    """``GET /v1/sessions/s/tracking`` with the API token: the chunks its bits name. The peer
    token does not open it (it is for the /v1/peer/ routes only)."""
    url = f"{server.api}/v1/sessions/s/tracking"
    peer = urllib.request.Request(url, headers={"Authorization": f"Bearer {server.peer_token}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(peer, timeout=30)
    assert refused.value.code == 401
    token = (server.root / "api.token").read_text().strip()
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert int(resp.headers["X-Deltavol-Granularity"]) == G
        bits = resp.read()
    assert len(bits) == SIZE // G // 8
    return [i for i in range(len(bits) * 8) if bits[i >> 3] >> (i & 7) & 1]


def reverse(server: Server) -> dict:
    info: dict = json.loads(server.cli("session", "reverse", "s", "--json"))
    return info


def wait_until(what: str, pred: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.1)


def test_failover_and_failback_between_two_servers(pair: tuple[Peer, Peer]) -> None:
    left, right = pair
    a = connect(left, right)
    refused_write(right, "B")  # L's target: nobody else writes it
    guard = json.loads(right.cli("volume", "info", "B", "--json"))["guarded_by"]
    assert guard is not None and "'s'" in guard, guard
    peer_file = left.root / "peers" / "s.json"
    secrets = json.loads(peer_file.read_text())
    assert peer_file.stat().st_mode & 0o777 == 0o600
    assert (right.root / "peer.token").stat().st_mode & 0o777 == 0o600
    st = left.status()
    assert st["peer"] == {
        "api": right.api, "reverse_api": None, "reverse_target": None, "reverse_pending": False
    }, st  # fmt: skip

    apply(left, "A", *a.chunks(0x01, [0, 1, 2]))
    assert update_bytes(left) == 3 * G
    assert left.sha("A") == right.sha("B")
    lost = [5, 6, 40]  # written on A after the point in time: B's version wins
    apply(left, "A", *a.chunks(0x02, lost))

    info = reverse(left)  # failover: R runs the session now
    assert info["reversed_to"] == right.api, info
    assert left.sessions() == []
    st = right.status()
    assert (st["source"], st["target"]) == ("B", f"nbd+unix:///A?socket={left.sock}"), st
    assert st["state"] == "idle" and not st["consistent"] and st["tracked_bytes"] == len(lost) * G, st
    refused_write(left, "A")  # R's target now
    assert tracked_chunks(right) == lost

    b = Model(SIZE)
    b.data[:] = right.image("B")
    written = [6, 7, 100, 101]
    qemu_io(right.uri("B"), *b.chunks(0x03, written))
    assert update_bytes(right) == len(set(lost) | set(written)) * G  # both sides, no more
    assert left.sha("A") == right.sha("B") == hashlib.sha256(b.snapshot()).hexdigest()

    at_mark = Model(SIZE)
    at_mark.data[:] = b.data
    qemu_io(right.uri("B"), *b.chunks(0x05, [10, 11]))  # after R's point in time: A wins
    info = reverse(right)  # failback
    assert info["reversed_to"] == left.api, info
    assert right.sessions() == [] and left.sessions() == ["s"]
    st = left.status()
    assert (st["source"], st["target"]) == ("A", right.uri("B")) and st["tracked_bytes"] == 2 * G, st
    refused_write(right, "B")
    qemu_io(left.uri("A"), *at_mark.chunks(0x06, [11, 12, 13]))
    assert update_bytes(left) == len({10, 11, 12, 13}) * G
    assert left.sha("A") == right.sha("B") == hashlib.sha256(at_mark.snapshot()).hexdigest()

    for secret in (secrets["guard"], secrets["token"]):  # never logged, never in a session's JSON
        assert secret not in left.log_path.read_text() + right.log_path.read_text()
        assert secret not in left.cli("session", "list", "--json")
    left.cli("session", "remove", "s")  # the guard goes with the session
    assert json.loads(right.cli("volume", "info", "B", "--json"))["guarded_by"] is None
    qemu_io(right.uri("B"), "write -P 0x07 0 65536")


def test_kill_of_the_giver_after_the_peer_took_the_session(pair: tuple[Peer, Peer]) -> None:
    left, right = pair
    a = connect(left, right)
    apply(left, "A", *a.chunks(0x01, [3, 4]))
    left.stop()
    left.env["DELTAVOL_TEST_FAULT"] = "reverse-accepted"
    left.start()
    out = left.run("session", "reverse", "s")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert left.proc is not None and left.proc.wait(30) == -9
    assert right.sessions() == ["s"]  # R took it
    del left.env["DELTAVOL_TEST_FAULT"]
    left.start()  # L asks R how the reverse ended, and finishes it
    wait_until("settled on L", lambda: left.sessions() == [])
    refused_write(left, "A")
    b = Model(SIZE)
    b.data[:] = right.image("B")
    qemu_io(right.uri("B"), *b.chunks(0x09, [20]))
    assert update_bytes(right) == 3 * G  # A's 3, 4 and B's 20
    assert left.sha("A") == right.sha("B") == hashlib.sha256(b.snapshot()).hexdigest()


def test_kill_of_the_peer_before_it_answers(pair: tuple[Peer, Peer]) -> None:
    left, right = pair
    a = connect(left, right)
    apply(left, "A", *a.chunks(0x01, [3]))
    right.stop()
    right.env["DELTAVOL_TEST_FAULT"] = "adopt-before-commit"
    right.start()
    out = left.run("session", "reverse", "s")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert right.proc is not None and right.proc.wait(30) == -9
    assert left.sessions() == ["s"]  # still L's
    del right.env["DELTAVOL_TEST_FAULT"]
    right.start()
    assert right.sessions() == []  # nothing changed on R: B still L's target
    refused_write(right, "B")
    info = reverse(left)  # settles the first request (aborted), then reverses
    assert info["reversed_to"] == right.api, info
    assert left.sessions() == [] and right.status()["tracked_bytes"] == G
    assert update_bytes(right) == G  # A's chunk 3 goes back to B's (the point in time's)
    at_mark = Model(SIZE)
    at_mark.write(0xAA, 0, SIZE)
    assert left.sha("A") == right.sha("B") == hashlib.sha256(at_mark.snapshot()).hexdigest()


def test_refusals_change_nothing(pair: tuple[Peer, Peer], tmp_path: Path) -> None:
    left, right = pair
    left.cli("volume", "create", "A", "--size", str(SIZE))
    right.cli("volume", "create", "B", "--size", str(SIZE))
    right.cli("volume", "create", "C", "--size", str(SIZE))
    right.cli("session", "create", "busy", "--source", "C", "--target", "B")  # B is busy on R
    token = str(right.root / "peer.token")
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token")

    def create(target: str, api: str, token_file: str) -> subprocess.CompletedProcess[str]:
        return left.run(
            "session", "create", "s", "--source", "A", "--target", target,
            "--peer-api", api, "--peer-token-file", token_file,
        )  # fmt: skip

    cases = {
        "unreachable": create(right.uri("B"), f"http://127.0.0.1:{free_port()}", token),
        "wrong token": create(right.uri("B"), right.api, str(wrong)),
        "unknown volume": create(right.uri("nope"), right.api, token),
        "busy volume": create(right.uri("B"), right.api, token),
    }
    for why, out in cases.items():
        assert out.returncode == 1, (why, out.stderr)
        assert "Traceback" not in out.stderr and out.stderr.strip(), (why, out.stderr)
    assert "cannot connect" in cases["unreachable"].stderr
    assert "token" in cases["wrong token"].stderr
    assert "'nope' does not exist" in cases["unknown volume"].stderr
    assert "in use" in cases["busy volume"].stderr
    assert left.sessions() == [] and right.sessions() == ["busy"]
    assert json.loads(right.cli("volume", "info", "B", "--json"))["guarded_by"] is None
    assert not list((left.root / "peers").glob("*.json"))  # no peer file left behind

    # a deltavol export as target, without --peer-api: R knows nothing of it, restore only
    right.cli("session", "remove", "busy")
    left.cli("session", "create", "s", "--source", "A", "--target", right.uri("B"))
    left.cli("session", "update", "s", "--full", "--wait")
    out = left.run("session", "reverse", "s")
    assert out.returncode == 1 and "session restore" in out.stderr and "--peer-api" in out.stderr, out.stderr
    left.cli("session", "remove", "s")

    # R down at the reverse: refused, and A stays writable, the session L's
    connect(left, right, volumes=False)
    right.stop()
    out = left.run("session", "reverse", "s")
    assert out.returncode == 1 and "cannot connect" in out.stderr, out.stderr
    assert left.sessions() == ["s"] and left.status()["state"] == "idle"
    qemu_io(left.uri("A"), "write -P 0x0b 0 65536")
    right.start()
    info = reverse(left)  # once R is back, the reverse goes through
    assert info["reversed_to"] == right.api
    assert update_bytes(right) == G  # A's chunk 0, written after the point in time
    assert left.sha("A") == right.sha("B")


def test_unguard_when_the_source_host_is_lost(pair: tuple[Peer, Peer]) -> None:
    """L is gone for good: on R, ``volume unguard B`` makes B writable; a copy from L's session
    is refused from then on (its export name holds the dropped guard's secret)."""
    left, right = pair
    a = connect(left, right)
    refused_write(right, "B")
    out = right.cli("volume", "unguard", "B")
    assert "dropped" in out, out
    qemu_io(right.uri("B"), "write -P 0x0c 0 65536")  # writable now
    apply(left, "A", *a.chunks(0x01, [1]))
    start_update(left)
    st = wait_for(left, lambda s: s["state"] == "failed", "failed", failed_ok=True)
    assert "read-only" in st["last_error"] or "protected" in st["last_error"], st
    image = right.image("B")
    assert image[:G] == b"\x0c" * G and image[G : 2 * G] == b"\xaa" * G  # nothing of L's landed
    left.cli("session", "remove", "s")
    assert right.cli("volume", "unguard", "B").strip() == "volume B had no guard"

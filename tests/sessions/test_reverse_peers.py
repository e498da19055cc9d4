"""``session reverse`` between two deltavol servers: L's session S (A -> nbd://R/B, created with
``--peer-api``) is handed over to R as B -> nbd://L/A, seeded with L's tracking and point in
time, and back again; every update copies only the chunks changed on either side. The peer
guards its volume (only the session's copier writes it), and the exchange survives a kill -9
of either server at its critical steps."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import DELTAVOL, Server, free_port
from tests.interop.peers import nbdsh, qemu_io
from tests.sessions.common import G, MiB, Model, apply, start_update, wait_for

pytestmark = pytest.mark.interop

SIZE = 8 * MiB


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
        right.cli("volume", "create", "B", "--size", str(SIZE), "--peer-target")
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
    assert "read-only" in low or "permission" in low or "failed" in low or "protected" in low, text
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
    right.cli("volume", "create", "B", "--size", str(SIZE), "--peer-target")
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


def peer_call(server: Peer, method: str, path: str, body: object) -> tuple[int, object]:
    """A call with ``server``'s peer token, as another deltavol server makes it."""
    req = urllib.request.Request(
        server.api + path,
        method=method,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {server.peer_token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_peer_token_guards_only_peer_targets(pair: tuple[Peer, Peer]) -> None:
    """The peer token cannot guard (and so write) a volume the administrator did not make a
    peer target, nor replace a standing guard without its secret."""
    left, right = pair
    right.cli("volume", "create", "prod", "--size", str(SIZE))
    status, answer = peer_call(right, "PUT", "/v1/peer/guards/prod", {"holder": "x", "secret": "mine"})
    assert status == 409 and "peer target" in str(answer), answer
    assert json.loads(right.cli("volume", "info", "prod", "--json"))["guarded_by"] is None
    text = qemu_io(f"nbd+unix:///prod@mine?socket={right.sock}", "write -P 0x66 0 65536", ok=False)
    assert "wrote" not in text.lower(), text
    assert right.image("prod")[:G] == bytes(G)

    bad = {"holder": "a\nb", "secret": "s"}
    status, answer = peer_call(right, "PUT", "/v1/peer/guards/prod", bad)
    assert status == 400 and "holder" in str(answer), answer

    a = connect(left, right)
    assert json.loads(right.cli("volume", "info", "B", "--json"))["peer_target"] is True
    holder = json.loads(right.cli("volume", "info", "B", "--json"))["guarded_by"]
    status, answer = peer_call(right, "PUT", "/v1/peer/guards/B", {"holder": holder, "secret": "stolen"})
    assert status == 409, answer
    wrong = {"holder": holder, "secret": "stolen", "current": "guess"}
    status, answer = peer_call(right, "PUT", "/v1/peer/guards/B", wrong)
    assert status == 409, answer
    text = qemu_io(f"nbd+unix:///B@stolen?socket={right.sock}", "write -P 0x77 0 65536", ok=False)
    assert "wrote" not in text.lower(), text
    apply(left, "A", *a.chunks(0x01, [0]))
    assert update_bytes(left) == G  # the session's copier still writes B
    assert left.sha("A") == right.sha("B")

    left.cli("session", "remove", "s")
    right.cli("volume", "peer-target", "B", "--off")
    assert json.loads(right.cli("volume", "info", "B", "--json"))["peer_target"] is False
    status, answer = peer_call(right, "PUT", "/v1/peer/guards/B", {"holder": "x", "secret": "mine"})
    assert status == 409 and "peer target" in str(answer), answer
    right.stop()
    right.start()  # the flag is in the database
    assert json.loads(right.cli("volume", "info", "B", "--json"))["peer_target"] is False
    right.cli("volume", "peer-target", "B", "--on")
    right.stop()
    right.start()
    assert json.loads(right.cli("volume", "info", "B", "--json"))["peer_target"] is True
    right.cli("volume", "remove", "B")  # the flag goes with the volume


def read_at(server: Server, volume: str, offset: int, length: int) -> bytes:
    path = server.get(f"/v1/volumes/{volume}")["path"]
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_reverse_of_a_large_volume(pair: tuple[Peer, Peer]) -> None:
    """1 TiB (sparse) at 64 KiB chunks: the tracking bitmap is 2 MiB, over aiohttp's 1 MiB
    body limit in base64. The reverse goes through, and so does an uncompressed body of that
    size; a body past what any volume here needs is refused with a JSON error."""
    left, right = pair
    size = 1 << 40
    left.cli("volume", "create", "A", "--size", str(size))
    right.cli("volume", "create", "B", "--size", str(size), "--peer-target")
    left.cli(
        "session", "create", "s", "--source", "A", "--target", right.uri("B"),
        "--peer-api", right.api, "--peer-token-file", str(right.root / "peer.token"),
    )  # fmt: skip
    left.cli("session", "update", "s", "--full", "--wait")
    last = size - G
    apply(left, "A", f"write -P 0x21 0 {G}", f"write -P 0x22 {last} {G}")
    assert update_bytes(left) == 2 * G
    apply(left, "A", f"write -P 0x23 {last} {G}")  # after the point in time: B's version wins
    info = reverse(left)
    assert info["reversed_to"] == right.api, info
    st = right.status()
    assert st["state"] == "idle" and st["tracked_bytes"] == G, st
    assert update_bytes(right) == G
    assert read_at(left, "A", last, G) == b"\x22" * G == read_at(right, "B", last, G)
    assert read_at(left, "A", 0, G) == b"\x21" * G

    bits = bytes(size // G // 8)  # uncompressed, 2.8 MB of base64: read and checked
    right.cli("volume", "create", "C", "--size", str(size))
    body = {
        "request": "r1", "name": "t", "source": "C", "guard": "nope", "target": left.uri("A"),
        "target_guard": "x", "granularity": G, "size": size, "point_in_time": "2026-01-01T00:00:00+00:00",
        "tracking": base64.b64encode(bits).decode(),
        "peer": {"api": left.api}, "back": {"api": "a", "target": "b"},
    }  # fmt: skip
    status, answer = peer_call(right, "POST", "/v1/peer/reversals", body)
    assert status == 409 and "not the target" in str(answer), (status, answer)
    body["tracking"] = base64.b64encode(bytes(64 << 20)).decode()  # more than any volume here
    status, answer = peer_call(right, "POST", "/v1/peer/reversals", body)
    assert status == 413 and answer["error"]["code"] == "PayloadTooLarge", (status, answer)
    assert right.sessions() == ["s"]


def test_tracking_bits_past_the_volume_are_refused(pair: tuple[Peer, Peer]) -> None:
    """129 chunks: 17 bytes of bits, 7 of them past the end. Set, the reverse is refused
    (nothing changes on R); it would inflate tracked_bytes and fail the session's next load."""
    left, right = pair
    size = 129 * G
    right.cli("volume", "create", "B", "--size", str(size), "--peer-target")
    status, answer = peer_call(right, "PUT", "/v1/peer/guards/B", {"holder": "h", "secret": "g"})
    assert status == 200, answer
    body = {
        "request": "r1", "name": "s", "source": "B", "guard": "g", "target": left.uri("A"),
        "target_guard": "t", "granularity": G, "size": size, "point_in_time": "2026-01-01T00:00:00+00:00",
        "peer": {"api": left.api}, "back": {"api": "a", "target": "b"},
    }  # fmt: skip
    for bits in (bytes(16) + b"\xff", bytes(16) + b"\x02"):
        body["tracking"] = base64.b64encode(bits).decode()
        status, answer = peer_call(right, "POST", "/v1/peer/reversals", body)
        assert status == 400 and "past the volume" in str(answer), (status, answer)
    assert right.sessions() == []
    assert json.loads(right.cli("volume", "info", "B", "--json"))["guarded_by"] == "h"


def test_opt_info_on_a_guarded_name_leaves_no_connection(pair: tuple[Peer, Peer]) -> None:
    """NBD_OPT_INFO on ``B@SECRET`` opens and closes the export: B's count of connections
    goes back to 0 (a left-over one would refuse every later check of B's clients)."""
    _, right = pair
    right.cli("volume", "create", "B", "--size", str(SIZE), "--peer-target")
    status, answer = peer_call(right, "PUT", "/v1/peer/guards/B", {"holder": "h", "secret": "sec"})
    assert status == 200, answer
    for _ in range(3):
        out = nbdsh(
            f"nbd+unix:///B@sec?socket={right.sock}",
            "h.opt_info(); print(h.get_size()); h.opt_abort()",
            "--opt-mode",
        )
        assert out.stdout.split() == [str(SIZE)], out
    assert json.loads(right.cli("volume", "info", "B", "--json"))["connections"] == 0
    status, answer = peer_call(right, "DELETE", "/v1/peer/guards/B", {"secret": "sec"})
    assert status == 200 and answer["dropped"], answer
    right.cli("volume", "remove", "B")  # no NBD connection holds it


def test_the_peer_refuses_a_session_it_could_not_copy(pair: tuple[Peer, Peer], tmp_path: Path) -> None:
    """R opens the reversed session's target (through its guard) before it takes the session:
    a target R cannot reach is refused, and the session stays L's, A writable again."""
    left, right = pair
    connect(left, right)
    gone = f"nbd+unix:///A?socket={tmp_path / 'nowhere.sock'}"
    out = left.run("session", "reverse", "s", "--reverse-target", gone)
    assert out.returncode == 1 and "cannot write its target" in out.stderr, out.stderr
    assert left.sessions() == ["s"] and right.sessions() == []
    assert json.loads(left.cli("volume", "info", "A", "--json"))["guarded_by"] is None
    qemu_io(left.uri("A"), "write -P 0x0d 0 65536")
    refused_write(right, "B")  # still L's target
    info = reverse(left)  # with the address that works, it goes through
    assert info["reversed_to"] == right.api, info
    assert update_bytes(right) == G


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("http://127.0.0.1:8080", True),
        ("https://[::1]:8443", True),
        ("http://localhost:1", True),
        ("nbd+unix:///A?socket=/run/x.sock", True),
        ("nbds://127.0.0.2:10809/A", True),
        ("https://10.0.0.5:8443", False),
        ("nbd://backup.example:10809/A", False),
    ],
)
def test_loopback_addresses_are_no_default_for_a_remote_peer(url: str, local: bool) -> None:
    from deltavol.sessions.reverse import _is_local

    assert _is_local(url) is local


def test_a_lost_peer_file_keeps_a_reverse_pending(pair: tuple[Peer, Peer], tmp_path: Path) -> None:
    """L dies after guarding A for the reverse, before R answers, and its peer file is lost:
    L cannot ask R how the reverse ended, so it stays pending (A guarded, no update) instead
    of making A writable while R may run the session. With the file back, it settles."""
    left, right = pair
    a = connect(left, right)
    apply(left, "A", *a.chunks(0x01, [2]))
    left.stop()
    left.env["DELTAVOL_TEST_FAULT"] = "reverse-before-call"
    left.start()
    out = left.run("session", "reverse", "s")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert left.proc is not None and left.proc.wait(30) == -9
    del left.env["DELTAVOL_TEST_FAULT"]
    peer_file = left.root / "peers" / "s.json"
    kept = tmp_path / "s.json"
    peer_file.rename(kept)
    left.start()
    out = left.run("session", "reverse", "s")
    assert out.returncode == 1 and str(peer_file) in out.stderr and "not settled" in out.stderr, out.stderr
    assert left.sessions() == ["s"] and right.sessions() == []
    assert str(peer_file) in left.status()["last_error"]
    refused_write(left, "A")  # still guarded: R may have taken the session
    kept.rename(peer_file)
    info = reverse(left)  # settles (R never saw the request: aborted), then reverses
    assert info["reversed_to"] == right.api, info
    assert left.sessions() == [] and right.sessions() == ["s"]
    assert update_bytes(right) == G


def test_a_guarded_volume_has_no_readers(pair: tuple[Peer, Peer]) -> None:
    """R cannot know when L's copy to B is consistent: B opens for the copier only (local
    targets refuse readers while inconsistent; a peer's is refused while guarded)."""
    left, right = pair
    connect(left, right)
    copier = json.loads(right.cli("volume", "info", "B", "--json"))["connections"]
    text = qemu_io(right.uri("B"), "read -P 0xaa 0 65536", ok=False, read_only=True)
    assert "may not have finished copying" in text and "read 65536" not in text, text
    assert json.loads(right.cli("volume", "info", "B", "--json"))["connections"] == copier
    left.cli("session", "remove", "s")  # the guard goes: B is an ordinary volume again
    qemu_io(right.uri("B"), "read -P 0xaa 0 65536", read_only=True)


@pytest.mark.parametrize(("key", "value"), [("max_rate", -1), ("every", 0), ("next_update_id", 1 << 70)])
def test_numbers_from_the_peer_are_range_checked(pair: tuple[Peer, Peer], key: str, value: int) -> None:
    left, right = pair
    right.cli("volume", "create", "B", "--size", str(SIZE), "--peer-target")
    status, answer = peer_call(right, "PUT", "/v1/peer/guards/B", {"holder": "h", "secret": "g"})
    assert status == 200, answer
    body = {
        "request": "r1", "name": "s", "source": "B", "guard": "g", "target": left.uri("A"),
        "target_guard": "t", "granularity": G, "size": SIZE, "point_in_time": "2026-01-01T00:00:00+00:00",
        "tracking": base64.b64encode(bytes(SIZE // G // 8)).decode(),
        "peer": {"api": left.api}, "back": {"api": "a", "target": "b"}, key: value,
    }  # fmt: skip
    status, answer = peer_call(right, "POST", "/v1/peer/reversals", body)
    assert status == 400 and key in str(answer), (status, answer)
    assert right.sessions() == []


def test_a_refused_copier_does_not_show_the_guard_secret(tmp_path: Path) -> None:
    """R restarted with ``--tls require`` refuses the copier's plain ``B@SECRET``: L's session
    fails saying ``B@...``; the live secret is in no log, status, event or row."""
    certs = tmp_path / "certs"
    subprocess.run(
        [str(DELTAVOL), "tls", "init", str(certs), "--host", "127.0.0.1", "--host", "localhost"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    right = Server(
        tmp_path / "R", "--api", f"127.0.0.1:{port}", "--tls", "on", "--tls-certificates", str(certs)
    )
    left = Server(tmp_path / "L")
    try:
        right.start()
        left.start()
        left.cli("volume", "create", "A", "--size", str(SIZE))
        right.cli("volume", "create", "B", "--size", str(SIZE), "--peer-target")
        left.cli(
            "session", "create", "s", "--source", "A", "--target", right.uri("B"),
            "--peer-api", f"https://127.0.0.1:{port}", "--peer-token-file", str(right.root / "peer.token"),
            "--peer-certificates", str(certs),
        )  # fmt: skip
        left.cli("session", "update", "s", "--full", "--wait")
        secret = json.loads((left.root / "peers" / "s.json").read_text())["guard"]
        right.stop()
        right.extra = ("--api", f"127.0.0.1:{port}", "--tls", "require", "--tls-certificates", str(certs))
        right.start()
        start_update(left)
        st = wait_for(left, lambda s: s["state"] == "failed", "failed", failed_ok=True)
        assert "refused export 'B@...'" in st["last_error"], st
        left.stop()  # the row and the log are complete
        shown = (
            left.log_path.read_text()
            + json.dumps(st)
            + b"".join(f.read_bytes() for f in left.root.glob("deltavol.db*")).decode("latin-1")
        )
        assert secret not in shown
    finally:
        for srv in (left, right):
            if srv.proc is not None and srv.proc.poll() is None:
                srv.stop()
            srv.log.close()

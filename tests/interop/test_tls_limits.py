"""What a server on a network must not allow before a client is authenticated, and what the
CLI must not give away: a handshake time limit and a cap on connections, settings that
would verify nobody, tokens that are not text, tokens sent to another host, and paths
that are not sockets. Each against ``deltavol serve`` as a subprocess."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import DELTAVOL, Server
from tests.interop.tls import TlsServer, free_port, qemu_io_tls, wait_port

pytestmark = pytest.mark.interop

MiB = 1 << 20
STARTTLS_OPTION = struct.pack(">QII", 0x49484156454F5054, 5, 0)


def serve(data: Path, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DELTAVOL, "serve", "--data-dir", str(data), *args], capture_output=True, text=True, timeout=timeout
    )


def until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start = time.monotonic()
    sock.settimeout(timeout)
    got = b""
    try:
        while data := sock.recv(65536):
            got += data
    except ConnectionResetError:
        pass
    return got, time.monotonic() - start


# --- settings that would verify nobody -------------------------------------------------------------
def test_tls_on_with_verify_peer_is_refused_at_start(tmp_path: Path, tls_certs: Path) -> None:
    """--tls on lets a client without a certificate in over plain text: with --tls-verify-peer
    that would read as "every client verified" while none is."""
    port = free_port()
    args = ["--nbd", f"127.0.0.1:{port}", "--tls", "on", "--tls-certificates", str(tls_certs)]
    out = serve(tmp_path / "data", *args, "--tls-verify-peer")
    assert out.returncode == 2, out
    assert "--tls require --tls-verify-peer" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_tls_without_verify_peer_on_a_network_address_warns_at_start_and_in_volume_list(
    tmp_path: Path, tls_certs: Path
) -> None:
    port = free_port()
    srv = Server(
        tmp_path / "data",
        "--nbd",
        f"0.0.0.0:{port}",
        "--tls",
        "require",
        "--tls-certificates",
        str(tls_certs),
    )
    srv.start()
    try:
        wait_port(port, srv.proc)
        out = srv.run("volume", "list")
        assert out.returncode == 0 and f"NBD on 0.0.0.0:{port} verifies no client" in out.stderr, out.stderr
        assert "verifies no client" in srv.log_path.read_text()
    finally:
        srv.stop()
    verified = Server(
        tmp_path / "data2", "--nbd", f"0.0.0.0:{free_port()}", "--tls", "require",
        "--tls-certificates", str(tls_certs), "--tls-verify-peer",
    )  # fmt: skip
    verified.start()
    try:
        assert "warning" not in verified.run("volume", "list").stderr
    finally:
        verified.stop()


# --- the API's token --------------------------------------------------------------------------------
def http(port: int, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + b"Host: localhost\r\nConnection: close\r\n\r\n")
        got, _ = until_closed(s, 10)
    return got


def test_an_authorization_that_is_not_text_is_401_without_a_traceback(tmp_path: Path) -> None:
    api = free_port()
    srv = Server(tmp_path / "data", "--api", f"127.0.0.1:{api}")
    srv.start()
    try:
        wait_port(api, srv.proc)
        token = (tmp_path / "data" / "api.token").read_text().strip()
        for head in (
            b"GET /v1/volumes HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\r\n",
            b"GET /v1/events?token=%ff%fe HTTP/1.1\r\n",
            b"GET /v1/volumes HTTP/1.1\r\nAuthorization: Bearer " + token.encode() + b"\xff\r\n",
        ):
            assert http(api, head).startswith(b"HTTP/1.1 401"), head
        ok = http(api, b"GET /v1/volumes HTTP/1.1\r\nAuthorization: Bearer " + token.encode() + b"\r\n")
        assert ok.startswith(b"HTTP/1.1 200"), ok
    finally:
        srv.stop()
    log = srv.log_path.read_text()
    assert "Traceback" not in log and "failed" not in log, log


def own_address() -> str:
    """An address of this machine that is not a loopback one (the route to a test network)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the source address
        address = str(s.getsockname()[0])
    assert not address.startswith("127."), "this machine has no address but loopback"
    return address


class Recorder:
    """A stand-in API on every address: answers ``[]`` and keeps each request's headers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.requests: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head and (data := conn.recv(4096)):
                    head += data
                self.requests.append(head.decode(errors="replace"))
                body = b'{"warnings": []}' if head.startswith(b"GET /v1/server ") else b"[]"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip

    def authorizations(self) -> list[str]:
        return [
            line for r in self.requests for line in r.splitlines() if line.lower().startswith("authorization")
        ]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.sock.close()


def test_the_cli_gives_the_local_token_to_the_local_server_only(tmp_path: Path, recorder: Recorder) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "api.token").write_text("local-secret\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVOL_")}
    env["DELTAVOL_DATA_DIR"] = str(data)

    def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [DELTAVOL, "--api-url", url, *args, "volume", "list"]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)

    elsewhere = f"http://{own_address()}:{recorder.port}"
    out = cli(elsewhere)  # another host: the data dir's token stays here
    assert out.returncode == 0, out.stderr
    assert recorder.requests and recorder.authorizations() == []
    asked = len(recorder.requests)
    out = cli(elsewhere, "--token", "given")  # a token in plain text across a network: refused
    assert out.returncode == 2 and "not sending the API token in plain text" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(recorder.requests) == asked
    out = cli(f"http://127.0.0.1:{recorder.port}")  # this host's own server gets its token
    assert out.returncode == 0, out.stderr
    assert set(recorder.authorizations()) == {"Authorization: Bearer local-secret"}
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    out = cli(f"http://localhost:{recorder.port}", "--token-file", str(token_file))
    assert out.returncode == 0 and recorder.authorizations()[-1] == "Authorization: Bearer from-a-file"


# --- before a client is in transmission --------------------------------------------------------------
@pytest.fixture
def limited(tmp_path: Path, tls_certs: Path) -> Iterator[TlsServer]:
    srv = TlsServer(
        tmp_path / "data", "--tls", "require", "--tls-certificates", str(tls_certs),
        # qemu-io's own handshake must end well within the limit, however loaded the machine
        "--handshake-limit", "5", "--max-connections", "4",
    )  # fmt: skip
    srv.start()
    try:
        srv.cli("volume", "create", "v", "--size", str(MiB))
        yield srv
    finally:
        srv.stop()
        srv.log.close()
    assert "Traceback" not in srv.log_path.read_text()


def test_clients_still_negotiating_after_the_handshake_limit_are_closed(
    limited: TlsServer, tls_certs: Path
) -> None:
    """Silent, stuck after the client flags, stuck after STARTTLS: each closed after the
    limit; a client that reached transmission stays as long as it likes."""
    socks = [socket.create_connection(("127.0.0.1", limited.port)) for _ in range(3)]
    socks[1].sendall(struct.pack(">I", 3))
    socks[2].sendall(struct.pack(">I", 3) + STARTTLS_OPTION)
    done = threading.Event()
    result: list[str] = []

    def working() -> None:  # in transmission well before the limit, then idle past it
        result.append(qemu_io_tls(tls_certs, limited.port, "v", "write -P 0x5a 0 4k", "sleep 6000",
                                  "read -P 0x5a 0 4k"))  # fmt: skip
        done.set()

    thread = threading.Thread(target=working)
    thread.start()
    for s in socks:
        got, took = until_closed(s, 20)
        s.close()
        assert got.startswith(b"NBDMAGIC") and took < 15, (got, took)
    thread.join(60)
    assert done.is_set() and "read 4096/4096" in result[0], result
    assert limited.log_path.read_text().count("--handshake-limit") == 3
    assert limited.image("v")[:4096] == b"\x5a" * 4096


def test_connections_beyond_the_cap_are_closed_at_accept(limited: TlsServer) -> None:
    held = [socket.create_connection(("127.0.0.1", limited.port)) for _ in range(4)]
    for s in held:
        assert s.recv(8) == b"NBDMAGIC"
    extra = socket.create_connection(("127.0.0.1", limited.port))
    got, _ = until_closed(extra, 10)
    extra.close()
    assert got == b""  # not even a greeting
    assert "--max-connections" in limited.log_path.read_text()
    for s in held:
        s.close()
    deadline = time.monotonic() + 20  # the server hears the closes in its own time
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", limited.port)) as again:
            again.settimeout(10)
            if again.recv(8) == b"NBDMAGIC":
                return
    raise AssertionError("no connection accepted after the others closed")


# --- paths that are not sockets --------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--nbd-socket", "--api-socket"])
def test_a_path_that_is_not_a_socket_is_not_removed(tmp_path: Path, flag: str) -> None:
    victim = tmp_path / "precious"
    victim.write_bytes(b"not a socket")
    out = serve(
        tmp_path / "data",
        flag,
        str(victim),
        *(["--nbd-socket", str(tmp_path / "n.sock")] if flag == "--api-socket" else []),
    )
    assert out.returncode == 1 and "not a socket" in out.stderr and str(victim) in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert victim.read_bytes() == b"not a socket"

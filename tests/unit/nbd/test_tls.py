"""NBD over TLS: the asyncio listener, in this process, driven by real peers.

The listener runs on its own event loop in a thread (the stock loop and uvloop, which
``deltavol serve`` uses), serving one 8 MiB volume from a file. qemu-io, qemu-img,
nbdinfo and nbdcopy reach it with X.509 certificates; raw sockets break the rules. Every
refusal is checked to change no byte of the volume and to leave the server serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from deltavol.backend.export import Export
from deltavol.backend.file import FileBackend
from deltavol.errors import NotFound
from deltavol.nbd.constants import TlsMode
from deltavol.server.nbd_client import NbdClient, NbdConnectionError
from deltavol.server.nbd_listener import NbdListener
from tests.certs import client_context, make_certs, server_context
from tests.harness import require
from tests.protocol.wire import client_flags, info_data, option

pytestmark = pytest.mark.interop

SIZE = 8 << 20
MiB = 1 << 20
NBDMAGIC, IHAVEOPT, OPTION_REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x0003E889045565A9
OPT_LIST, OPT_STARTTLS, OPT_GO, OPT_ABORT = 3, 5, 7, 2
REP_ACK, REP_SERVER, ERR_INVALID, ERR_TLS_REQD = 1, 2, 2**31 + 3, 2**31 + 5


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Directory:
    """One volume, ``vol``; counts what the connections opened and gave back."""

    def __init__(self, image: Path) -> None:
        self.export = Export(FileBackend("vol", str(image)))
        self.open = 0

    def export_names(self) -> list[str]:
        return ["vol"]

    def open_export(self, name: str) -> Export:
        if name != "vol":
            raise NotFound(kind="volume", name=name)
        self.open += 1
        return self.export

    def close_export(self, name: str) -> None:
        self.open -= 1


class Served:
    """An NbdListener on a unix socket and on 127.0.0.1, its loop in a thread."""

    def __init__(
        self, tmp: Path, mode: TlsMode, context: Callable[[], ssl.SSLContext] | None, loop_kind: str
    ) -> None:
        self.image = tmp / "vol.img"
        with open(self.image, "wb") as f:
            f.truncate(SIZE)
        self.sock = tmp / "nbd.sock"
        self.directory = Directory(self.image)
        self.mode, self.context, self.loop_kind = mode, context, loop_kind
        self.contexts_made = 0
        self.port = 0
        self.log = _Records()
        logging.getLogger("deltavol.nbd").addHandler(self.log)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._started.wait(20), "listener did not start"
        if self._error is not None:
            raise self._error

    def _make_context(self) -> ssl.SSLContext:
        assert self.context is not None
        self.contexts_made += 1
        return self.context()

    def _run(self) -> None:
        self.loop = uvloop.new_event_loop() if self.loop_kind == "uvloop" else asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self.stop = asyncio.Event()
        factory = self._make_context if self.context is not None else None
        try:
            self.listener = NbdListener(self.directory, tls_mode=self.mode, tls_context=factory)
            await self.listener.listen_unix(str(self.sock))
            await self.listener.listen_tcp("127.0.0.1", 0)
            self.port = self.listener.servers[-1].sockets[0].getsockname()[1]
        except BaseException as exc:
            self._error = exc
            self._started.set()
            raise
        self._started.set()
        await self.stop.wait()
        await self.listener.shutdown(5)

    def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the listener's loop (its state belongs to that thread)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def idle(self) -> bool:
        """No connection is left, and every export opened was given back."""
        return bool(self.call(lambda: not self.listener.connections and self.directory.open == 0))

    def handshakes_failed(self) -> int:
        """TLS handshakes the server logged as failed."""
        return sum("TLS handshake failed" in r.getMessage() for r in self.log.records)

    def wait_idle(self) -> None:
        """Connections close a moment after their peer: poll the listener's own state."""
        for _ in range(200):
            if self.idle():
                return
            threading.Event().wait(0.05)
        raise AssertionError(f"connections left: {self.call(lambda: len(self.listener.connections))}")

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(20)
        logging.getLogger("deltavol.nbd").removeHandler(self.log)

    def sha(self) -> str:
        return hashlib.sha256(self.image.read_bytes()).hexdigest()

    def unix_uri(self, certs: Path | None) -> str:
        if certs is None:
            return f"nbd+unix:///vol?socket={self.sock}"
        return f"nbds+unix:///vol?socket={self.sock}&tls-certificates={certs}"

    def tcp_uri(self, certs: Path | None, host: str = "127.0.0.1") -> str:
        if certs is None:
            return f"nbd://{host}:{self.port}/vol"
        return f"nbds://{host}:{self.port}/vol?tls-certificates={certs}"


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def serve(tmp_path: Path, tls_certs: Path, loop_kind: str) -> Iterator[Callable[..., Served]]:
    """``serve(mode, verify_peer=False, context=None)``: a listener with the test CA's
    server certificate (or ``context``), stopped after the test."""
    started: list[Served] = []

    def start(
        mode: TlsMode, *, verify_peer: bool = False, context: Callable[[], ssl.SSLContext] | None = None
    ) -> Served:
        if context is None and mode is not TlsMode.OFF:
            context = lambda: server_context(tls_certs, verify_peer=verify_peer)  # noqa: E731
        served = Served(tmp_path, mode, context, loop_kind)
        started.append(served)
        return served

    yield start
    for served in started:
        served.close()


# --- peers -------------------------------------------------------------------------------------
def run(*cmd: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    require(str(cmd[0]))
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)
    if ok:
        assert out.returncode == 0, f"{cmd} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def qemu_opts(served: Served, certs: Path | None, *, tcp: bool = False) -> tuple[list[str], str]:
    """(--object arguments, --image-opts string) for qemu-io / qemu-img."""
    if tcp:
        server = f"server.type=inet,server.host=127.0.0.1,server.port={served.port}"
    else:
        server = f"server.type=unix,server.path={served.sock},tls-hostname=localhost"
    if certs is None:
        return [], f"driver=nbd,{server},export=vol"
    obj = ["--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client"]
    return obj, f"driver=nbd,{server},export=vol,tls-creds=tls0"


def qemu_io(served: Served, certs: Path | None, *commands: str, ok: bool = True, tcp: bool = False) -> str:
    obj, opts = qemu_opts(served, certs, tcp=tcp)
    args: list[str | Path] = ["qemu-io", *obj, "--image-opts"]
    for c in commands:
        args += ["-c", c]
    out = run(*args, opts, ok=False)
    text = out.stdout + out.stderr
    if ok:
        assert out.returncode == 0 and "failed" not in text and "error" not in text.lower(), text
    return text


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- real clients over TLS ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE])
def test_qemu_io_writes_and_reads_over_tls(
    serve: Callable[..., Served], tls_certs: Path, mode: TlsMode
) -> None:
    served = serve(mode)
    qemu_io(served, tls_certs, "write -P 0xab 0 1M", "write -P 0x5c 3M 64k", "flush")
    qemu_io(served, tls_certs, "read -P 0xab 0 1M", "read -P 0x5c 3M 64k", "read -P 0 1M 2M", tcp=True)
    data = served.image.read_bytes()
    assert data[:MiB] == b"\xab" * MiB and data[3 * MiB : 3 * MiB + 65536] == b"\x5c" * 65536
    assert data[MiB : 3 * MiB] == bytes(2 * MiB)
    served.wait_idle()


def test_qemu_img_converts_to_and_from_an_export_over_tls(
    serve: Callable[..., Served], tls_certs: Path, tmp_path: Path
) -> None:
    served = serve(TlsMode.REQUIRE)
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(3 * MiB) + bytes(2 * MiB) + os.urandom(3 * MiB))
    obj, opts = qemu_opts(served, tls_certs, tcp=True)
    run("qemu-img", "convert", *obj, "-n", "-f", "raw", src, "--target-image-opts", opts)
    assert served.sha() == sha_of(src)
    back = tmp_path / "back.img"
    run("qemu-img", "convert", *obj, "--image-opts", opts, "-O", "raw", back)
    assert sha_of(back) == sha_of(src)


def test_nbdinfo_sees_the_export_and_its_map_over_tls(serve: Callable[..., Served], tls_certs: Path) -> None:
    served = serve(TlsMode.REQUIRE)
    with open(served.image, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"\x01" * MiB)
    out = run("nbdinfo", served.unix_uri(tls_certs)).stdout
    assert f"export-size: {SIZE}" in out and "newstyle-fixed with TLS" in out
    mapped = run("nbdinfo", "--map", served.tcp_uri(tls_certs)).stdout
    data_ranges = [line.split() for line in mapped.splitlines() if line.split()[-1] == "data"]
    assert [int(r[0]) for r in data_ranges] == [2 * MiB], mapped  # block status works inside TLS


def test_nbdcopy_copies_through_tls_both_ways(
    serve: Callable[..., Served], tls_certs: Path, tmp_path: Path
) -> None:
    served = serve(TlsMode.ON)
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(SIZE))
    run("nbdcopy", src, served.tcp_uri(tls_certs))
    assert served.sha() == sha_of(src)
    back = tmp_path / "back.img"
    run("nbdcopy", served.unix_uri(tls_certs), back)
    assert sha_of(back) == sha_of(src)


def test_on_serves_plain_clients_too(serve: Callable[..., Served]) -> None:
    served = serve(TlsMode.ON)
    qemu_io(served, None, "write -P 0x11 0 64k")
    assert served.image.read_bytes()[:65536] == b"\x11" * 65536
    assert served.contexts_made == 0


async def test_our_client_over_tls_with_structured_replies_and_block_status(
    serve: Callable[..., Served], tls_certs: Path
) -> None:
    served = serve(TlsMode.REQUIRE, verify_peer=True)
    client = await NbdClient.connect(
        served.unix_uri(tls_certs), tls_context=client_context(tls_certs), block_status=True
    )
    try:
        assert client.size == SIZE and client.can_block_status
        payload = os.urandom(3 * MiB)
        await client.pwrite(MiB, payload)
        await client.flush()
        assert await client.pread(MiB, 3 * MiB) == payload
        extents = await client.block_status(0, SIZE)
        assert sum(length for length, _ in extents) <= SIZE and extents
    finally:
        await client.close()
    assert served.image.read_bytes()[MiB : 4 * MiB] == payload


async def test_our_tls_client_hands_what_it_encrypts_to_the_socket_at_once(
    serve: Callable[..., Served], tls_certs: Path
) -> None:
    """Many writes in flight over TLS: each is encrypted once and queued on the socket, not
    held encrypted in the TLS layer's memory buffer until the socket drains (which copies
    and grows it again and again), and every byte lands."""
    served = serve(TlsMode.REQUIRE)
    client = await NbdClient.connect(served.unix_uri(tls_certs), tls_context=client_context(tls_certs))
    step = 256 * 1024
    blocks = [os.urandom(step) for _ in range(6 * MiB // step)]
    try:
        writes = [asyncio.ensure_future(client.pwrite(i * step, b)) for i, b in enumerate(blocks)]
        await asyncio.sleep(0)  # every write submitted, none answered yet
        transport = client._transport
        assert transport is not None
        held = transport.get_write_buffer_size()
        await asyncio.gather(*writes)
        await client.flush()
        assert await client.pread(0, 6 * MiB) == b"".join(blocks)
    finally:
        await client.close()
    assert held < MiB, f"{held} bytes held in the TLS layer"
    assert served.image.read_bytes()[: 6 * MiB] == b"".join(blocks)


def test_each_starttls_makes_a_fresh_context_so_new_certificates_need_no_restart(
    serve: Callable[..., Served], tmp_path: Path
) -> None:
    live = make_certs(tmp_path / "live")
    served = serve(TlsMode.REQUIRE, context=lambda: server_context(live))
    qemu_io(served, live, "write -P 0x21 0 4k")
    renewed = make_certs(tmp_path / "renewed", ca_name="renewed CA")
    old_client = tmp_path / "old-client"
    shutil.copytree(live, old_client)
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        shutil.copy(renewed / name, live / name)
    qemu_io(served, renewed, "read -P 0x21 0 4k")  # the new CA's clients are served at once
    text = qemu_io(served, old_client, "read -P 0x21 0 4k", ok=False)
    assert "certificate" in text.lower(), text  # the old CA no longer vouches for the server
    assert served.contexts_made == 3
    served.wait_idle()


def test_a_context_that_cannot_be_made_fails_that_client_only(
    serve: Callable[..., Served], tls_certs: Path, tmp_path: Path
) -> None:
    live = tmp_path / "live"
    served = serve(TlsMode.REQUIRE, context=lambda: server_context(live))  # no such dir yet
    text = qemu_io(served, tls_certs, "write -P 0x55 0 4k", ok=False)
    assert "wrote" not in text, text
    assert any("no TLS context" in r.getMessage() for r in served.log.records)
    shutil.copytree(tls_certs, live)
    qemu_io(served, tls_certs, "write -P 0x55 0 4k", "read -P 0x55 0 4k")
    served.wait_idle()


# --- refusals: nothing changes, the server goes on ---------------------------------------------------
def test_plain_clients_are_refused_by_require_and_change_nothing(
    serve: Callable[..., Served], tls_certs: Path, tmp_path: Path
) -> None:
    served = serve(TlsMode.REQUIRE)
    before = served.sha()
    text = qemu_io(served, None, "write -P 0xee 0 1M", ok=False)
    assert "TLS" in text, text
    out = run("nbdinfo", served.unix_uri(None), ok=False)
    assert out.returncode != 0 and "opt_go" in out.stderr, out.stderr  # libnbd: ENOTSUP
    src = tmp_path / "src.img"
    src.write_bytes(b"\xee" * SIZE)
    out = run("nbdcopy", src, served.tcp_uri(None), ok=False)
    assert out.returncode != 0 and "requires TLS" in out.stderr, out.stderr
    assert served.sha() == before
    qemu_io(served, tls_certs, "read -P 0 0 1M")
    served.wait_idle()


async def test_our_tls_client_never_falls_back_to_plain(
    serve: Callable[..., Served], tls_certs: Path
) -> None:
    served = serve(TlsMode.OFF)
    with pytest.raises(NbdConnectionError, match="refused TLS"):
        await NbdClient.connect(served.unix_uri(tls_certs), tls_context=client_context(tls_certs))
    served.wait_idle()


async def test_our_plain_client_is_told_tls_is_required(serve: Callable[..., Served]) -> None:
    served = serve(TlsMode.REQUIRE)
    with pytest.raises(NbdConnectionError, match="TLS is required"):
        await NbdClient.connect(served.unix_uri(None))


async def test_our_client_refuses_a_server_it_cannot_verify(
    serve: Callable[..., Served], tls_certs: Path, tmp_path: Path
) -> None:
    served = serve(TlsMode.REQUIRE)
    other = make_certs(tmp_path / "other", ca_name="another CA")
    with pytest.raises(NbdConnectionError, match="certificate not accepted"):
        await NbdClient.connect(served.tcp_uri(other), tls_context=client_context(other))
    with pytest.raises(NbdConnectionError, match="certificate not accepted"):  # host name not in it
        await NbdClient.connect(
            served.tcp_uri(tls_certs), tls_context=client_context(tls_certs), server_hostname="db.example"
        )
    client = await NbdClient.connect(served.tcp_uri(tls_certs), tls_context=client_context(tls_certs))
    await client.close()
    served.wait_idle()


def test_verify_peer_refuses_clients_without_a_certificate_of_the_ca(
    serve: Callable[..., Served], tls_certs: Path, tmp_path: Path
) -> None:
    served = serve(TlsMode.REQUIRE, verify_peer=True)
    before = served.sha()
    other = make_certs(tmp_path / "other", ca_name="another CA")
    foreign = tmp_path / "foreign"  # presents a certificate of another CA
    foreign.mkdir()  # (qemu checks its own certificate first: it trusts both CAs)
    cas = (tls_certs / "ca-cert.pem").read_bytes() + (other / "ca-cert.pem").read_bytes()
    (foreign / "ca-cert.pem").write_bytes(cas)
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(other / name, foreign / name)
    anonymous = tmp_path / "anonymous"  # trusts our CA, presents nothing
    anonymous.mkdir()
    shutil.copy(tls_certs / "ca-cert.pem", anonymous / "ca-cert.pem")
    for certs in (foreign, anonymous):
        text = qemu_io(served, certs, "write -P 0xee 0 1M", ok=False)
        assert "wrote" not in text and "failed validation" not in text, text
    assert served.sha() == before
    assert served.handshakes_failed() == 2
    qemu_io(served, tls_certs, "write -P 0x33 0 4k", "read -P 0x33 0 4k")
    served.wait_idle()


# --- raw sockets: the rules of STARTTLS on a real connection ----------------------------------------
class Raw:
    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | ssl.SSLSocket = sock

    @classmethod
    def connect(cls, served: Served) -> Raw:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(served.sock))
        raw = cls(s)
        magic, opt_magic, _ = struct.unpack(">QQH", raw.recv(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        raw.send(client_flags())
        return raw

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            more = self.sock.recv(n - len(buf))
            if not more:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += more
        return buf

    def reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.recv(20))
        assert magic == OPTION_REPLY_MAGIC
        return opt, rep, self.recv(length)

    def closed(self) -> bool:
        """The server closed (or reset) the connection without a further byte."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def drained_to_close(self) -> bool:
        """Whatever the server still sends is read; then it must close."""
        try:
            while self.sock.recv(65536):
                pass
        except (ConnectionError, ssl.SSLError):
            pass
        return True

    def starttls(self, certs: Path) -> None:
        self.send(option(OPT_STARTTLS))
        assert self.reply() == (OPT_STARTTLS, REP_ACK, b"")
        assert isinstance(self.sock, socket.socket)
        self.sock = client_context(certs).wrap_socket(self.sock, server_hostname="localhost")


def test_require_answers_options_before_starttls_with_tls_reqd_over_a_socket(
    serve: Callable[..., Served], tls_certs: Path
) -> None:
    served = serve(TlsMode.REQUIRE)
    raw = Raw.connect(served)
    raw.send(option(OPT_LIST) + option(OPT_GO, info_data("vol")))
    assert raw.reply()[:2] == (OPT_LIST, ERR_TLS_REQD)
    assert raw.reply()[:2] == (OPT_GO, ERR_TLS_REQD)
    assert served.call(lambda: served.directory.open) == 0  # nothing was opened in plain text
    raw.starttls(tls_certs)
    raw.send(option(OPT_LIST))
    assert raw.reply()[:2] == (OPT_LIST, REP_SERVER)
    assert raw.reply()[:2] == (OPT_LIST, REP_ACK)
    raw.send(option(OPT_STARTTLS))  # a second one, inside TLS
    assert raw.reply()[:2] == (OPT_STARTTLS, ERR_INVALID)
    raw.send(option(OPT_GO, info_data("vol")))
    assert raw.reply()[:2] == (OPT_GO, 3)  # NBD_REP_INFO: the connection goes on
    raw.sock.close()
    served.wait_idle()


def test_export_name_before_tls_closes_and_the_server_goes_on(
    serve: Callable[..., Served], tls_certs: Path
) -> None:
    served = serve(TlsMode.REQUIRE)
    raw = Raw.connect(served)
    raw.send(option(1, b"vol"))  # NBD_OPT_EXPORT_NAME
    assert raw.closed()
    qemu_io(served, tls_certs, "read -P 0 0 4k")
    served.wait_idle()


@pytest.mark.parametrize(
    "after_ack",
    [
        pytest.param(b"\x00" * 64, id="zeroes"),
        pytest.param(option(OPT_LIST), id="plain-option"),
        pytest.param(b"\x16\x03\x01\x00\x05hello" + os.urandom(200), id="broken-client-hello"),
    ],
)
def test_garbage_instead_of_a_handshake_ends_that_connection_only(
    serve: Callable[..., Served], tls_certs: Path, after_ack: bytes
) -> None:
    served = serve(TlsMode.REQUIRE)
    raw = Raw.connect(served)
    raw.send(option(OPT_STARTTLS))
    assert raw.reply() == (OPT_STARTTLS, REP_ACK, b"")
    raw.send(after_ack)
    assert raw.closed()
    qemu_io(served, tls_certs, "write -P 0x44 0 4k", "read -P 0x44 0 4k")
    served.wait_idle()


def test_garbage_inside_the_handshake_ends_that_connection_only(
    serve: Callable[..., Served], tls_certs: Path
) -> None:
    served = serve(TlsMode.REQUIRE)
    raw = Raw.connect(served)
    raw.send(option(OPT_STARTTLS))
    assert raw.reply() == (OPT_STARTTLS, REP_ACK, b"")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(tls_certs).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    raw.send(outgoing.read())  # a real ClientHello
    raw.recv(5)  # the server answers: its handshake is under way
    raw.send(b"\x16\x03\x03\x00\x40" + os.urandom(64))  # then a record of noise
    assert raw.drained_to_close()  # a timeout (socket.timeout) would fail the test
    qemu_io(served, tls_certs, "read -P 0 0 4k")
    served.wait_idle()


def test_bytes_sent_along_with_starttls_close_the_connection(serve: Callable[..., Served]) -> None:
    served = serve(TlsMode.ON)
    raw = Raw.connect(served)
    raw.send(option(OPT_STARTTLS) + option(OPT_LIST))  # one write: no ACK was awaited
    assert raw.closed()  # and no ACK was sent
    served.wait_idle()


def test_abort_before_tls_is_acknowledged(serve: Callable[..., Served]) -> None:
    served = serve(TlsMode.REQUIRE)
    raw = Raw.connect(served)
    raw.send(option(OPT_ABORT))
    assert raw.reply()[:2] == (OPT_ABORT, REP_ACK)
    assert raw.closed()
    served.wait_idle()


async def test_a_client_refused_after_the_handshake_closes_its_tls_transport_cleanly(
    serve: Callable[..., Served], tls_certs: Path
) -> None:
    """With TLS 1.3 a server refuses a client's certificate after the client's side of the
    handshake ended: the client fails that connect, and closes its TLS transport once,
    raising nothing in a loop callback."""
    served = serve(TlsMode.REQUIRE, verify_peer=True)
    loop_errors: list[object] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    for uri in (served.tcp_uri(tls_certs, host="localhost"), served.unix_uri(tls_certs)):
        with pytest.raises(NbdConnectionError) as refused:
            await NbdClient.connect(
                uri, tls_context=client_context(tls_certs, client_cert=False), server_hostname="localhost"
            )
        assert "closed the connection" in str(refused.value) or "certificate" in str(refused.value)
        await asyncio.sleep(0.2)  # let the loop run the transport's callbacks
    assert loop_errors == []
    served.wait_idle()

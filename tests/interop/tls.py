"""TLS peers for the tests: deltavol serving over TLS on TCP, qemu's and libnbd's clients
with certificates, and qemu-nbd / nbdkit serving a TLS target."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.harness import Server, free_port, require
from tests.interop.peers import run


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


class TlsServer(Server):
    """``deltavol serve`` with NBD on a TCP port of 127.0.0.1 too."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.port = free_port()
        super().__init__(root, "--nbd", f"127.0.0.1:{self.port}", *extra)

    def start(self) -> None:
        super().start()
        wait_port(self.port, self.proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the unix socket is the last to listen
            if self.sock.exists():
                return
            time.sleep(0.025)
        raise AssertionError("NBD socket never appeared")

    def nbds(self, name: str, certs: Path, host: str = "localhost") -> str:
        return f"nbds://{host}:{self.port}/{name}?tls-certificates={certs}"


def client_dir(where: Path, ca_from: Path, client_from: Path | None) -> Path:
    """A client's certificate dir: the CA of ``ca_from``, the client certificate of
    ``client_from`` (none when None)."""
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca_from / "ca-cert.pem", where / "ca-cert.pem")
    if client_from is not None:
        for name in ("client-cert.pem", "client-key.pem"):
            shutil.copy(client_from / name, where / name)
    return where


def tls_object(certs: Path, endpoint: str = "client") -> str:
    return f"tls-creds-x509,id=tls0,dir={certs},endpoint={endpoint}"


def image_opts(port: int, export: str) -> str:
    return f"driver=nbd,host=localhost,port={port},export={export},tls-creds=tls0"


def qemu_io_tls(certs: Path, port: int, export: str, *commands: str, ok: bool = True) -> str:
    """qemu-io on a TLS export over TCP; with ok, every command must succeed (patterns verified)."""
    require("qemu-io")
    args = [a for c in commands for a in ("-c", c)]
    out = run(
        "qemu-io", "--object", tls_object(certs), "--image-opts", *args, image_opts(port, export), ok=False
    )
    text = out.stdout + out.stderr
    if ok:
        assert out.returncode == 0 and "failed" not in text and "error" not in text.lower(), text
    else:
        assert out.returncode != 0 or "failed" in text, text
    return text


@contextmanager
def target(cmd: list[str], port: int | None = None, sock: Path | None = None) -> Iterator[None]:
    """A target server until the block ends (killed: it holds nothing to flush)."""
    if sock is not None:
        sock.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        if port is not None:
            wait_port(port, proc)
        while sock is not None and not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
            time.sleep(0.025)
        yield
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def qemu_nbd_tls(image: Path, certs: Path, port: int) -> list[str]:
    require("qemu-nbd")
    return [
        "qemu-nbd", "-f", "raw", "--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=server",
        "--tls-creds", "tls0", "-b", "127.0.0.1", "-p", str(port), "-x", "t", "--persistent",
        "--shared=8", str(image),
    ]  # fmt: skip


def nbdkit_tls(certs: Path, size: int, port: int | None = None, sock: Path | None = None) -> list[str]:
    require("nbdkit")
    where = ["-U", str(sock)] if sock is not None else ["-i", "127.0.0.1", "-p", str(port)]
    return [
        "nbdkit", "-f", "--tls=require", f"--tls-certificates={certs}", *where, "-e", "t",
        "memory", str(size),
    ]  # fmt: skip


def nbdcopy_sha(uri: str, tmp: Path) -> str:
    """sha256 of an export's bytes, read with nbdcopy."""
    from tests.interop.peers import sha

    require("nbdcopy")
    out = tmp / "dump.img"
    out.unlink(missing_ok=True)
    run("nbdcopy", uri, str(out))
    return sha(out)

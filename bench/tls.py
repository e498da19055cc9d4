"""Figures over TLS: fio through deltavol and through qemu-nbd, both with TLS on TCP to
127.0.0.1 and the same certificates and file; a full update to a TLS target (qemu-nbd)
against nbdcopy to the same target.

fio's NBD engine (libnbd) may not read ``?tls-certificates=DIR`` from a URI (local file
access is off in it); libnbd then looks in ``$HOME/.pki/libnbd``, so fio runs with HOME
set to a directory whose ``.pki/libnbd`` holds the certificates.

The full update and nbdcopy copy the same source file, each reading it directly (deltavol
imports it as a volume, nbdcopy is given its path), to the same fresh target file behind a
fresh qemu-nbd, through the same URI and certificates; each flushes at the end. Both run
at their defaults: qemu-nbd offers multi-conn, so each opens 4 connections with 256 KiB
requests (nbdcopy keeps 64 in flight on each, deltavol 64 in all). deltavol's time also
holds making and removing the session over the API, nbdcopy's its process start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.figures import MiB, Row, Settings, fill, fio_image, fresh, timed
from bench.fio import fio
from bench.peers import _stop, deltavol
from deltavol import tls

JOBS = [
    ("seq 1 MiB read, iodepth 16", "read", "1m", 16, "MiB/s"),
    ("seq 1 MiB write, iodepth 16", "write", "1m", 16, "MiB/s"),
    ("4 KiB random read, iodepth 32", "randread", "4k", 32, "IOPS"),
    ("4 KiB random write, iodepth 32", "randwrite", "4k", 32, "IOPS"),
]
GROUP = "TLS (TCP to 127.0.0.1, certificates verified)"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    for _ in range(400):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.025)
    raise RuntimeError(f"nothing listens on port {port}")


@contextmanager
def _home(home: Path) -> Iterator[None]:
    """libnbd (fio's engine) finds its certificates in $HOME/.pki/libnbd."""
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        yield
    finally:
        if old is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = old


@contextmanager
def qemu_nbd_tls(image: Path, certs: Path, export: str = "bench") -> Iterator[int]:
    """qemu-nbd as the data-path figures run it, with TLS on a TCP port; like deltavol here it
    does not ask for clients' certificates (qemu-nbd would by default)."""
    port = _port()
    cmd = [
        "qemu-nbd", "-f", "raw", "-x", export, "-b", "127.0.0.1", "-p", str(port), "--persistent",
        "--shared=16", "--cache=writeback", "--aio=threads",
        "--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=server,verify-peer=off",
        "--tls-creds", "tls0", str(image),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        yield port
    finally:
        _stop(proc)


def tls_figures(s: Settings) -> Iterator[Row]:
    home = s.work / "tls-home"
    certs = home / ".pki" / "libnbd"
    tls.init(certs, ["localhost"])
    image = fio_image(s)
    port = _port()
    tls_args = ("--nbd", f"127.0.0.1:{port}", "--tls", "require", "--tls-certificates", str(certs))
    with deltavol(s.work / "dv-tls", *tls_args) as dv, _home(home):
        assert dv.proc is not None
        _wait_port(port, dv.proc)
        dv.volume("bench", path=image)
        for name, rw, bs, depth, unit in JOBS:

            def ours() -> float:
                return fio(f"nbds://localhost:{port}/bench", rw, bs, depth, s.runtime).figure(unit)  # noqa: B023

            def theirs() -> float:
                with qemu_nbd_tls(image, certs) as qport:
                    return fio(f"nbds://localhost:{qport}/bench", rw, bs, depth, s.runtime).figure(unit)  # noqa: B023

            a, b, c, d = ours(), theirs(), theirs(), ours()  # the better of two, as data_path
            yield Row(GROUP, f"{name}, over TLS", unit, max(a, d), "qemu-nbd TLS", max(b, c), (">=", 1.0))

        size = s.copy_size
        source = s.work / "copy-src.img"
        if not source.exists() or source.stat().st_size != size:
            fill(source, size, data_every=32 * MiB)
        dv.volume("src", path=source)
        remote = s.work / "copy-tls.img"

        def to_target(copy: Callable[[str], object]) -> float:
            fresh(remote, size)
            os.sync()
            with qemu_nbd_tls(remote, certs) as qport:
                return timed(lambda: copy(f"nbds://localhost:{qport}/bench?tls-certificates={certs}"))

        def update(uri: str) -> None:
            dv.session("tls", "src", uri)
            dv.update("tls", full=True)
            dv.wait("tls")
            dv.call("DELETE", "/v1/sessions/tls")

        def nbdcopy(uri: str) -> None:
            subprocess.run(["nbdcopy", "--flush", str(source), uri], check=True)

        a, b, c, d = to_target(update), to_target(nbdcopy), to_target(nbdcopy), to_target(update)
        remote.unlink()
        yield Row(GROUP, f"full update, {size / 2**30:g} GiB half data, to qemu-nbd with TLS", "s",
                  min(a, d), "nbdcopy", min(b, c), ("<=", 1.0))  # fmt: skip

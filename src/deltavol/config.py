"""Server configuration, normalised once at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deltavol.errors import UsageError

DEFAULT_NBD = ("127.0.0.1", 10809)


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise UsageError(msg=f"invalid address {text!r}: expected HOST:PORT ([ADDRESS]:PORT for IPv6)")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(msg=f"invalid address {text!r}: expected HOST:PORT")
    return host, int(port)


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    nbd_tcp: tuple[str, int] | None = DEFAULT_NBD
    nbd_socket: str | None = None
    api_socket: str | None = None  # default: data_dir/api.sock
    api_tcp: tuple[str, int] | None = None
    drain_timeout: float = 30.0
    save_limit: int = 1 << 30  # bytes of copy-on-first-write save area per session update
    hot_set: int = 1 << 30  # bytes of a source a power loss may copy again per session (its hot regions)
    retry_limit: int = 5  # automatic resumes of an update whose target failed
    retry_backoff: float = 2.0  # seconds before the first retry; doubles each time
    target_timeout: float = 30.0  # seconds a remote target may take to connect, or stay silent
    nbd_metrics: bool = True  # count NBD requests per export (serve --no-nbd-metrics: off)
    tls: str = "off"  # NBD TLS: off, on (offered) or require; the TCP API is HTTPS unless off
    tls_certificates: Path | None = None  # ca-cert.pem, server-cert.pem, server-key.pem, ...
    tls_verify_peer: bool = False  # clients must present a certificate the CA signed
    handshake_limit: float = 10.0  # seconds a connection may take to reach transmission (as qemu-nbd)
    max_connections: int = 1000  # per listener; more are closed at accept
    warnings: tuple[str, ...] = ()  # said at start and by `volume list` (plain text on a network)

"""``deltavol serve``."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from deltavol.bitmap.persist import HOT_REGION
from deltavol.cli import cli
from deltavol.config import DEFAULT_NBD, ServerConfig, parse_host_port
from deltavol.errors import UsageError
from deltavol.store.datadir import resolve_data_dir
from deltavol.tls import listen_policy
from deltavol.units import parse_size


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        line = f"{when} {record.levelname.lower()} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def parse_hot_set(text: str) -> int:
    size = parse_size(text)
    if size < HOT_REGION:
        raise UsageError(msg=f"invalid hot set {text!r}: at least {HOT_REGION >> 20}MiB (one region)")
    return size


@cli.command()
@click.option(
    "--data-dir",
    "serve_data_dir",
    help="Data dir to own (default: $DELTAVOL_DATA_DIR, else $XDG_DATA_HOME/deltavol).",
)
@click.option("--nbd", "nbd", default=None, help="NBD TCP address HOST:PORT (default 127.0.0.1:10809).")
@click.option("--nbd-socket", help="Also (or, without --nbd, only) serve NBD on this unix socket.")
@click.option("--api-socket", "serve_api_socket", help="Control API unix socket (default DATA_DIR/api.sock).")
@click.option(
    "--api",
    "api",
    help="Also serve the control API on TCP HOST:PORT, with a token in DATA_DIR/api.token.",
)
@click.option("--save-limit", default="1GiB", show_default=True, help="Save area limit per session update.")
@click.option(
    "--hot-set",
    default="1GiB",
    show_default=True,
    help="Per session, at most this much of the source is copied again after a power loss "
    "(4MiB regions written to last); smaller costs more fsyncs under scattered writes.",
)
@click.option("--retry-limit", default=5, show_default=True, help="Automatic retries of a failed target.")
@click.option(
    "--retry-backoff", default=2.0, show_default=True, help="Seconds before the first retry (doubles)."
)
@click.option(
    "--target-timeout",
    default=30.0,
    type=click.FloatRange(min=0, min_open=True),
    show_default=True,
    help="Seconds a remote target may take to connect, or stay silent while requests wait.",
)
@click.option(
    "--nbd-metrics/--no-nbd-metrics",
    default=True,
    show_default=True,
    help="Count NBD requests, bytes and latency per export for GET /metrics.",
)
@click.option(
    "--tls",
    "tls_mode",
    type=click.Choice(["off", "on", "require"]),
    default=None,
    help="NBD over TLS (STARTTLS): require it, offer it (on), or not (off); the TCP API is HTTPS "
    "unless off. Default: require with --tls-certificates, else off, and then only loopback "
    "addresses and unix sockets may be served.",
)
@click.option(
    "--tls-certificates",
    metavar="DIR",
    help="ca-cert.pem, server-cert.pem, server-key.pem (optional ca-crl.pem), as nbdkit and "
    "qemu name them; re-read when they change. Make a set with: deltavol tls init DIR --host NAME.",
)
@click.option(
    "--tls-verify-peer", is_flag=True, help="Clients must present a certificate signed by ca-cert.pem."
)
@click.option(
    "--handshake-limit",
    default=10.0,
    type=click.FloatRange(min=0, min_open=True),
    show_default=True,
    help="Seconds an NBD client may take to reach transmission (TLS and options included); "
    "slower ones are closed.",
)
@click.option(
    "--max-connections",
    default=1000,
    type=click.IntRange(min=1),
    show_default=True,
    help="NBD connections open at once, per listener; more are closed at accept.",
)
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_context
def serve(
    ctx: click.Context,
    serve_data_dir: str | None,
    nbd: str | None,
    nbd_socket: str | None,
    serve_api_socket: str | None,
    api: str | None,
    save_limit: str,
    hot_set: str,
    retry_limit: int,
    retry_backoff: float,
    target_timeout: float,
    nbd_metrics: bool,
    tls_mode: str | None,
    tls_certificates: str | None,
    tls_verify_peer: bool,
    handshake_limit: float,
    max_connections: int,
    log_level: str,
) -> None:
    """Run the server: NBD exports and the control API for one data dir."""
    setup_logging(log_level)
    data_dir = resolve_data_dir(serve_data_dir) if serve_data_dir else ctx.obj.data_dir
    nbd_tcp = parse_host_port(nbd, 10809) if nbd else (None if nbd_socket else DEFAULT_NBD)
    api_tcp = parse_host_port(api, 8080) if api else None
    policy = listen_policy(tls_mode, tls_certificates, tls_verify_peer, nbd_tcp, api_tcp)
    config = ServerConfig(
        data_dir=data_dir,
        nbd_tcp=nbd_tcp,
        nbd_socket=nbd_socket,
        api_socket=serve_api_socket or ctx.obj.socket,
        api_tcp=api_tcp,
        save_limit=parse_size(save_limit),
        hot_set=parse_hot_set(hot_set),
        retry_limit=retry_limit,
        retry_backoff=retry_backoff,
        target_timeout=target_timeout,
        nbd_metrics=nbd_metrics,
        tls=policy.mode,
        tls_certificates=policy.certificates,
        tls_verify_peer=policy.verify_peer,
        handshake_limit=handshake_limit,
        max_connections=max_connections,
        warnings=policy.warnings,
    )
    from deltavol.server.main import serve as run

    try:
        import uvloop

        uvloop.run(run(config))
    except ImportError:
        asyncio.run(run(config))

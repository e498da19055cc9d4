"""``deltavol serve``: wire the data dir, service, NBD listener and control API together,
run until SIGTERM/SIGINT, then shut down in order (stop accepting, drain in-flight
requests, flush volumes, release the data dir)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from deltavol.backend import export
from deltavol.config import ServerConfig
from deltavol.errors import ListenFailed
from deltavol.nbd.constants import TlsMode
from deltavol.server.http_api import make_app
from deltavol.server.nbd_listener import NbdListener, unlink_socket
from deltavol.service import Service
from deltavol.store.datadir import DataDir
from deltavol.tls import ServerTls

log = logging.getLogger("deltavol.server")


async def serve(config: ServerConfig) -> None:
    export.COUNTING = config.nbd_metrics  # before the volumes' exports are made
    os.umask(0o077)  # what the server makes (volumes, bitmaps, sockets) is its user's alone
    datadir = DataDir(config.data_dir)
    db = datadir.open()
    service = Service(db, datadir, config)
    runner: web.AppRunner | None = None
    server_tls = (
        ServerTls(config.tls_certificates, config.tls_verify_peer) if config.tls_certificates else None
    )
    listener = NbdListener(
        service,
        tls_mode=TlsMode(config.tls),
        tls_context=server_tls.context if server_tls else None,
        handshake_limit=config.handshake_limit,
        max_connections=config.max_connections,
    )
    try:
        service.load()
        await service.start()
        api_socket = config.api_socket or str(datadir.api_socket)
        token = None
        if config.api_tcp:
            token = secrets.token_urlsafe(32)
            fd = os.open(datadir.api_token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, token.encode())
            os.close(fd)
        peer_token = service.sessions.peer_files.own_token() if config.api_tcp else None
        runner = web.AppRunner(make_app(service, token, peer_token), access_log=None)
        await runner.setup()
        unlink_socket(str(api_socket))
        await _listen(str(api_socket), web.UnixSite(runner, api_socket).start())
        os.chmod(api_socket, 0o600)
        if config.api_tcp:
            https = server_tls.https_context() if server_tls else None
            site = web.TCPSite(runner, *config.api_tcp, ssl_context=https)
            await _listen("{}:{}".format(*config.api_tcp), site.start())
        if config.nbd_tcp:
            await _listen("{}:{}".format(*config.nbd_tcp), listener.listen_tcp(*config.nbd_tcp))
        if config.nbd_socket:
            await _listen(str(config.nbd_socket), listener.listen_unix(config.nbd_socket))
            os.chmod(config.nbd_socket, 0o600)
        if config.tls != "off":
            log.info(
                "server: TLS %s with %s%s",
                config.tls,
                config.tls_certificates,
                ", clients' certificates verified" if config.tls_verify_peer else "",
            )
        for warning in config.warnings:
            log.warning("server: %s", warning)
        log.info("server: ready, data dir %s, api %s (pid %d)", config.data_dir, api_socket, os.getpid())

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("server: stopping")
    finally:
        await listener.shutdown(config.drain_timeout)
        if runner is not None:
            await runner.cleanup()
        for vol in service.volumes.all():
            with contextlib.suppress(Exception):
                await vol.backend.flush()
        await service.close()
        datadir.close()
        log.info("server: stopped")


async def _listen(address: str, start: Coroutine[Any, Any, object]) -> None:
    try:
        await start
    except OSError as exc:
        raise ListenFailed(address=address, why=exc.strerror or exc) from exc

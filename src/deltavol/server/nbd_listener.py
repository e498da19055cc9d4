"""Accepts NBD connections on TCP and unix sockets and shuts them down in two phases:
stop accepting, then let in-flight requests finish before closing.

Every connection gets the listener's TLS mode and context factory (see
``nbd_connection``); the factory is called at each STARTTLS, not here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from deltavol.nbd.constants import TlsMode
from deltavol.server.nbd_connection import ExportDirectory, NbdConnection, TlsContextFactory

log = logging.getLogger("deltavol.nbd")


class NbdListener:
    def __init__(
        self,
        directory: ExportDirectory,
        *,
        tls_mode: TlsMode = TlsMode.OFF,
        tls_context: TlsContextFactory | None = None,
    ) -> None:
        if tls_mode is not TlsMode.OFF and tls_context is None:
            raise ValueError(f"TLS mode {tls_mode} needs a TLS context")
        self.directory = directory
        self.tls_mode = tls_mode
        self.tls_context = tls_context
        self.servers: list[asyncio.base_events.Server] = []
        self.connections: set[NbdConnection] = set()

    def _factory(self) -> NbdConnection:
        conn = NbdConnection(
            self.directory, self.connections.discard, tls_mode=self.tls_mode, tls_context=self.tls_context
        )
        self.connections.add(conn)
        return conn

    async def listen_tcp(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._factory, host, port, reuse_address=True)
        self.servers.append(server)
        log.info("nbd: listening on %s:%d (TLS %s)", host, port, self.tls_mode)

    async def listen_unix(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = await asyncio.get_running_loop().create_unix_server(self._factory, path)
        self.servers.append(server)
        log.info("nbd: listening on unix socket %s (TLS %s)", path, self.tls_mode)

    async def shutdown(self, timeout: float = 30.0) -> None:
        for server in self.servers:
            server.close()
        conns = list(self.connections)
        if conns:
            log.info("nbd: draining %d connection(s)", len(conns))
            waits = [asyncio.ensure_future(c.idle.wait()) for c in conns]
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for w in pending:
                w.cancel()
            if pending:
                log.warning("nbd: %d connection(s) still busy after %.0fs", len(pending), timeout)
        for conn in conns:
            conn.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

"""Accepts NBD connections on TCP and unix sockets and shuts them down in two phases:
stop accepting, then let in-flight requests finish before closing.

Every connection gets the listener's TLS mode and context factory (see
``nbd_connection``); the factory is called at each STARTTLS, not here.

Before a client is in transmission phase nothing authenticates it, so the listener
bounds what it may hold: a connection still negotiating (in plain text, in the TLS
handshake or in options) after ``handshake_limit`` seconds is closed, as qemu-nbd's
``--handshake-limit`` does, and beyond ``max_connections`` open connections a new one is
closed at accept (with a log line at most every few seconds)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time

from deltavol.errors import ListenFailed
from deltavol.nbd.constants import TlsMode
from deltavol.nbd.state import ServerPhase as Phase
from deltavol.server.nbd_connection import ExportDirectory, NbdConnection, TlsContextFactory

log = logging.getLogger("deltavol.nbd")


class NbdListener:
    def __init__(
        self,
        directory: ExportDirectory,
        *,
        tls_mode: TlsMode = TlsMode.OFF,
        tls_context: TlsContextFactory | None = None,
        handshake_limit: float = 10.0,
        max_connections: int = 1000,
    ) -> None:
        if tls_mode is not TlsMode.OFF and tls_context is None:
            raise ValueError(f"TLS mode {tls_mode} needs a TLS context")
        self.directory = directory
        self.tls_mode = tls_mode
        self.tls_context = tls_context
        self.servers: list[asyncio.base_events.Server] = []
        self.connections: set[NbdConnection] = set()
        self.handshake_limit = handshake_limit
        self.max_connections = max_connections
        self.refused = 0  # connections closed at accept: too many open
        self._limits: dict[NbdConnection, asyncio.TimerHandle] = {}
        self._said_refused = -LOG_EVERY

    def _factory(self) -> asyncio.BaseProtocol:
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            now = time.monotonic()
            if now - self._said_refused >= LOG_EVERY:
                self._said_refused = now
                log.warning(
                    "nbd: %d connections open (--max-connections): closing new ones (%d so far)",
                    len(self.connections),
                    self.refused,
                )
            return _Refused()
        conn = NbdConnection(self.directory, self._done, tls_mode=self.tls_mode, tls_context=self.tls_context)
        self.connections.add(conn)
        loop = asyncio.get_running_loop()
        self._limits[conn] = loop.call_later(self.handshake_limit, self._too_slow, conn)
        return conn

    def _done(self, conn: NbdConnection) -> None:
        self.connections.discard(conn)
        handle = self._limits.pop(conn, None)
        if handle is not None:
            handle.cancel()

    def _too_slow(self, conn: NbdConnection) -> None:
        self._limits.pop(conn, None)
        if conn.conn.phase in (Phase.TRANSMISSION, Phase.CLOSED) or conn.transport is None:
            return
        log.warning(
            "nbd %s: closing: not in transmission phase after %gs (--handshake-limit)",
            conn.peer,
            self.handshake_limit,
        )
        conn.transport.abort()  # the raw transport while a TLS handshake runs: that fails it too

    async def listen_tcp(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._factory, host, port, reuse_address=True)
        self.servers.append(server)
        log.info("nbd: listening on %s:%d (TLS %s)", host, port, self.tls_mode)

    async def listen_unix(self, path: str) -> None:
        unlink_socket(path)
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


LOG_EVERY = 5.0  # seconds between two log lines about refused connections


class _Refused(asyncio.Protocol):
    """A connection beyond ``max_connections``: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def unlink_socket(path: str) -> None:
    """Remove what an earlier run left at ``path``: a socket only; anything else there
    is not ours to remove (a ``ListenFailed`` says so)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenFailed(address=path, why=exc.strerror or exc) from None
    if not stat.S_ISSOCK(mode):
        raise ListenFailed(address=path, why="it exists and is not a socket; not removing it")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

"""The CLI's side of the control API: one request per call, errors as DeltavolError."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from deltavol.errors import ApiError, ServerNotRunning, TlsVerifyFailed, UsageError
from deltavol.store.datadir import resolve_data_dir


@dataclass(frozen=True)
class ApiTarget:
    data_dir: Path
    socket: str | None = None  # unix socket; default data_dir/api.sock
    url: str | None = None  # http://host:port or https://host:port for the TCP API
    token: str | None = None
    certificates: str | None = None  # ca-cert.pem (client-cert/key.pem) to trust an https:// API

    @property
    def unix_socket(self) -> str:
        return self.socket or str(self.data_dir / "api.sock")

    @classmethod
    def resolve(
        cls,
        data_dir: str | None,
        socket: str | None,
        url: str | None,
        token: str | None,
        certificates: str | None = None,
    ) -> ApiTarget:
        root = resolve_data_dir(data_dir)
        if url and not token and _loopback_url(url):
            # the local server's token, for the local server only: never to another host
            token_file = root / "api.token"
            token = os.environ.get("DELTAVOL_API_TOKEN") or (
                token_file.read_text().strip() if token_file.exists() else None
            )
        return cls(root, socket, url, token, certificates)

    def headers(self) -> dict[str, str]:
        """The Authorization header: a token goes over plain http:// to a loopback address
        only (elsewhere anyone on the way could read it)."""
        if not self.token:
            return {}
        if self.url and not self.url.lower().startswith("https://") and not _loopback_url(self.url):
            raise UsageError(
                msg=f"not sending the API token in plain text to {self.url}: "
                "use https:// (the server's TCP API is HTTPS when it runs with TLS)"
            )
        return {"Authorization": f"Bearer {self.token}"}

    def ssl_context(self) -> ssl.SSLContext | None:
        """For an https:// URL: the server verified against the CA (host name included)."""
        if not (self.url and self.url.lower().startswith("https://")):
            return None
        from deltavol.tls import client_context

        return client_context(Path(self.certificates).expanduser() if self.certificates else None)


def call(target: ApiTarget, method: str, path: str, body: Any = None, timeout: float = 300) -> Any:
    return asyncio.run(acall(target, method, path, body, timeout))


async def acall(target: ApiTarget, method: str, path: str, body: Any = None, timeout: float = 300) -> Any:
    if target.url:
        connector: aiohttp.BaseConnector = aiohttp.TCPConnector(ssl=target.ssl_context() or True)
        base = target.url.rstrip("/")
    else:
        connector = aiohttp.UnixConnector(path=target.unix_socket)
        base = "http://deltavol"
    headers = target.headers()
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as session,
            session.request(method, base + path, json=body, headers=headers) as resp,
        ):
            raw = await resp.read()
            try:
                data = json.loads(raw) if raw else None
            except ValueError:  # not ours (a proxy's page, aiohttp's own 413): say what came
                text = raw[:200].decode(errors="replace").strip()
                why = f"HTTP {resp.status} {resp.reason or ''}".strip() + (f": {text}" if text else "")
                raise ApiError(resp.status if resp.status >= 400 else 502, "BadReply", why) from None
            if resp.status >= 400:
                err = (data or {}).get("error", {}) if isinstance(data, dict) else {}
                raise ApiError(
                    resp.status, err.get("code", "Error"), err.get("message", f"HTTP {resp.status}")
                )
            return data
    except aiohttp.ClientSSLError as exc:
        hint = "" if target.certificates else " (give the CA with --api-certificates DIR)"
        raise TlsVerifyFailed(peer=target.url, why=f"{_ssl_why(exc)}{hint}") from exc
    except (aiohttp.ClientConnectionError, FileNotFoundError) as exc:
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            raise ApiError(502, "Disconnected", "the server closed the connection" + _guess(target)) from exc
        raise ServerNotRunning(socket=target.url or target.unix_socket, data_dir=target.data_dir) from exc


@dataclass(frozen=True)
class StreamEvent:
    """One Server-Sent Event as read: ``data`` is the JSON object the server sent."""

    id: int | None
    kind: str
    data: dict[str, Any]


async def events(
    target: ApiTarget, last_id: int | None = None, opened: Any = None
) -> AsyncIterator[StreamEvent]:
    """Follow ``GET /v1/events``. ``opened()`` is called once the server has subscribed this
    stream (every event published after is in it). The stream ends when the server closes it."""
    if target.url:
        connector: aiohttp.BaseConnector = aiohttp.TCPConnector(ssl=target.ssl_context() or True)
        base = target.url.rstrip("/")
    else:
        connector = aiohttp.UnixConnector(path=target.unix_socket)
        base = "http://deltavol"
    headers = target.headers()
    if last_id is not None:
        headers["Last-Event-ID"] = str(last_id)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.get(base + "/v1/events", headers=headers) as resp,
        ):
            if resp.status >= 400:
                data = await resp.json(content_type=None)
                err = (data or {}).get("error", {}) if isinstance(data, dict) else {}
                raise ApiError(
                    resp.status, err.get("code", "Error"), err.get("message", f"HTTP {resp.status}")
                )
            fields: dict[str, str] = {}
            first = True
            async for raw in resp.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    if first and opened is not None:
                        await opened()
                    first = False
                    continue
                if line:
                    key, _, value = line.partition(":")
                    fields[key] = value[1:] if value.startswith(" ") else value
                    continue
                if "data" in fields:
                    data = json.loads(fields["data"])
                    eid = fields.get("id")
                    yield StreamEvent(int(eid) if eid else None, fields.get("event", "message"), data)
                fields = {}
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError):
        return  # the server went away (or is stopping): the stream is over
    except (aiohttp.ClientConnectionError, FileNotFoundError) as exc:
        raise ServerNotRunning(socket=target.url or target.unix_socket, data_dir=target.data_dir) from exc


def _loopback_url(url: str) -> bool:
    from urllib.parse import urlsplit

    from deltavol.tls import is_loopback

    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    return host is not None and is_loopback(host)


def _guess(target: ApiTarget) -> str:
    """Why a TCP API may close a connection at once: TLS one side only, or no client certificate."""
    url = (target.url or "").lower()
    if url.startswith("http://"):
        return " (does it serve https://?)"
    if url.startswith("https://") and (
        not target.certificates or not (Path(target.certificates).expanduser() / "client-cert.pem").exists()
    ):
        return " (if it verifies clients' certificates, --api-certificates DIR needs client-cert.pem)"
    return ""


def _ssl_why(exc: aiohttp.ClientSSLError) -> str:
    cause = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None) or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return cause.verify_message or str(cause)
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    return str(cause)

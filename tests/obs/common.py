"""What the observability tests share: a server with its API on TCP too, its token, and a
plain HTTP client (the standard library's) on either socket."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.harness import Server, free_port

MiB = 1 << 20


class TcpServer(Server):
    """``deltavol serve`` with the control API also on a free TCP port (and so a token)."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.port = free_port()
        super().__init__(root, "--api", f"127.0.0.1:{self.port}", *extra)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.root / "api.token").read_text().strip()

    def start(self) -> None:
        super().start()
        deadline = time.monotonic() + 30  # a loaded machine starts a server slowly
        while time.monotonic() < deadline:  # the unix socket comes first, then TCP
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the TCP API never listened")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__("deltavol", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def get(server: Server, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(str(server.root / "api.sock"))
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def tcp_get(server: TcpServer, path: str, token: str | None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class EventReader:
    """``GET /v1/events`` read line by line with http.client: a plain HTTP client."""

    def __init__(self, server: Server, last_id: int | None = None, timeout: float = 30) -> None:
        self.deadline = time.monotonic() + 60  # the heartbeat (15 s) lets a reader see it pass
        self.conn = UnixHTTPConnection(str(server.root / "api.sock"), timeout=timeout)
        headers = {} if last_id is None else {"Last-Event-ID": str(last_id)}
        self.conn.request("GET", "/v1/events", headers=headers)
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.read()
        assert self.resp.getheader("Content-Type", "").startswith("text/event-stream")
        self.comments: list[str] = []
        first = self.resp.readline().decode()
        assert first.startswith(": deltavol events, last id "), first  # subscribed from here on
        self.opened_at = int(first.rsplit(" ", 1)[1])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        fields: dict[str, str] = {}
        while True:
            line = self.resp.readline()
            if not line:
                return
            assert time.monotonic() < self.deadline, "no awaited event within 60 s"
            text = line.decode().rstrip("\n")
            if text.startswith(":"):
                self.comments.append(text)
            elif text:
                key, _, value = text.partition(": ")
                fields[key] = value
            elif "data" in fields:
                yield {
                    "sse_id": int(fields["id"]) if "id" in fields else None,
                    "event": fields.get("event"),
                    **json.loads(fields["data"]),
                }
                fields = {}

    def close(self) -> None:
        self.conn.close()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus exposition (None when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None

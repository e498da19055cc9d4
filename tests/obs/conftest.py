"""The ``tcp_server`` of the observability tests: a server with its API on TCP (token)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.obs.common import TcpServer


@pytest.fixture
def tcp_server(tmp_path: Path) -> Iterator[TcpServer]:
    srv = TcpServer(tmp_path / "data")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        srv.log.close()

"""Fixtures shared by the suites: a running ``deltavol serve`` on a fresh data dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A server on its own data dir, NBD on a unix socket; stopped (SIGTERM, exit 0) after the test."""
    srv = Server(tmp_path / "data")
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop()
        srv.log.close()

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


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A certificate dir as nbdkit, qemu and libnbd read one (``tests/certs.py``): a CA,
    a server certificate for localhost and 127.0.0.1, and a client certificate."""
    from tests.certs import make_certs

    return make_certs(tmp_path_factory.mktemp("tls"))

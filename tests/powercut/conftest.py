"""The cutfs binary (built once per run) and a rig of two layers, a server and a qemu-nbd target."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.powercut.rig import Rig, build_cutfs


@pytest.fixture(scope="session")
def cutfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cutfs(tmp_path_factory.mktemp("cutfs"))


@pytest.fixture
def rig(cutfs: Path, tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(cutfs, tmp_path)
    rig.server.start()
    try:
        yield rig
    finally:
        rig.close()
    assert "Traceback" not in rig.server.log_path.read_text()

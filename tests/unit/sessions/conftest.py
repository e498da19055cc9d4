"""The ``rig`` of the session tests that run the real write path over fakes (a source's
disk, a target): built in ``test_silent_target.py``, shared by the tests beside it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.sessions.test_silent_target import Rig


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.crash()

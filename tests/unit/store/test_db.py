"""The metadata database: a file SQLite cannot read is refused as corrupt, naming it; an
I/O error or a full disk while opening it is said as such, never as corruption (the
advice for a corrupt database is to restore it)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from deltavol.errors import CorruptFile, DeltavolError, NoSpace
from deltavol.store import db as db_module
from deltavol.store.db import Database


def test_a_file_that_is_not_a_database_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "deltavol.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CorruptFile) as info:
        Database(str(path))
    assert str(path) in info.value.message


@pytest.mark.parametrize(
    ("sqlite_says", "error"), [("disk I/O error", DeltavolError), ("database or disk is full", NoSpace)]
)
def test_an_io_error_opening_it_is_not_corruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_says: str, error: type[DeltavolError]
) -> None:
    path = tmp_path / "deltavol.db"
    Database(str(path)).close()

    def failing(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        raise sqlite3.OperationalError(sqlite_says)

    monkeypatch.setattr(db_module.sqlite3, "connect", failing)
    with pytest.raises(error) as info:
        Database(str(path))
    assert not isinstance(info.value, CorruptFile) and str(path) in info.value.message

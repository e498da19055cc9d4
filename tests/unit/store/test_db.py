"""The metadata database: a file SQLite cannot read is refused as corrupt, naming it; an
I/O error or a full disk while opening it is said as such, never as corruption (the
advice for a corrupt database is to restore it). A database of an older format is brought
to this one when it is opened; one of a newer format is refused, and left as it is."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from deltavol.errors import CorruptFile, DeltavolError, NewerFormat, NoSpace
from deltavol.store import db as db_module
from deltavol.store.db import FORMAT_VERSION, Database
from tests.harness import DELTAVOL


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


def database_of_format(path: Path, version: str) -> None:
    """A database as a deltavol of that format left it, with one volume."""
    db = sqlite3.connect(path)
    with db:
        db.executescript(db_module.SCHEMA)
        db.execute("INSERT INTO meta VALUES ('format_version', ?)", (version,))
        db.execute("INSERT INTO volumes VALUES ('v', '/v', 4096, 0, 't')")
    db.close()


def stored(path: Path) -> tuple[str, list[tuple[Any, ...]]]:
    db = sqlite3.connect(path)
    try:
        (version,) = db.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
        return version, db.execute("SELECT * FROM volumes").fetchall()
    finally:
        db.close()


def test_a_new_database_is_of_this_format(tmp_path: Path) -> None:
    Database(str(tmp_path / "deltavol.db")).close()
    assert FORMAT_VERSION == 2 and stored(tmp_path / "deltavol.db")[0] == "2"


def test_a_database_of_format_1_is_of_format_2_once_opened(tmp_path: Path) -> None:
    """Committed by the open itself, before anything else is written: a deltavol that
    reads only format 1 refuses it from then on, rather than meet a row it cannot read."""
    path = tmp_path / "deltavol.db"
    database_of_format(path, "1")
    db = Database(str(path))
    try:
        assert stored(path) == ("2", [("v", "/v", 4096, 0, "t")])  # another connection sees it
    finally:
        db.close()


@pytest.mark.parametrize(
    ("version", "error", "why"),
    [
        ("3", NewerFormat, "has format version 3, this deltavol reads up to 2: use a newer deltavol"),
        ("two", CorruptFile, "is corrupt: format version 'two' is not a number"),
        ("0", CorruptFile, "is corrupt: format version 0 does not exist"),
    ],
)
def test_a_database_of_a_format_this_deltavol_cannot_read_is_refused_and_left_as_it_is(
    tmp_path: Path, version: str, error: type[DeltavolError], why: str
) -> None:
    path = tmp_path / "deltavol.db"
    database_of_format(path, version)
    before = stored(path)
    with pytest.raises(error) as info:
        Database(str(path))
    assert info.value.message == f"{path} {why}"
    assert stored(path) == before


def test_serve_refuses_a_database_of_a_newer_format_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir(mode=0o700)
    database_of_format(root / "deltavol.db", "3")
    before = stored(root / "deltavol.db")
    argv = [str(DELTAVOL), "serve", "--data-dir", str(root), "--nbd-socket", str(root / "nbd.sock")]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert f"{root / 'deltavol.db'} has format version 3, this deltavol reads up to 2" in out.stderr
    assert stored(root / "deltavol.db") == before and not (root / "api.sock").exists()

"""Metadata in SQLite (WAL): the schema, its version, and a transaction helper.

A database whose ``format_version`` is newer than this code (``NewerFormat``), or that
SQLite cannot read (``CorruptFile``), is refused with an error naming the file: never
silently recreated. An I/O error or a full disk is said as such, never as a corrupt
database.

Format versions: 1, session rows whose ``update_json`` has no ``version``; 2, rows of
version 2 (``sessions/records.py``: the update's phase stored). Opening a database of
format 1 makes it format 2 in the transaction that opens it, before any row is written:
its version 1 rows stay as they are and are read by the version 1 migration of
``records.update_from_row`` until the session writes its row again. A deltavol that knows
only format 1 then refuses the database at open, instead of failing on a row it cannot
read.

Tables ``guards``, ``reversals``, ``adoptions`` and ``peer_targets`` (sessions between two
deltavol servers, ``sessions/reverse.py``) are created when missing; they need no new format version: a
deltavol that does not know them ignores them (and with them the guards they hold).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from deltavol.errors import CorruptFile, MetadataError, NewerFormat, NoSpace

FORMAT_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    imported INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL REFERENCES volumes(name),
    target TEXT NOT NULL,
    granularity INTEGER NOT NULL,
    max_rate INTEGER,
    every INTEGER,
    state TEXT NOT NULL,
    consistent INTEGER NOT NULL,
    point_in_time TEXT,
    last_error TEXT,
    created_at TEXT NOT NULL,
    next_update_id INTEGER NOT NULL,
    update_json TEXT
);
CREATE TABLE IF NOT EXISTS guards (
    volume TEXT PRIMARY KEY REFERENCES volumes(name),
    holder TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reversals (
    session TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    volume TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS adoptions (
    request TEXT PRIMARY KEY,
    session TEXT NOT NULL,
    outcome TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS peer_targets (
    volume TEXT PRIMARY KEY REFERENCES volumes(name)
);
"""


class Database:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            with self.transaction():
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        self.conn.execute(stmt)
                row = self.conn.execute("SELECT value FROM meta WHERE key='format_version'").fetchone()
                if row is None:
                    self.conn.execute("INSERT INTO meta VALUES ('format_version', ?)", (str(FORMAT_VERSION),))
                else:
                    self._migrate(row[0])
        except sqlite3.OperationalError as exc:  # I/O error, full disk, cannot open: not corrupt
            if "full" in str(exc):
                raise NoSpace(what=f"metadata {path}") from exc
            raise MetadataError(path=path, why=exc) from exc
        except sqlite3.DatabaseError as exc:
            raise CorruptFile(path=path, why=str(exc)) from exc

    def _migrate(self, stored: str) -> None:
        """Bring a database of an older format to ``FORMAT_VERSION`` (in the open's
        transaction); a newer or unreadable one raises and changes nothing."""
        try:
            version = int(stored)
        except ValueError:
            raise CorruptFile(path=self.path, why=f"format version {stored!r} is not a number") from None
        if version > FORMAT_VERSION:
            raise NewerFormat(path=self.path, version=version, supported=FORMAT_VERSION)
        if version < 1:
            raise CorruptFile(path=self.path, why=f"format version {version} does not exist")
        if version < FORMAT_VERSION:  # 1 -> 2: rows of version 1 are read as they are
            self.conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'format_version'", (str(FORMAT_VERSION),)
            )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if "full" in str(exc):
                raise NoSpace(what=f"metadata {self.path}") from exc
            raise MetadataError(path=self.path, why=exc) from exc

    def close(self) -> None:
        self.conn.close()

"""Facts about each session that survive a restart: what the metrics count and status shows.

An operator's alerts need numbers that do not fall back to zero when the server restarts:
how many updates ended, and how (``updates:KIND:RESULT``), how many full copies were made
and why (``full:REASON``), the bytes sent and saved by copy-on-first-write over the
session's life, and when its last update succeeded or failed. ``Facts.record`` listens to
the event bus (``EventBus.listen``) and writes each change in one SQLite transaction,
synchronously, as the event is published: an update reported finished is counted even if
the server is killed right after.

Results of an update: ``success`` (``update.finished``), ``failure`` (``update.failed``;
the same update may later be resumed and succeed) and ``cancelled`` (the session went idle
without finishing). A full copy is ``initial`` when the session never had a successful
update nor a full copy before, else ``requested``.

Bytes sent are counted by difference: ``counted_update``/``counted_sent`` say how much of
which update is already in ``sent_bytes``, so a failure, a resume and a finish of one
update count its bytes once. The running update's part not yet counted is added at scrape
time (``sent_bytes``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from deltavol.events import Event
from deltavol.store.db import Database

log = logging.getLogger("deltavol.facts")

TABLE = """
CREATE TABLE IF NOT EXISTS session_facts (
    session TEXT NOT NULL,
    key TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (session, key)
)
"""

# keys that are set, not added to
_SET = {"last_success_at", "last_failure_at", "counted_update", "counted_sent", "counted_cofw"}


class Facts:
    def __init__(self, db: Database, find_session: Callable[[str], Any]) -> None:
        """``find_session(name)`` is the live session or None (read-only use)."""
        self.db = db
        self._find = find_session
        with db.transaction() as conn:
            conn.execute(TABLE)
        self._facts: dict[str, dict[str, float]] = {}
        for row in db.conn.execute("SELECT session, key, value FROM session_facts"):
            self._facts.setdefault(row["session"], {})[row["key"]] = row["value"]
        self._running: dict[str, tuple[int, str]] = {}  # session -> (update id, kind) since marked

    def of(self, session: str) -> dict[str, float]:
        return dict(self._facts.get(session, {}))

    def sessions(self) -> dict[str, dict[str, float]]:
        return {name: dict(f) for name, f in self._facts.items()}

    def sent_bytes(self, session: str, update: dict[str, Any] | None) -> tuple[float, float]:
        """Bytes sent and saved by copy-on-first-write over the session's life, with the
        part of ``update`` (its status JSON) not counted yet."""
        f = self._facts.get(session, {})
        sent, cofw = f.get("sent_bytes", 0.0), f.get("cofw_saved_bytes", 0.0)
        if update is not None:
            sent += self._delta(f, update["id"], update.get("bytes_sent", 0), "counted_sent")
            cofw += self._delta(f, update["id"], update.get("cofw_saved_bytes", 0), "counted_cofw")
        return sent, cofw

    # --- the listener ----------------------------------------------------------------------
    def record(self, event: Event) -> None:
        name = event.data.get("name")
        if not isinstance(name, str):
            return
        kind = event.kind
        changes: dict[str, float] = {}
        if kind == "update.marked":
            utype = str(event.data.get("type", "incremental"))
            self._running[name] = (int(event.data.get("id") or 0), utype)
            if utype == "full":
                f = self._facts.get(name, {})
                before = any(
                    k.startswith("full:") or (k.startswith("updates:") and k.endswith(":success")) for k in f
                )
                changes["full:" + ("requested" if before else "initial")] = 1
        elif kind == "update.finished":
            utype = str(event.data.get("type", "incremental"))
            self._running.pop(name, None)
            changes[f"updates:{utype}:success"] = 1
            changes["last_success_at"] = event.at
            self._count_bytes(name, event.data.get("id"), event.data, changes)
        elif kind == "update.failed":
            utype = self._kind_of(name)
            changes[f"updates:{utype}:failure"] = 1
            changes["last_failure_at"] = event.at
            self._count_bytes(name, event.data.get("id"), self._update_json(name), changes)
        elif kind == "session.state" and event.data.get("state") == "idle" and name in self._running:
            session = self._find(name)
            update = getattr(session, "update", None)
            if update is not None and getattr(update, "finished_at", None) is None:  # not finishing
                uid, utype = self._running.pop(name)
                changes[f"updates:{utype}:cancelled"] = 1
                self._count_bytes(name, uid, self._update_json(name), changes)
        elif kind == "session.removed":
            self._running.pop(name, None)
            self._facts.pop(name, None)
            with self.db.transaction() as conn:
                conn.execute("DELETE FROM session_facts WHERE session = ?", (name,))
            return
        if changes:
            self._write(name, changes)

    def _kind_of(self, name: str) -> str:
        if name in self._running:
            return self._running[name][1]
        update = getattr(self._find(name), "update", None)
        return str(getattr(update, "kind", "incremental"))

    def _update_json(self, name: str) -> dict[str, Any]:
        session = self._find(name)
        update = getattr(session, "update", None)
        progress = getattr(session, "progress", None)
        sent = getattr(update, "bytes_sent", 0)
        if progress is not None:  # the live count: the record is synced at checkpoints
            sent = max(sent, getattr(progress, "bytes_sent", 0))
        return {"bytes_sent": sent, "cofw_saved_bytes": getattr(update, "cofw_saved_bytes", 0)}

    def _count_bytes(self, name: str, uid: Any, update: dict[str, Any], changes: dict[str, float]) -> None:
        if uid is None:
            return
        f = self._facts.get(name, {})
        sent, cofw = int(update.get("bytes_sent") or 0), int(update.get("cofw_saved_bytes") or 0)
        changes["sent_bytes"] = self._delta(f, uid, sent, "counted_sent")
        changes["cofw_saved_bytes"] = self._delta(f, uid, cofw, "counted_cofw")
        changes["counted_update"] = float(uid)
        changes["counted_sent"] = float(sent)
        changes["counted_cofw"] = float(cofw)

    @staticmethod
    def _delta(f: dict[str, float], uid: Any, now: float, key: str) -> float:
        if f.get("counted_update") != float(uid):
            return float(now)
        counted = f.get(key, 0.0)
        # below what was counted: the server restarted and the update counts afresh
        return float(now) - counted if now >= counted else float(now)

    def _write(self, name: str, changes: dict[str, float]) -> None:
        f = self._facts.setdefault(name, {})
        new = {k: (v if k in _SET else f.get(k, 0.0) + v) for k, v in changes.items()}
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT INTO session_facts (session, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (session, key) DO UPDATE SET value = excluded.value",
                [(name, k, v) for k, v in new.items()],
            )
        f.update(new)

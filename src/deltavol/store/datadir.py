"""The data dir: where it is, what lives in it, and opening it (lock first, then metadata).

Layout::

    D/lock            flock held by the one server that owns D
    D/deltavol.db     SQLite metadata (WAL)
    D/volumes/        images of volumes created here (imported volumes live elsewhere)
    D/bitmaps/        tracking / transfer bitmap files of sessions
    D/save/           copy-on-first-write save areas
    D/api.sock        control API socket
    D/api.token       bearer token for the TCP control API, when one is served
"""

from __future__ import annotations

import os
from pathlib import Path

from deltavol.store.db import Database
from deltavol.store.lock import DataDirLock


def resolve_data_dir(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser().absolute()
    env = os.environ.get("DELTAVOL_DATA_DIR")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg).absolute() / "deltavol"


class DataDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.volumes = root / "volumes"
        self.bitmaps = root / "bitmaps"
        self.save = root / "save"
        self.api_socket = root / "api.sock"
        self.api_token = root / "api.token"
        self.db_path = root / "deltavol.db"
        self._lock = DataDirLock(str(root / "lock"))
        self.db: Database | None = None

    def open(self) -> Database:
        for d in (self.root, self.volumes, self.bitmaps, self.save):
            d.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self.db = Database(str(self.db_path))
        except BaseException:
            self._lock.release()
            raise
        return self.db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        self._lock.release()

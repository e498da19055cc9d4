"""The data dir: where it is, what lives in it, and opening it (lock first, then metadata).

Layout::

    D/lock            flock held by the one server that owns D
    D/deltavol.db     SQLite metadata (WAL)
    D/volumes/        images of volumes created here (imported volumes live elsewhere)
    D/bitmaps/        tracking / transfer bitmap files of sessions
    D/save/           copy-on-first-write save areas
    D/api.sock        control API socket
    D/api.token       bearer token for the TCP control API, when one is served

The data dir and its directories are 0700, its files and sockets 0600: volumes hold
users' data and the token opens the API. ``open`` fixes a data dir made looser before.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from deltavol.store.db import Database
from deltavol.store.lock import DataDirLock

log = logging.getLogger("deltavol.store")


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
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock.acquire()
        self.lock_down()
        try:
            self.db = Database(str(self.db_path))
        except BaseException:
            self._lock.release()
            raise
        return self.db

    def lock_down(self) -> None:
        """Directories 0700, files and sockets 0600, in the data dir's own tree (symbolic
        links, and imported volumes living elsewhere, are left alone)."""
        fixed = 0
        for top, dirs, files in os.walk(self.root):
            for name in (".", *dirs, *files):
                path = os.path.join(top, name)
                try:
                    st = os.lstat(path)
                    want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
                    if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) & ~want == 0:
                        continue
                    os.chmod(path, stat.S_IMODE(st.st_mode) & want)
                    fixed += 1
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.warning("data dir: cannot make %s private: %s", path, exc.strerror or exc)
        if fixed:
            log.info("data dir: %d file(s) and directories made private to their owner", fixed)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        self._lock.release()

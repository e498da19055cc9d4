"""Sessions whose target is a volume of another deltavol server (its *peer*).

Design notes
------------
* **What a session knows of its peer** (``Peer``): the peer's control API (URL, token,
  certificates), the guard secret its copier presents to write the target, and what the
  peer needs to reverse the session back (this server's API and the NBD URI of the source
  as the peer reaches them). It lives in ``DATA_DIR/peers/NAME.json`` (0600, written
  atomically, never logged and never in the session's JSON), written before the session
  row commits and deleted in the step that deletes the row, before any await (the secret
  stays in memory for the peer's DELETE of the guard): a file no row owns is garbage,
  replaced by the next session of that name with a peer, removed (durably, before its
  row) by the next one without.
* **The guard** (``volumes.PeerGuard``): the peer keeps, in its ``guards`` table, that its
  volume is the target of ``holder`` and the sha256 of a secret. Its clients may not change
  the volume; the copier opens the export as ``NAME@SECRET``, the one writable way in.
* **The peer token** (``DATA_DIR/peer.token``, made once, 0600): a bearer token that the
  API accepts for the ``/v1/peer/`` routes only. Unlike ``api.token`` it outlives restarts,
  so a peer that stored it can still reach this server after a crash.
* **Test fault points** (``fault``): ``DELTAVOL_TEST_FAULT=POINT`` kills the server with
  SIGKILL when it reaches ``POINT``. Tests use it to crash a server at one exact step of the
  reverse exchange; unset, it costs one dictionary look-up.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deltavol.errors import ApiError, DeltavolError, PeerRefused, PeerUnreachable, UsageError, os_error
from deltavol.store import fs

log = logging.getLogger("deltavol.peers")

PEER_TIMEOUT = 30.0  # seconds a call to a peer may take


def fault(point: str) -> None:
    """Test hook: die here, as a kill -9 would, when ``DELTAVOL_TEST_FAULT`` names this point."""
    if os.environ.get("DELTAVOL_TEST_FAULT") == point:
        log.error("test fault %s: killing this server", point)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Peer:
    api: str  # the peer's control API, http(s)://HOST:PORT
    token: str | None = None  # bearer token for it (its peer.token)
    certificates: str | None = None  # CA (and client certificate) to trust an https:// API
    guard: str | None = None  # the secret this session's copier presents to write its target
    back_api: str | None = None  # this server's API as the peer reaches it
    back_target: str | None = None  # the session's source as the peer reaches it (NBD URI)

    def shown(self) -> dict[str, Any]:
        """What status shows: no secret."""
        return {"api": self.api, "reverse_api": self.back_api, "reverse_target": self.back_target}


def new_secret() -> str:
    return secrets.token_urlsafe(24)


class PeerFiles:
    def __init__(self, root: Path) -> None:
        self.dir = root / "peers"
        self.token_path = root / "peer.token"

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def load(self, name: str) -> Peer | None:
        try:
            raw = fs.read_bytes(self.path(name))
        except FileNotFoundError:
            return None
        except OSError as exc:  # an I/O error is no missing file: the start-up fails, naming it
            raise os_error(exc, f"peer file {self.path(name)}") from exc
        try:
            data = json.loads(raw)
            return Peer(**data)
        except (ValueError, TypeError) as exc:
            log.error("session %s: peer file %s cannot be read: %s", name, self.path(name), exc)
            return None

    def save(self, name: str, peer: Peer) -> None:
        try:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            _write_private(self.path(name), json.dumps(asdict(peer)).encode())
        except OSError as exc:
            raise os_error(exc, f"peer file of session {name}") from exc

    def delete(self, name: str) -> None:
        try:
            self.discard(name)
        except DeltavolError as exc:
            log.warning("session %s: %s", name, exc.message)

    def discard(self, name: str) -> None:
        """Remove the peer file of ``name``, durably; raises if that fails."""
        try:
            fs.unlink(self.path(name), missing_ok=True)
            if self.dir.exists():
                fs.sync_dir(self.dir)
        except OSError as exc:
            raise os_error(exc, f"removing the peer file of session {name}") from exc

    def own_token(self) -> str:
        """This server's peer token, made on first use."""
        try:
            return fs.read_bytes(self.token_path).decode().strip()
        except FileNotFoundError:
            pass
        token = secrets.token_urlsafe(32)
        _write_private(self.token_path, token.encode())
        return token


def _write_private(path: Path, data: bytes) -> None:
    """0600, whole or not at all, durable with its name."""
    tmp = path.with_name(path.name + ".tmp")
    fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        fs.pwrite(fd, data, 0)
        fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.replace(tmp, path)
    fs.sync_dir(path.parent)


class Uncertain(PeerUnreachable):
    """peer deltavol server {api}: {why}"""


async def call(peer: Peer, method: str, path: str, body: Any = None, root: Path | None = None) -> Any:
    """One call to the peer's API. A refusal (4xx) raises ``PeerRefused`` (nothing done
    there); no answer raises ``Uncertain``: the peer may or may not have done it."""
    from deltavol.cli.api_client import ApiTarget, acall

    target = ApiTarget(root or Path("."), url=peer.api, token=peer.token, certificates=peer.certificates)
    try:
        return await acall(target, method, path, body, timeout=PEER_TIMEOUT)
    except ApiError as exc:
        if 400 <= exc.status < 500:
            raise PeerRefused(api=peer.api, why=exc.message) from exc
        raise Uncertain(api=peer.api, why=exc.message) from exc
    except UsageError:
        raise
    except TimeoutError as exc:
        raise Uncertain(api=peer.api, why=f"no answer in {PEER_TIMEOUT:g} s") from exc
    except DeltavolError as exc:  # not running, TLS refused
        import aiohttp

        if isinstance(exc.__cause__, aiohttp.ClientConnectorError):  # never connected: nothing sent
            raise PeerUnreachable(api=peer.api, why=f"cannot connect: {exc.__cause__}") from exc
        raise Uncertain(api=peer.api, why=exc.message) from exc
    except Exception as exc:  # aiohttp's other client errors
        raise Uncertain(api=peer.api, why=str(exc) or type(exc).__name__) from exc

"""``session reverse``: the target becomes the writable source of the session, the old source
its target, and the first update copies only what changed on either side.

Design notes
------------
* **What differs.** With no update under way, the target holds the source as of the point
  in time, and tracking has a bit wherever the source changed since (invariant 2). So the
  two volumes differ only where tracking says. The reversed session starts with that very
  tracking, and tracks the promoted volume from the moment it becomes writable: its first
  update copies the old source's changes (put back as they were at the point in time)
  and the promoted volume's new writes, no more. It is not consistent (its target is no
  image of its source), but it keeps ``point_in_time``, so that update is an incremental
  one. Reversing again works the same way and gives back the first direction.
* **One commit.** With both volumes' write gates closed (no change in flight on either,
  and the old source has no client connected), tracking is rewritten durably with no hot
  region: the file holds exactly the bits, and the same bits are right for both
  directions (both volumes have the same size). Then the row commits the new direction.
  A crash before it leaves the session as it was; after it, the file is the reversed
  session's as it stands. Only then are the hooks moved to the new source and the guards
  to the new target, with no await between the two.
* **Plain NBD servers.** A plain NBD server cannot tell what was written to its export
  once it is promoted, so such a target can be restored from (``session restore``) but
  not reversed.
* **Between two deltavol servers** (the session was created with ``--peer-api``): the
  peer takes the session over, seeded with the tracking bits and the point in time. The
  exchange (L reverses its session S: A -> nbd://R/B):

  1. L, with A's gate closed: A flushed, tracking rewritten durably; then one commit puts
     a guard on A (held by R's session S, with a new secret) and a ``reversals`` row
     (S, request id). From here no client of L may change A.
  2. L -> R ``POST /v1/peer/reversals`` (request id, the bits, the point in time, the
     guard secret of B proving L holds it, the secret of A's guard for R's copier, and how
     R reaches L). R, with B's gate closed, commits in one transaction: the session row
     (B -> nbd://L/A), B's guard dropped, ``adoptions`` (request, adopted); then B is
     tracked before its gate opens. The same request again answers the same; a request
     settled as aborted is refused.
  3. L commits: its session row and the ``reversals`` row deleted; then its files go.

  **Crash points.** (a) L dies before 1 commits: nothing happened. (b) L dies between 1
  and 2, or R dies before its commit in 2: L finds the ``reversals`` row at its start (or
  at the next ``reverse``/``remove``) and asks R to settle the request
  (``POST /v1/peer/reversals/ID/settle``): R, not having adopted it, records it aborted
  (so a late copy of the request can never be adopted) and L drops A's guard and the row:
  the session is as before. (c) R commits in 2 and L dies before 3: settling answers
  ``adopted`` and L finishes step 3. (d) R unreachable when L settles: the reverse stays
  pending, A stays guarded (nobody writes it), the session's updates are not scheduled,
  and the next ``reverse`` or ``remove`` or start settles it. (e) L's peer file lost while
  a request is unsettled: no way to ask R, so the same as (d), naming the file, until it is
  put back. In every case exactly one server ends with session S.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import logging
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from deltavol.bitmap.bitmap import Bitmap
from deltavol.copy.targets import is_uri
from deltavol.errors import (
    AlreadyExists,
    Conflict,
    DeltavolError,
    InUse,
    NotFound,
    NotReversible,
    PeerRefused,
    PeerUnreachable,
    Protected,
    ReversePending,
    TargetError,
    UsageError,
    os_error,
)
from deltavol.sessions import peers
from deltavol.sessions.peers import Peer, Uncertain
from deltavol.sessions.session import Session
from deltavol.sessions.states import State
from deltavol.volumes import PeerGuard, Volume, check_name, secret_sha256

if TYPE_CHECKING:
    from deltavol.sessions.manager import SessionManager

log = logging.getLogger("deltavol.session")


def _refusal(m: SessionManager, s: Session) -> str | None:
    if is_uri(s.target_spec) and s.name not in m.peers:
        return (
            f"its target {s.target_spec} is an export of an NBD server, which cannot say what is "
            "written to it once promoted: restore from it ('session restore') instead (a volume "
            "of another deltavol server can be reversed when the session is created with --peer-api)"
        )
    if s.busy or s.state is not State.IDLE or s.transfer is not None:
        return f"it is {s.state.value}: reverse needs a session with no update or restore under way"
    if s.point_in_time is None:
        return "its target never received a complete copy: run 'session update --full' first"
    others = [o.name for o in m.of_source(s.source.name) if o is not s]
    if others:
        return f"its source {s.source.name!r} is also the source of session(s) {', '.join(others)}"
    for pname, pair in m.holds():
        used = [v for v in (s.source.name, s.target_spec) if v in pair]
        if pname != s.name and used:
            what = "being created, reversed or removed, or not loaded"
            return f"volume {used[0]!r} is also used by session {pname!r} ({what})"
    return None


@contextlib.asynccontextmanager
async def _held(m: SessionManager, s: Session) -> AsyncIterator[None]:
    """Both volumes are the reverse's from its checks to its commit (or failure): a create
    refuses them meanwhile, and checks them again once it holds the source's gate. Entered
    with no await, right after the session's operation is."""
    m._reversing[s.name] = (s.target_spec, s.source.name)
    try:
        yield
    finally:
        del m._reversing[s.name]


async def reverse(
    m: SessionManager, name: str, back_api: str | None = None, back_target: str | None = None
) -> dict[str, Any]:
    if name in m.pending:  # an earlier reverse not settled: settle it first
        await settle_now(m, name)
        if name not in m._sessions:
            raise NotReversible(name=name, why="it was reversed already: it runs on its peer now")
    s = m.get(name)
    if name in m.peers:
        return await _reverse_to_peer(m, s, back_api, back_target)
    async with s.operation(), _held(m, s):
        why = _refusal(m, s)
        if why is not None:
            raise NotReversible(name=name, why=why)
        old, new = s.source, m.volumes.get(s.target_spec)
        if new.size != old.size:
            raise NotReversible(
                name=name,
                why=f"its target {new.name!r} ({new.size} bytes) is larger than its source "
                f"{old.name!r} ({old.size} bytes), which could not hold it",
            )
        if old.connections:
            raise InUse(
                kind="volume",
                name=old.name,
                why=f"{old.connections} NBD connection(s) open; it becomes a target: disconnect them first",
            )
        await s.copier.drop_target()
        preparing = s.protector._preparing  # the save area's space, written ahead in a thread:
        if preparing is not None:  # the reversed session's marks use the same file
            with contextlib.suppress(Exception):
                await asyncio.shield(preparing)
        async with old.gate.closed(), new.gate.closed():
            if old.connections:  # one came while the gate closed
                raise InUse(kind="volume", name=old.name, why=f"{old.connections} NBD connection(s) open")
            await old.backend.flush()  # what tracking says differs is durable on both sides
            await new.backend.flush()
            s._rewrite_tracking()  # every bit durable, no hot region: the file is right both ways
            r = m._new(name, new, old.name, s.granularity, max_rate=s.max_rate, every=s.every)
            r.state = State.IDLE
            r.consistent = False
            r.point_in_time = s.point_in_time
            r.created_at = s.created_at
            r.next_update_id = s.next_update_id
            r.tracking = s.tracking.copy()
            try:
                m._persist(r)  # the commit point
            except BaseException:
                m._drop_unused_wiring(new)
                raise
            s.removed = s.closed = True  # the old direction: no operation, no row written again
            s.tracker.close_file()
            m._detach(s)
            m._sessions[name] = r
            m._attach(r)
            try:  # the file on disk is right already; this gives the new session its handle
                r.tracker.open_file()
                r._rewrite_tracking()
            except Exception as exc:  # changes to the new source fail until a restart reloads it
                log.error("session %s: reopening tracking after the reverse failed: %s", name, exc)
    log.info("session %s: reversed: %s -> %s", name, new.name, old.name)
    m.events.publish("session.reversed", name=name, source=new.name, target=old.name)
    return r.status()


# --- between two deltavol servers: the side that gives the session away ------------------------
_WILDCARDS = ("0.0.0.0", "::", "")  # a listening address no peer can call: say --reverse-*


def _own_api(m: SessionManager) -> str | None:
    """This server's TCP API, when it serves one (a peer on another host needs --reverse-api)."""
    if m.config.api_tcp is None or m.config.api_tcp[0] in _WILDCARDS:
        return None
    host, port = m.config.api_tcp
    scheme = "http" if m.config.tls == "off" else "https"
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


def _own_nbd(m: SessionManager, volume: str) -> str | None:
    if m.config.nbd_tcp is not None:
        host, port = m.config.nbd_tcp
        if host in _WILDCARDS:
            return None
        scheme = "nbd" if m.config.tls == "off" else "nbds"
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}/{volume}"
    if m.config.nbd_socket is not None:
        scheme = "nbd+unix" if m.config.tls == "off" else "nbds+unix"
        return f"{scheme}:///{volume}?socket={m.config.nbd_socket}"
    return None


def _is_local(url: str) -> bool:
    """Whether ``url`` (an API URL or NBD URI) reaches this host only: loopback or a socket."""
    parts = urlsplit(url)
    if parts.scheme.endswith("+unix"):
        return True
    host = parts.hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _reverse_to_peer(
    m: SessionManager, s: Session, back_api: str | None, back_target: str | None
) -> dict[str, Any]:
    name, peer = s.name, m.peers[s.name]
    async with s.operation(), _held(m, s):
        why = _refusal(m, s)
        if why is not None:
            raise NotReversible(name=name, why=why)
        old = s.source
        own_api, own_nbd = _own_api(m), _own_nbd(m, old.name)
        if not _is_local(peer.api):  # an address only this host reaches is no default for it
            own_api = None if own_api is not None and _is_local(own_api) else own_api
            own_nbd = None if own_nbd is not None and _is_local(own_nbd) else own_nbd
        back_api = back_api or peer.back_api or own_api
        back_target = back_target or peer.back_target or own_nbd
        if back_api is None or back_target is None:
            raise NotReversible(
                name=name,
                why="its peer needs this server's API and NBD address to reverse back: serve the "
                "API on TCP (serve --api HOST:PORT), or give --reverse-api URL and --reverse-target URI "
                "(a loopback address or a unix socket is no default for a peer on another host)",
            )
        if old.connections:
            raise InUse(
                kind="volume",
                name=old.name,
                why=f"{old.connections} NBD connection(s) open; it becomes a target: disconnect them first",
            )
        await s.copier.drop_target()
        preparing = s.protector._preparing
        if preparing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(preparing)
        request = uuid.uuid4().hex
        guard_secret = peers.new_secret()
        try:  # before step 1: a failure here changes nothing
            own_token = m.peer_files.own_token()
        except OSError as exc:
            raise os_error(exc, "this server's peer token") from exc
        holder = f"session {name!r} of the deltavol server at {peer.api}"
        async with old.gate.closed():
            if old.connections:
                raise InUse(kind="volume", name=old.name, why=f"{old.connections} NBD connection(s) open")
            await old.backend.flush()
            s._rewrite_tracking()  # every bit durable, no hot region
            bits = s.tracking.to_bytes()
            with m.db.transaction() as conn:  # step 1: from here no client changes the source
                conn.execute(
                    "INSERT OR REPLACE INTO guards VALUES (?, ?, ?)",
                    (old.name, holder, secret_sha256(guard_secret)),
                )
                conn.execute("INSERT INTO reversals VALUES (?, ?, ?)", (name, request, old.name))
            old.peer_guard = PeerGuard(holder, secret_sha256(guard_secret))
            m.pending[name] = request
        peers.fault("reverse-before-call")
        body = {
            "request": request,
            "name": name,
            "source": _export(s.target_spec),
            "guard": peer.guard,
            "target": back_target,
            "target_guard": guard_secret,
            "granularity": s.granularity,
            "size": old.size,
            "point_in_time": s.point_in_time,
            "created_at": s.created_at,
            "next_update_id": s.next_update_id,
            "max_rate": s.max_rate,
            "every": s.every,
            "tracking": base64.b64encode(zlib.compress(bits)).decode(),
            "tracking_encoding": "zlib",
            "peer": {"api": back_api, "token": own_token},
            "back": {"api": peer.api, "target": s.target_spec},
        }
        log.info("session %s: reversing to %s (request %s)", name, peer.api, request)
        try:
            await peers.call(peer, "POST", "/v1/peer/reversals", body)
        except PeerRefused as exc:  # R did nothing
            _undo(m, s)
            raise NotReversible(name=name, why=exc.message) from exc
        except Uncertain as exc:  # R may have taken it: ask
            log.warning("session %s: reverse: %s; settling request %s", name, exc.message, request)
            if await _settle(m, s) != "adopted":
                raise NotReversible(name=name, why=f"{exc.message} (nothing changed)") from exc
            return _gone(name, peer)
        except PeerUnreachable as exc:  # never connected: nothing sent
            _undo(m, s)
            raise NotReversible(name=name, why=exc.message) from exc
        except UsageError:  # refused before sending (a token over plain http to another host)
            _undo(m, s)
            raise
        peers.fault("reverse-accepted")
        await _finish(m, s)
    return _gone(name, peer)


def _export(uri: str) -> str:
    from deltavol.server.nbd_client import parse_uri

    return parse_uri(uri).export


def _gone(name: str, peer: Peer) -> dict[str, Any]:
    return {"name": name, "reversed_to": peer.api, "state": "reversed"}


def _undo(m: SessionManager, s: Session) -> None:
    """The peer did not take the session: the source is writable again, nothing else changed."""
    with m.db.transaction() as conn:
        conn.execute("DELETE FROM guards WHERE volume = ?", (s.source.name,))
        conn.execute("DELETE FROM reversals WHERE session = ?", (s.name,))
    s.source.peer_guard = None
    m.pending.pop(s.name, None)
    if s.last_error and s.last_error.startswith("reverse to "):
        s.last_error = None  # what it said is over
    log.info("session %s: reverse undone: the peer did not take it", s.name)


async def _finish(m: SessionManager, s: Session) -> None:
    """The peer took the session (step 3): it goes from here; the source stays guarded."""
    name = s.name
    with m.db.transaction() as conn:
        conn.execute("DELETE FROM sessions WHERE name = ?", (name,))
        conn.execute("DELETE FROM reversals WHERE session = ?", (name,))
    s.removed = s.closed = True
    m.pending.pop(name, None)
    del m._sessions[name]
    hold = (name, (s.source.name, s.target_spec))
    m._removing.append(hold)  # its files go by name after the awaits: no create of it meanwhile
    try:
        try:
            await s._stop_task()
            await s.copier.drop_target()
        except Exception:
            log.exception("session %s: stopping its update", name)
        async with s._gate.closed():
            m._detach(s)
        await s.files.transfer_gone()  # (a thread): before the directory sync
        s.delete_files()
    finally:
        m._removing.remove(hold)
    peer = m.peers.pop(name, None)
    m.peer_files.delete(name)
    api = peer.api if peer is not None else "its peer"
    log.info("session %s: reversed to %s: %s is its target there", name, api, s.source.name)
    m.events.publish("session.reversed", name=name, source=s.target_spec, target=s.source.name, peer=api)


async def _settle(m: SessionManager, s: Session) -> str:
    """Ask the peer how request ``m.pending[s.name]`` ended and finish or undo (the caller
    holds the session's operation). Raises ``ReversePending`` when the peer does not answer."""
    name, peer = s.name, m.peers.get(s.name)
    request = m.pending[name]
    if peer is None:  # lost or unreadable: read it again (it may have been put back)
        path = m.peer_files.path(name)
        try:
            peer = m.peer_files.load(name)
        except DeltavolError as exc:
            s.last_error = f"reverse not settled: {exc.message}"
            raise ReversePending(name=name, api="its peer", why=exc.message) from exc
        if peer is None:  # no way to ask: the peer may have taken the session; undoing
            # here would leave two writable directions, so the source stays guarded
            why = f"peer file {path} is missing or unreadable: put it back to settle"
            s.last_error = f"reverse not settled: {why}"
            raise ReversePending(name=name, api="its peer", why=why)
        m.peers[name] = peer
    try:
        answer = await peers.call(peer, "POST", f"/v1/peer/reversals/{request}/settle", {"session": name})
    except DeltavolError as exc:
        s.last_error = f"reverse to {peer.api} not settled: {exc.message}"
        raise ReversePending(name=name, api=peer.api, why=exc.message) from exc
    outcome = answer.get("outcome") if isinstance(answer, dict) else None
    if outcome == "adopted":
        await _finish(m, s)
    elif outcome == "aborted":
        _undo(m, s)
    else:
        raise ReversePending(name=name, api=peer.api, why=f"unexpected answer {answer!r}")
    return str(outcome)


async def settle_now(m: SessionManager, name: str) -> None:
    s = m.get(name)
    async with s.operation():
        if name in m.pending:
            await _settle(m, s)


async def settle_at_start(m: SessionManager, name: str) -> None:
    """At start-up: a reverse the last run did not settle. The source stays guarded until it is."""
    try:
        await settle_now(m, name)
    except DeltavolError as exc:
        log.error("session %s: %s", name, exc.message)
    except Exception:
        log.exception("session %s: settling its reverse failed", name)


# --- between two deltavol servers: the side that takes the session ----------------------------
def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise UsageError(msg=f"field {key!r} is required (text)")
    return value


def _number(body: dict[str, Any], key: str, required: bool = True) -> int | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(msg=f"field {key!r} is required (a whole number)")
    if not 1 <= value < 1 << 63:  # each a size, rate, interval or id: positive, fits its column
        raise UsageError(msg=f"field {key!r} must be from 1 to 2**63-1, not {value}")
    return value


def _tracking(body: dict[str, Any], size: int, granularity: int) -> Bitmap:
    """The peer's tracking bits: base64, zlib-compressed when ``tracking_encoding`` says so
    (never inflated past the bitmap's size), one bit per chunk of the volume, no more."""
    encoding = body.get("tracking_encoding")
    if encoding not in (None, "zlib"):
        raise UsageError(msg=f"field 'tracking_encoding' must be 'zlib' or absent, not {encoding!r}")
    nbits = -(-size // granularity)
    expected = (nbits + 7) // 8
    try:
        raw = base64.b64decode(_text(body, "tracking"), validate=True)
        if encoding == "zlib":
            inflate = zlib.decompressobj()
            raw = inflate.decompress(raw, expected + 1)
            if not inflate.eof or inflate.unconsumed_tail:
                raise ValueError(f"more than the {expected} bytes of this volume's bitmap, or cut short")
        if len(raw) == expected and nbits % 8 and raw[-1] >> (nbits % 8):
            raise ValueError(f"bits set past the volume's last chunk ({nbits} chunks)")
        return Bitmap.from_bytes(size, granularity, raw)
    except (ValueError, binascii.Error, zlib.error) as exc:
        raise UsageError(msg=f"field 'tracking' is not a bitmap of this volume: {exc}") from exc


def _outcome(m: SessionManager, request: str) -> str | None:
    row = m.db.conn.execute("SELECT outcome FROM adoptions WHERE request = ?", (request,)).fetchone()
    return None if row is None else str(row[0])


async def adopt(m: SessionManager, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """``POST /v1/peer/reversals``: take over a peer's session (step 2 of the exchange).
    Returns the session's status, and whether it is new (False: the same request again)."""
    from deltavol.sessions.manager import check_granularity

    request = _text(body, "request")
    name = check_name(_text(body, "name"), "session")
    done = _outcome(m, request)
    if done == "adopted" and name in m._sessions:
        return m._sessions[name].status(), False
    if done is not None:
        raise Conflict(msg=f"reverse request {request} was settled as {done}: start a new reverse")
    source, target = _text(body, "source"), _text(body, "target")
    guard, target_guard = _text(body, "guard"), _text(body, "target_guard")
    granularity = check_granularity(_number(body, "granularity") or 0)
    if not is_uri(target):
        raise UsageError(msg=f"field 'target' must be an NBD URI, not {target!r}")
    vol = m.volumes.get(source)
    if vol.peer_guard is None or not vol.peer_guard.admits(guard):
        raise Protected(name=source, why="it is not the target of the session that asks to reverse")
    m.check_not_removing(name)
    if name in m._sessions or name in m._creating or name in m._unloaded or name in m._reversing:
        raise AlreadyExists(kind="session", name=name)
    if _number(body, "size") != vol.size:
        raise UsageError(msg=f"volume {source!r} is {vol.size} bytes, the peer's source {body.get('size')}")
    tracking = _tracking(body, vol.size, granularity)
    them, back = body.get("peer"), body.get("back")
    if not isinstance(them, dict) or not isinstance(back, dict):
        raise UsageError(msg="fields 'peer' and 'back' are required (objects)")
    certs = m.config.tls_certificates
    peer = Peer(
        api=_text(them, "api"),
        token=them.get("token") if isinstance(them.get("token"), str) else None,
        certificates=str(certs) if certs is not None else None,
        guard=target_guard,
        back_api=_text(back, "api"),
        back_target=_text(back, "target"),
    )
    point_in_time = body.get("point_in_time")
    if not isinstance(point_in_time, str):  # checked before the session's wiring is made
        raise UsageError(msg="field 'point_in_time' is required (text)")
    next_update_id = _number(body, "next_update_id", required=False) or 1
    s = m._new(
        name,
        vol,
        target,
        granularity,
        max_rate=_number(body, "max_rate", required=False),
        every=_number(body, "every", required=False),
    )
    s.state = State.IDLE
    s.consistent = False  # its target is no image of its source: the first update is incremental
    s.point_in_time = point_in_time
    if isinstance(body.get("created_at"), str):
        s.created_at = body["created_at"]
    s.next_update_id = next_update_id
    # no await since the name's check: from here until the commit (or failure) the name is
    # this adoption's, so that no create of it writes (or loses) files of that name meanwhile
    m._creating[name] = (source, target)
    committed = False
    try:
        m.peer_files.save(name, peer)  # before the row: garbage if it never commits
        await _probe(m, name, target, peer, vol.size)
        async with vol.gate.closed():  # no change passes between the guard's end and tracking
            if name in m._sessions or name in m._reversing:
                raise AlreadyExists(kind="session", name=name)
            if vol.peer_guard is None or not vol.peer_guard.admits(guard):
                raise Protected(name=source, why="its guard changed meanwhile")
            s.tracking = tracking
            s.create_files()  # the tracking file holds the peer's bits, durably
            peers.fault("adopt-before-commit")
            with m.db.transaction() as conn:  # the commit point
                row = conn.execute("SELECT outcome FROM adoptions WHERE request = ?", (request,)).fetchone()
                if row is not None:
                    raise Conflict(msg=f"reverse request {request} was settled as {row[0]} meanwhile")
                m.write_row(conn, s)
                conn.execute("DELETE FROM guards WHERE volume = ?", (source,))
                conn.execute("INSERT INTO adoptions VALUES (?, ?, 'adopted')", (request, name))
            committed = True
            vol.peer_guard = None
            m.peers[name] = peer
            m._sessions[name] = s
            m._attach(s)
    finally:
        del m._creating[name]
        if not committed:
            s.delete_files()
            m.peer_files.delete(name)
            m._drop_unused_wiring(vol)
    log.info("session %s: taken over from %s: %s -> %s (request %s)", name, peer.api, source, target, request)
    m.events.publish("session.reversed", name=name, source=source, target=target, peer=peer.api)
    return s.status(), True


async def _probe(m: SessionManager, name: str, target: str, peer: Peer, size: int) -> None:
    """The session's new target opens, through its guard, writable and of the source's size:
    a session this server could not copy is not taken (409: the peer keeps it)."""
    try:
        probe = await m.nbd_target(target, peer).open()
    except TargetError as exc:
        raise Conflict(msg=f"session {name!r}: cannot write its target from here: {exc.message}") from exc
    try:
        if probe.size != size:
            raise Conflict(msg=f"session {name!r}: its target {target} is {probe.size} bytes, not {size}")
    finally:
        await probe.close()


def settle_request(m: SessionManager, request: str) -> dict[str, Any]:
    """``POST /v1/peer/reversals/ID/settle``: how a request ended. One not adopted is
    recorded as aborted, for good, in the same step: it is never adopted later."""
    with m.db.transaction() as conn:
        row = conn.execute("SELECT outcome FROM adoptions WHERE request = ?", (request,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO adoptions VALUES (?, '', 'aborted')", (request,))
            outcome = "aborted"
        else:
            outcome = str(row[0])
    log.info("reverse request %s settled: %s", request, outcome)
    return {"request": request, "outcome": outcome}


MAX_HOLDER = 200  # characters of a guard's holder (shown by ``volume info``)


def check_holder(holder: str) -> str:
    if not holder or len(holder) > MAX_HOLDER or not holder.isprintable():
        raise UsageError(msg=f"field 'holder' must be printable text of 1 to {MAX_HOLDER} characters")
    return holder


async def put_guard(
    m: SessionManager, volume: str, holder: str, secret: str, current: str | None = None
) -> dict[str, Any]:
    """``PUT /v1/peer/guards/VOLUME``: the volume becomes the target of ``holder``. Only a
    volume the administrator made a peer target may be guarded. A guard that stands is
    replaced only by who shows its secret (``current``: a create retried after a crash),
    and only once no connection opened with the old secret is left; the same guard again
    (same holder and secret) is no change. The guard goes up with the volume's gate
    closed: a change that passed the gate under the old guard (or none) has landed, and
    none passes it under the old one after."""
    check_holder(holder)
    vol = m.volumes.get(volume)
    guard = vol.peer_guard
    if guard is not None and guard.holder == holder and guard.admits(secret):
        return {"volume": volume, "guarded_by": holder}
    _check_guardable(m, vol, holder, current)
    async with vol.gate.closed():
        if m.volumes.find(volume) is not vol:  # removed meanwhile
            raise NotFound(kind="volume", name=volume)
        if vol.peer_guard is not guard:
            raise InUse(kind="volume", name=volume, why="its guard changed meanwhile: try again")
        _check_guardable(m, vol, holder, current)  # a connection may have come meanwhile
        sha = secret_sha256(secret)
        with m.db.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO guards VALUES (?, ?, ?)", (volume, holder, sha))
        vol.peer_guard = PeerGuard(holder, sha)
    log.info("volume %s: guarded: it is the target of %s", volume, holder)
    return {"volume": volume, "guarded_by": holder}


def _check_guardable(m: SessionManager, vol: Volume, holder: str, current: str | None) -> None:
    """Why ``holder`` may not put a new guard on ``vol`` now (raised), if it may not."""
    guard = vol.peer_guard
    if guard is not None:
        if current is None or guard.holder != holder or not guard.admits(current):
            raise InUse(kind="volume", name=vol.name, why=str(vol.why_guarded()))
        if vol.connections:  # the old copier's: its writes would land after the new guard's copy
            why = f"{vol.connections} NBD connection(s) with its current guard open: close them first"
            raise InUse(kind="volume", name=vol.name, why=why)
        return
    if not vol.peer_target:
        why = "it is no peer target: on its server, run 'deltavol volume peer-target' first"
        raise Protected(name=vol.name, why=why)
    busy = m.volume_busy(vol)
    if busy is not None:
        raise InUse(kind="volume", name=vol.name, why=busy)
    if vol.connections:
        why = f"{vol.connections} NBD connection(s) open: disconnect them first"
        raise InUse(kind="volume", name=vol.name, why=why)


def unguard(m: SessionManager, volume: str) -> dict[str, Any]:
    """``DELETE /v1/volumes/VOLUME/guard`` (``volume unguard``, the administrator's way, with
    the API token): drop a guard without its secret, when its holder cannot (its host is lost).
    A guard this server holds for a reverse not settled yet is kept: settle that first."""
    vol = m.volumes.get(volume)
    guard = vol.peer_guard
    if guard is None:
        return {"volume": volume, "was": None}
    for name in m.pending:
        s = m._sessions.get(name)
        if s is not None and s.source is vol and name in m.peers:
            raise ReversePending(name=name, api=m.peers[name].api, why="the guard is part of it")
    with m.db.transaction() as conn:
        conn.execute("DELETE FROM guards WHERE volume = ?", (volume,))
    vol.peer_guard = None
    log.warning("volume %s: guard of %s dropped by the administrator", volume, guard.holder)
    return {"volume": volume, "was": guard.holder}


async def drop_guard(m: SessionManager, volume: str, secret: str) -> dict[str, Any]:
    """``DELETE /v1/peer/guards/VOLUME``: only with the guard's secret; no guard is no error.
    The guard goes with the volume's gate closed: a write of its holder's connections that
    passed the gate has landed when this returns, and none passes it after (they are
    read-only from then on), so that none lands over what a next writer writes."""
    vol = m.volumes.get(volume)
    if vol.peer_guard is None:
        return {"volume": volume, "dropped": False}
    if not vol.peer_guard.admits(secret):
        raise Protected(name=volume, why="that is not the secret of its guard")
    async with vol.gate.closed():
        guard = vol.peer_guard
        if guard is None or not guard.admits(secret):  # dropped or replaced meanwhile
            return {"volume": volume, "dropped": False}
        with m.db.transaction() as conn:
            conn.execute("DELETE FROM guards WHERE volume = ?", (volume,))
        vol.peer_guard = None
    log.info("volume %s: guard dropped", volume)
    return {"volume": volume, "dropped": True}

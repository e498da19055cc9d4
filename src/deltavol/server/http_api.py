"""The control API: JSON over HTTP on a unix socket (and TCP with a bearer token when
asked). Routes only translate; the work is in ``Service``. Errors leave as
``{"error": {"code", "message"}}`` with the status their class carries.

Beside the JSON routes: ``GET /metrics`` (Prometheus text format, ``deltavol.metrics``),
``GET /v1/events`` (Server-Sent Events from the service's event bus) and the dashboard's
static files at ``/``. Over TCP the static files need no token (they hold no data: the page
asks for the token); ``/v1/events`` also takes it as ``?token=``, since a browser's
EventSource cannot send a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from deltavol import metrics
from deltavol.errors import DeltavolError, PayloadTooLarge, UsageError
from deltavol.events import Event
from deltavol.service import Service
from deltavol.sessions.peers import Peer
from deltavol.units import parse_interval, parse_rate, parse_size

log = logging.getLogger("deltavol.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVICE: web.AppKey[Service] = web.AppKey("service", Service)
TOKEN: web.AppKey[str | None] = web.AppKey("token", str)
PEER_TOKEN: web.AppKey[str | None] = web.AppKey("peer_token", str)
PEER_PATHS = "/v1/peer/"  # the calls of another deltavol server: its peer token is enough
LAG: web.AppKey[metrics.LoopLag] = web.AppKey("lag", metrics.LoopLag)
REGISTRY: web.AppKey[Any] = web.AppKey("registry", object)
STOPPING: web.AppKey[asyncio.Event] = web.AppKey("stopping", asyncio.Event)
DASHBOARD = Path(__file__).with_name("dashboard")
HEARTBEAT = 15.0  # seconds between two comments on an idle event stream (keeps proxies from closing it)
OPEN_PATHS = ("/", "/dashboard/")  # served over TCP without a token


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[TOKEN]
    tcp = _tcp(request)
    open_path = request.path == "/" or request.path.startswith(OPEN_PATHS[1])
    if token is not None and tcp and not open_path and not _token_ok(request, token):
        peer_token = request.app[PEER_TOKEN]
        peer_path = request.path.startswith(PEER_PATHS)
        if not (peer_token is not None and peer_path and _token_ok(request, peer_token)):
            return _error(401, "Unauthorized", "missing or wrong API token")
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except DeltavolError as exc:
        return web.json_response(exc.to_json(), status=exc.http_status)
    except Exception as exc:
        log.exception("api: %s %s failed", request.method, request.path)
        return _error(500, "InternalError", f"internal error: {exc}")


def _tcp(request: web.Request) -> bool:
    return request.transport is not None and isinstance(request.transport.get_extra_info("peername"), tuple)


def _token_ok(request: web.Request, token: str) -> bool:
    got = request.headers.get("Authorization", "")
    if request.path == "/v1/events" and "token" in request.query:
        got = f"Bearer {request.query['token']}"
    try:
        given = got.encode()
    except UnicodeError:  # not text at all (surrogate-escaped bytes): not the token either
        return False
    return hmac.compare_digest(given, f"Bearer {token}".encode())


async def _body(request: web.Request, cap: int | None = None) -> dict[str, Any]:
    """The JSON object of the request; with ``cap``, read here up to that many bytes instead
    of aiohttp's own limit (``client_max_size``, 1 MiB)."""
    try:
        if cap is None:
            body = await request.json()
        else:
            raw = bytearray()
            while chunk := await request.content.read(1 << 20):
                raw += chunk
                if len(raw) > cap:
                    raise PayloadTooLarge(size=len(raw), cap=cap)
            body = json.loads(raw)
    except ValueError:
        raise UsageError(msg="request body is not JSON") from None
    if not isinstance(body, dict):
        raise UsageError(msg="request body must be a JSON object")
    return body


def _reversal_cap(service: Service) -> int:
    """A reverse's body holds a tracking bitmap in base64: room for the largest volume's at
    the smallest granularity (the bits are sent compressed, this is the worst case)."""
    from deltavol.sessions.manager import MIN_GRANULARITY

    largest = max((v.size for v in service.volumes.all()), default=0)
    bitmap = -(-largest // MIN_GRANULARITY) // 8 + 1
    return (1 << 20) + bitmap * 4 // 3 + 4


def _field(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UsageError(msg=f"field {key!r} is required ({kind.__name__})")
    return value


def _optional(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise UsageError(msg=f"field {key!r} must be text")
    return value


def routes(service: Service) -> web.RouteTableDef:
    r = web.RouteTableDef()

    @r.get("/v1/server")
    async def server_info(request: web.Request) -> web.Response:
        return web.json_response({"warnings": service.warnings})

    @r.get("/v1/volumes")
    async def list_volumes(request: web.Request) -> web.Response:
        return web.json_response(service.list_volumes())

    @r.post("/v1/volumes")
    async def create_volume(request: web.Request) -> web.Response:
        body = await _body(request)
        name = _field(body, "name", str)
        if "path" in body:
            info = service.import_volume(name, _field(body, "path", str))
        elif "from_session" in body:
            info = await service.create_volume_from_session(name, _field(body, "from_session", str))
        else:
            size = body.get("size")
            if not isinstance(size, int | str) or isinstance(size, bool):
                raise UsageError(msg="field 'size' is required (bytes or a size such as 4GiB)")
            peer_target = body.get("peer_target", False)
            if not isinstance(peer_target, bool):
                raise UsageError(msg="field 'peer_target' must be true or false")
            info = service.create_volume(name, parse_size(size), peer_target)
        return web.json_response(info, status=201)

    @r.get("/v1/volumes/{name}")
    async def volume_info(request: web.Request) -> web.Response:
        return web.json_response(service.volume_info(request.match_info["name"]))

    @r.put("/v1/volumes/{name}/peer-target")
    async def peer_target(request: web.Request) -> web.Response:
        body = await _body(request)
        on = body.get("enabled")
        if not isinstance(on, bool):
            raise UsageError(msg="field 'enabled' is required (true or false)")
        return web.json_response(service.set_peer_target(request.match_info["name"], on))

    @r.delete("/v1/volumes/{name}")
    async def remove_volume(request: web.Request) -> web.Response:
        await service.remove_volume(request.match_info["name"])
        return web.json_response({"removed": request.match_info["name"]})

    @r.get("/v1/sessions")
    async def list_sessions(request: web.Request) -> web.Response:
        return web.json_response(service.list_sessions())

    @r.post("/v1/sessions")
    async def create_session(request: web.Request) -> web.Response:
        body = await _body(request)
        granularity = body.get("granularity", "64KiB")
        peer = None
        if body.get("peer_api") is not None:
            peer = Peer(
                api=_field(body, "peer_api", str),
                token=_optional(body, "peer_token"),
                certificates=_optional(body, "peer_certificates"),
                back_api=_optional(body, "reverse_api"),
                back_target=_optional(body, "reverse_target"),
            )
        elif any(body.get(k) is not None for k in ("peer_token", "reverse_api", "reverse_target")):
            raise UsageError(msg="peer_token, reverse_api and reverse_target need peer_api")
        info = await service.create_session(
            name=_field(body, "name", str),
            source=_field(body, "source", str),
            target=_field(body, "target", str),
            granularity=parse_size(granularity),
            max_rate=parse_rate(body.get("max_rate")),
            every=parse_interval(body.get("every")),
            peer=peer,
        )
        return web.json_response(info, status=201)

    @r.get("/v1/sessions/{name}/tracking")
    async def session_tracking(request: web.Request) -> web.Response:
        bits, headers = service.session_tracking(request.match_info["name"])
        return web.Response(body=bits, content_type="application/octet-stream", headers=headers)

    @r.delete("/v1/volumes/{name}/guard")
    async def unguard_volume(request: web.Request) -> web.Response:
        return web.json_response(service.unguard(request.match_info["name"]))

    @r.put("/v1/peer/guards/{volume}")
    async def put_guard(request: web.Request) -> web.Response:
        body = await _body(request)
        info = await service.put_guard(
            request.match_info["volume"],
            _field(body, "holder", str),
            _field(body, "secret", str),
            _optional(body, "current"),
        )
        return web.json_response(info)

    @r.delete("/v1/peer/guards/{volume}")
    async def drop_guard(request: web.Request) -> web.Response:
        body = await _body(request)
        secret = _field(body, "secret", str)
        return web.json_response(await service.drop_guard(request.match_info["volume"], secret))

    @r.post("/v1/peer/reversals")
    async def adopt_session(request: web.Request) -> web.Response:
        body = await _body(request, cap=_reversal_cap(service))
        info, new = await service.adopt_session(body)
        return web.json_response(info, status=201 if new else 200)

    @r.post("/v1/peer/reversals/{request}/settle")
    async def settle_reversal(request: web.Request) -> web.Response:
        return web.json_response(service.settle_reversal(request.match_info["request"]))

    @r.get("/v1/sessions/{name}")
    async def session_status(request: web.Request) -> web.Response:
        return web.json_response(service.session_status(request.match_info["name"]))

    @r.delete("/v1/sessions/{name}")
    async def remove_session(request: web.Request) -> web.Response:
        await service.remove_session(request.match_info["name"])
        return web.json_response({"removed": request.match_info["name"]})

    @r.post("/v1/sessions/{name}/update")
    async def update_session(request: web.Request) -> web.Response:
        body = await _body(request) if request.can_read_body else {}
        info = await service.update_session(
            request.match_info["name"],
            full=bool(body.get("full", False)),
            max_rate=parse_rate(body.get("max_rate")),
        )
        return web.json_response(info)

    @r.get("/v1/sessions/{name}/bitmaps")
    async def session_bitmaps(request: web.Request) -> web.Response:
        try:
            cells = int(request.query.get("cells", "1024"))
        except ValueError:
            raise UsageError(msg="cells must be a whole number") from None
        return web.json_response(service.session_bitmaps(request.match_info["name"], cells))

    @r.post("/v1/sessions/{name}/{action:pause|resume|cancel|verify|restore|reverse}")
    async def session_action(request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        if action == "reverse":
            body = await _body(request) if request.can_read_body else {}
            back_api, back_target = _optional(body, "reverse_api"), _optional(body, "reverse_target")
            return web.json_response(await service.reverse_session(name, back_api, back_target))
        do = {
            "pause": service.pause_session,
            "resume": service.resume_session,
            "cancel": service.cancel_session,
            "verify": service.verify_session,
            "restore": service.restore_session,
            "reverse": service.reverse_session,
        }[action]
        return web.json_response(await do(name))

    @r.get("/metrics")
    async def prometheus(request: web.Request) -> web.Response:
        body = metrics.exposition(request.app[REGISTRY])
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    @r.get("/v1/events")
    async def events(request: web.Request) -> web.StreamResponse:
        return await _event_stream(request, service)

    @r.get("/")
    async def dashboard(request: web.Request) -> web.FileResponse:
        return web.FileResponse(DASHBOARD / "index.html")

    @r.get("/dashboard/config.json")
    async def dashboard_config(request: web.Request) -> web.Response:
        """Whether the page must ask for the token (asked over TCP only): it learns it here
        rather than from a refused request."""
        return web.json_response({"token_required": request.app[TOKEN] is not None and _tcp(request)})

    return r


def _last_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("since")
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(msg=f"Last-Event-ID must be an event id (a whole number), not {raw!r}") from None
    if value < 0:
        raise UsageError(msg=f"Last-Event-ID must not be negative ({value})")
    return value


def _sse(event: Event) -> bytes:
    # the SSE id is the event's; in ``data`` it is ``event_id`` (``id`` there is an update's)
    body = {"event_id": event.id, "kind": event.kind, "at": event.at, **event.data}
    data = json.dumps(body, separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n".encode()


async def _event_stream(request: web.Request, service: Service) -> web.StreamResponse:
    """Server-Sent Events: every event of the bus from now on; with ``Last-Event-ID`` (or
    ``?since=ID``) first the kept ones after it, and a ``gap`` event if some were let go.
    The first bytes are a comment naming the last id, sent once the stream is subscribed:
    a client that reads them misses nothing published after. Ids begin again at 1 when the
    server starts: a Last-Event-ID beyond the last one is of an earlier run, answered with
    ``gap`` and every kept event. A subscriber too slow to keep
    up is dropped by the bus: the stream says ``gap`` and ends, and the client reconnects
    with its last id."""
    bus = service.events
    last = _last_id(request)
    stopping = request.app[STOPPING]
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    with bus.subscribe() as sub:
        await resp.prepare(request)
        sent = bus.last_id
        await resp.write(f": deltavol events, last id {sent}\nretry: 1000\n\n".encode())
        if last is not None and last > sent:  # an id of an earlier run: ids began again
            await resp.write(_gap(last, 1))
            last = 0
        if last is not None:
            missed, gap = bus.since(last)
            if gap:
                await resp.write(_gap(last, missed[0].id if missed else bus.last_id + 1))
            for kept in missed:
                if kept.id <= sent:
                    await resp.write(_sse(kept))
        # what the subscription got meanwhile and was replayed already is skipped by id
        floor = sent if last is None else max(sent, last)
        stop = asyncio.ensure_future(stopping.wait())
        get: asyncio.Future[Event | None] | None = None
        try:
            while not stopping.is_set():
                get = asyncio.ensure_future(sub.queue.get())
                done, _ = await asyncio.wait(
                    {get, stop}, timeout=HEARTBEAT, return_when=asyncio.FIRST_COMPLETED
                )
                if get not in done:
                    get.cancel()
                    if not done:
                        await resp.write(b": heartbeat\n\n")
                    continue
                event = get.result()
                if event is None:  # dropped: too slow
                    await resp.write(_gap(floor, bus.last_id))
                    break
                if event.id > floor:
                    await resp.write(_sse(event))
                    floor = event.id
        except ConnectionResetError:
            return resp  # the client went away
        finally:
            stop.cancel()
            if get is not None:
                get.cancel()
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


def _gap(after: int, next_id: int) -> bytes:
    data = json.dumps(
        {"kind": "gap", "after": after, "next": next_id, "message": "events were missed: reload the state"}
    )
    return f"event: gap\ndata: {data}\n\n".encode()


def make_app(service: Service, token: str | None = None, peer_token: str | None = None) -> web.Application:
    app = web.Application(middlewares=[errors])
    app[SERVICE] = service
    app[TOKEN] = token
    app[PEER_TOKEN] = peer_token
    app[LAG] = lag = metrics.LoopLag()
    app[REGISTRY] = metrics.registry(service, lag)
    app[STOPPING] = asyncio.Event()
    app.add_routes(routes(service))
    app.router.add_static("/dashboard/", DASHBOARD)
    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
    app.on_cleanup.append(_cleanup)
    return app


async def _startup(app: web.Application) -> None:
    app[LAG].start()


async def _shutdown(app: web.Application) -> None:
    app[STOPPING].set()  # event streams end, so that the server does not wait for them


async def _cleanup(app: web.Application) -> None:
    await app[LAG].stop()

"""The control API: JSON over HTTP on a unix socket (and TCP with a bearer token when
asked). Routes only translate; the work is in ``Service``. Errors leave as
``{"error": {"code", "message"}}`` with the status their class carries.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from deltavol.errors import DeltavolError, UsageError
from deltavol.service import Service
from deltavol.units import parse_interval, parse_rate, parse_size

log = logging.getLogger("deltavol.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVICE: web.AppKey[Service] = web.AppKey("service", Service)
TOKEN: web.AppKey[str | None] = web.AppKey("token", str)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[TOKEN]
    tcp = request.transport is not None and isinstance(request.transport.get_extra_info("peername"), tuple)
    if token is not None and tcp and not _token_ok(request, token):
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


def _token_ok(request: web.Request, token: str) -> bool:
    got = request.headers.get("Authorization", "")
    return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise UsageError(msg="request body is not JSON") from None
    if not isinstance(body, dict):
        raise UsageError(msg="request body must be a JSON object")
    return body


def _field(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UsageError(msg=f"field {key!r} is required ({kind.__name__})")
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
        else:
            size = body.get("size")
            if not isinstance(size, int | str) or isinstance(size, bool):
                raise UsageError(msg="field 'size' is required (bytes or a size such as 4GiB)")
            info = service.create_volume(name, parse_size(size))
        return web.json_response(info, status=201)

    @r.get("/v1/volumes/{name}")
    async def volume_info(request: web.Request) -> web.Response:
        return web.json_response(service.volume_info(request.match_info["name"]))

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
        info = await service.create_session(
            name=_field(body, "name", str),
            source=_field(body, "source", str),
            target=_field(body, "target", str),
            granularity=parse_size(granularity),
            max_rate=parse_rate(body.get("max_rate")),
            every=parse_interval(body.get("every")),
        )
        return web.json_response(info, status=201)

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

    @r.post("/v1/sessions/{name}/{action:pause|resume|cancel|verify}")
    async def session_action(request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        do = {
            "pause": service.pause_session,
            "resume": service.resume_session,
            "cancel": service.cancel_session,
            "verify": service.verify_session,
        }[action]
        return web.json_response(await do(name))

    return r


def make_app(service: Service, token: str | None = None) -> web.Application:
    app = web.Application(middlewares=[errors])
    app[SERVICE] = service
    app[TOKEN] = token
    app.add_routes(routes(service))
    return app

"""The control API in-process: aiohttp's test client against ``make_app`` over a real
``Service`` on a fresh data dir. What each route does to the data dir, the status and
error class of each refusal, and that a refusal changes nothing."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from deltavol.config import ServerConfig
from deltavol.server.http_api import make_app
from deltavol.service import Service
from deltavol.store.datadir import DataDir

MiB = 1 << 20
TOKEN = "s3cret"
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    dd = DataDir(tmp_path / "data")
    svc = Service(dd.open(), dd, ServerConfig(data_dir=dd.root, nbd_tcp=None, save_limit=4 * MiB))
    svc.load()
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()
        dd.close()


async def client_of(service: Service, token: str | None = None) -> Client:
    client = TestClient(TestServer(make_app(service, token)))
    await client.start_server()
    return client


@pytest.fixture
async def api(service: Service) -> AsyncIterator[Client]:
    client = await client_of(service)
    try:
        yield client
    finally:
        await client.close()


async def call(api: Client, method: str, path: str, status: int, **kw: Any) -> Any:
    resp = await api.request(method, path, **kw)
    body = await resp.json()
    assert resp.status == status, body
    return body


def error_of(body: Any) -> tuple[str, str]:
    return body["error"]["code"], body["error"]["message"]


def volume_files(service: Service) -> list[str]:
    return sorted(p.name for p in service.volumes.images.iterdir())


async def test_a_volume_is_created_listed_shown_and_removed(api: Client, service: Service) -> None:
    info = await call(api, "POST", "/v1/volumes", 201, json={"name": "a", "size": "1MiB"})
    assert info["name"] == "a" and info["size"] == MiB
    path = Path(info["path"])
    assert path.stat().st_size == MiB and path.stat().st_blocks == 0, "not a sparse image of the size asked"
    assert [v["name"] for v in await call(api, "GET", "/v1/volumes", 200)] == ["a"]
    assert (await call(api, "GET", "/v1/volumes/a", 200))["path"] == str(path)
    assert await call(api, "DELETE", "/v1/volumes/a", 200) == {"removed": "a"}
    assert not path.exists()
    assert await call(api, "GET", "/v1/volumes", 200) == []


@pytest.mark.parametrize(
    "body, code, words",
    [
        ({"name": "a", "size": 1000}, "InvalidSize", "multiple of 512"),
        ({"name": "a", "size": "12XB"}, "InvalidSize", "expected a number"),
        ({"name": "a", "size": True}, "UsageError", "field 'size' is required"),
        ({"name": "a"}, "UsageError", "field 'size' is required"),
        ({"size": MiB}, "UsageError", "field 'name' is required"),
        ({"name": "a b", "size": MiB}, "InvalidName", "no spaces"),
        ({"name": "../a", "size": MiB}, "InvalidName", "'/'"),
        ([1, 2], "UsageError", "must be a JSON object"),
    ],
)
async def test_a_bad_volume_request_is_a_400_and_creates_nothing(
    api: Client,
    service: Service,
    body: Any,
    code: str,
    words: str,
) -> None:
    got = await call(api, "POST", "/v1/volumes", 400, json=body)
    assert error_of(got)[0] == code and words in error_of(got)[1], got
    assert await call(api, "GET", "/v1/volumes", 200) == []
    assert volume_files(service) == []


async def test_a_body_that_is_not_json_is_a_400(api: Client) -> None:
    got = await call(api, "POST", "/v1/volumes", 400, data=b"name=a")
    assert error_of(got) == ("UsageError", "request body is not JSON")


async def test_a_volume_that_exists_is_a_409_and_keeps_its_data(api: Client, service: Service) -> None:
    info = await call(api, "POST", "/v1/volumes", 201, json={"name": "a", "size": MiB})
    await service.volumes.get("a").export.pwrite(0, b"x" * 4096)
    got = await call(api, "POST", "/v1/volumes", 409, json={"name": "a", "size": 2 * MiB})
    assert error_of(got)[0] == "AlreadyExists"
    assert Path(info["path"]).stat().st_size == MiB
    assert await service.volumes.get("a").export.pread(0, 4096) == b"x" * 4096


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/volumes/nope"),
        ("DELETE", "/v1/volumes/nope"),
        ("GET", "/v1/sessions/nope"),
        ("DELETE", "/v1/sessions/nope"),
        ("POST", "/v1/sessions/nope/update"),
        ("POST", "/v1/sessions/nope/pause"),
        ("POST", "/v1/sessions/nope/resume"),
        ("POST", "/v1/sessions/nope/cancel"),
        ("POST", "/v1/sessions/nope/verify"),
    ],
)
async def test_what_does_not_exist_is_a_404(api: Client, method: str, path: str) -> None:
    got = await call(api, method, path, 404)
    assert error_of(got)[0] == "NotFound" and "'nope' does not exist" in error_of(got)[1]


async def test_an_update_through_the_api_leaves_the_target_an_exact_copy(
    api: Client,
    service: Service,
) -> None:
    for name in ("src", "dst"):
        await call(api, "POST", "/v1/volumes", 201, json={"name": name, "size": "4MiB"})
    src = service.volumes.get("src").export
    await src.pwrite(0, bytes(range(256)) * 4096)  # 1 MiB
    await src.pwrite(3 * MiB, b"\xab" * MiB)
    st = await call(api, "POST", "/v1/sessions", 201, json={"name": "s", "source": "src", "target": "dst"})
    assert st["state"] == "new" and not st["consistent"]
    assert (await call(api, "GET", "/v1/sessions", 200))[0]["name"] == "s"

    await call(api, "POST", "/v1/sessions/s/update", 200, json={"full": True})
    await service.sessions.get("s").wait()
    st = await call(api, "GET", "/v1/sessions/s", 200)
    assert st["state"] == "idle" and st["consistent"] and st["update"]["kind"] == "full", st
    image = Path(service.volumes.get("src").path).read_bytes()
    copy = Path(service.volumes.get("dst").path).read_bytes()
    assert hashlib.sha256(copy).digest() == hashlib.sha256(image).digest()

    await src.pwrite(MiB, b"\xcd" * 4096)  # one chunk changed: the next update is incremental
    await call(api, "POST", "/v1/sessions/s/update", 200)
    await service.sessions.get("s").wait()
    st = await call(api, "GET", "/v1/sessions/s", 200)
    assert st["update"]["kind"] == "incremental" and st["update"]["bytes_total"] == 64 * 1024, st
    assert Path(service.volumes.get("dst").path).read_bytes()[MiB : MiB + 4096] == b"\xcd" * 4096
    verified = await call(api, "POST", "/v1/sessions/s/verify", 200)
    assert verified["ok"] and verified["mismatches"] == 0 and verified["chunks_compared"] > 0, verified


async def test_a_volume_in_a_session_is_not_removed(api: Client, service: Service) -> None:
    for name in ("src", "dst"):
        await call(api, "POST", "/v1/volumes", 201, json={"name": name, "size": MiB})
    await call(api, "POST", "/v1/sessions", 201, json={"name": "s", "source": "src", "target": "dst"})
    for name in ("src", "dst"):
        got = await call(api, "DELETE", f"/v1/volumes/{name}", 409)
        assert error_of(got)[0] == "InUse"
        assert Path(service.volumes.get(name).path).exists()
    got = await call(api, "POST", "/v1/sessions", 409, json={"name": "s", "source": "src", "target": "dst"})
    assert error_of(got)[0] == "AlreadyExists"
    got = await call(api, "POST", "/v1/sessions/s/resume", 409)
    assert error_of(got)[0] in ("IllegalTransition", "NothingToResume"), got
    assert await call(api, "DELETE", "/v1/sessions/s", 200) == {"removed": "s"}
    assert await call(api, "DELETE", "/v1/volumes/src", 200) == {"removed": "src"}


@pytest.mark.parametrize(
    "body, words",
    [
        ({"name": "s", "source": "src", "target": "dst", "granularity": "3KiB"}, "power of two"),
        ({"name": "s", "source": "src", "target": "dst", "every": "soon"}, "invalid interval"),
        ({"name": "s", "source": "src", "target": "dst", "max_rate": "fast"}, "invalid size"),
        ({"name": "s", "source": "src", "target": "src"}, "is the source volume"),
        ({"name": "s", "source": "src"}, "field 'target' is required"),
    ],
)
async def test_a_bad_session_request_is_a_400_and_creates_nothing(
    api: Client,
    service: Service,
    body: dict[str, Any],
    words: str,
) -> None:
    for name in ("src", "dst"):
        await call(api, "POST", "/v1/volumes", 201, json={"name": name, "size": MiB})
    got = await call(api, "POST", "/v1/sessions", 400, json=body)
    assert words in error_of(got)[1], got
    assert await call(api, "GET", "/v1/sessions", 200) == []
    assert list(service.sessions.all()) == []


async def test_over_tcp_a_token_is_required(service: Service) -> None:
    client = await client_of(service, TOKEN)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            got = await call(
                client, "POST", "/v1/volumes", 401, json={"name": "a", "size": MiB}, headers=headers
            )
            assert error_of(got) == ("Unauthorized", "missing or wrong API token")
        assert volume_files(service) == []
        ok = {"Authorization": f"Bearer {TOKEN}"}
        await call(client, "POST", "/v1/volumes", 201, json={"name": "a", "size": MiB}, headers=ok)
        assert [v["name"] for v in await call(client, "GET", "/v1/volumes", 200, headers=ok)] == ["a"]
    finally:
        await client.close()


async def test_an_unexpected_failure_is_a_500_with_a_message_not_a_traceback(
    api: Client,
    service: Service,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> list[dict[str, Any]]:
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(service, "list_volumes", broken)
    got = await call(api, "GET", "/v1/volumes", 500)
    assert error_of(got) == ("InternalError", "internal error: the disk caught fire")
    assert "Traceback" not in str(got)
    assert any("GET /v1/volumes failed" in r.getMessage() for r in caplog.records), "not logged"


async def test_an_imported_file_is_used_in_place_and_kept_on_removal(
    api: Client, service: Service, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x42" * MiB)
    info = await call(api, "POST", "/v1/volumes", 201, json={"name": "imp", "path": str(image)})
    assert (info["path"], info["size"], info["imported"]) == (str(image), MiB, True)
    export = service.volumes.get("imp").export
    assert await export.pread(0, 8) == b"\x42" * 8
    await export.pwrite(4096, b"\x07" * 512)
    await export.flush()
    got = await call(api, "POST", "/v1/volumes", 409, json={"name": "again", "path": str(image)})
    assert error_of(got)[0] == "InUse" and "already volume 'imp'" in error_of(got)[1]
    await call(api, "DELETE", "/v1/volumes/imp", 200)
    data = image.read_bytes()
    assert data[4096:4608] == b"\x07" * 512 and data[:4096] == b"\x42" * 4096, (
        "not used in place, or not kept"
    )


async def test_an_import_of_a_missing_path_is_404_and_of_a_directory_400(
    api: Client, service: Service, tmp_path: Path
) -> None:
    got = await call(api, "POST", "/v1/volumes", 404, json={"name": "imp", "path": str(tmp_path / "no")})
    assert error_of(got)[0] == "ImportPathNotFound" and "No such file" in error_of(got)[1]
    got = await call(api, "POST", "/v1/volumes", 400, json={"name": "imp", "path": str(tmp_path)})
    assert error_of(got)[0] == "ImportFailed" and "not a regular file" in error_of(got)[1]
    assert service.volumes.find("imp") is None

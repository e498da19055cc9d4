"""The ``deltavol`` command in-process: ``cli.main`` (argv in, exit code and output out)
against ``server.main.serve`` running in the test's event loop on a fresh data dir.

Exit codes: 0 done, 1 the operation failed (the message says what and why), 2 usage
error; never a traceback. A refusal changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deltavol.cli import main, serve_cmd
from deltavol.config import ServerConfig
from deltavol.server.main import serve
from deltavol.store.datadir import DataDir
from tests.fakes import until

MiB = 1 << 20


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)


class Cli:
    """``deltavol --data-dir ROOT ...`` run by ``main()`` in a thread, as a user's shell would
    (the CLI runs its own event loop: the server's goes on meanwhile)."""

    def __init__(
        self, root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.root = root
        self.capsys = capsys
        self.monkeypatch = monkeypatch

    async def __call__(self, *argv: str) -> Ran:
        self.monkeypatch.setattr(sys, "argv", ["deltavol", "--data-dir", str(self.root), *argv])

        def run() -> int:
            try:
                main()
            except SystemExit as exc:
                return exc.code if isinstance(exc.code, int) else 1
            raise AssertionError("main() returned without an exit code")

        code = await asyncio.to_thread(run)
        out, err = self.capsys.readouterr()
        assert "Traceback" not in out + err, err
        return Ran(code, out, err)


@contextlib.asynccontextmanager
async def running(config: ServerConfig, caplog: pytest.LogCaptureFixture) -> AsyncIterator[None]:
    """``serve(config)`` in this loop; stopped by SIGTERM, as a service manager stops it,
    and it must then return."""
    caplog.set_level(logging.INFO, logger="deltavol.server")
    server = asyncio.create_task(serve(config))
    # SIGTERM's handler is installed in the step that logs "ready"
    await until(lambda: server.done() or "server: ready" in caplog.text, "the server to be ready")
    if server.done():
        server.result()  # its error
    try:
        yield
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(30):
            await server
        assert "server: stopped" in caplog.text
        with socket.socket(socket.AF_UNIX) as s, pytest.raises(OSError):
            s.connect(str(config.data_dir / "api.sock"))  # the API is gone with it


@pytest.fixture(autouse=True)
def no_log_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_cmd, "setup_logging", lambda level: None)  # keep pytest's handlers


def config_in(tmp_path: Path, **kw: Any) -> ServerConfig:
    """NBD on a unix socket only."""
    nbd = str(tmp_path / "nbd.sock")
    return ServerConfig(data_dir=tmp_path / "data", nbd_tcp=None, nbd_socket=nbd, save_limit=4 * MiB, **kw)


@pytest.fixture
async def served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[ServerConfig]:
    config = config_in(tmp_path)
    async with running(config, caplog):
        yield config


@pytest.fixture
def deltavol(
    served: ServerConfig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Cli:
    return Cli(served.data_dir, capsys, monkeypatch)


async def test_volume_commands_exit_0_and_say_what_they_did(deltavol: Cli) -> None:
    ran = await deltavol("volume", "create", "a", "--size", "1MiB")
    assert (ran.code, ran.out) == (0, "created volume a (1.0 MiB)\n"), ran
    info = (await deltavol("volume", "info", "a", "--json")).json()
    assert info["name"] == "a" and info["size"] == MiB and Path(info["path"]).stat().st_size == MiB
    ran = await deltavol("volume", "list")
    header, row = ran.out.splitlines()
    assert header.split() == ["NAME", "SIZE", "ALLOCATED", "CONNS", "WRITTEN", "PATH"]
    assert row.split() == ["a", "1.0", "MiB", "0", "B", "0", "0", "B", info["path"]]
    ran = await deltavol("volume", "info", "a")
    assert ["path", info["path"]] in [line.split() for line in ran.out.splitlines()], ran.out
    ran = await deltavol("volume", "remove", "a")
    assert (ran.code, ran.out) == (0, "removed volume a\n")
    assert not Path(info["path"]).exists()
    assert (await deltavol("volume", "list", "--json")).json() == []


@pytest.mark.parametrize(
    "argv, words",
    [
        (["volume", "create", "a", "--size", "12XB"], "Invalid value for '--size'"),
        (["volume", "create", "a"], "give exactly one of --size and --from-session"),
        (
            ["volume", "create", "a", "--size", "1000"],
            "deltavol: invalid size 1000: must be a multiple of 512",
        ),
        (["volume", "create", "a b", "--size", "1MiB"], "deltavol: invalid name 'a b'"),
        (["volume", "frobnicate"], "No such command 'frobnicate'"),
        (["session", "create", "s", "--source", "a"], "Missing option '--target'"),
        (["session", "create", "s", "--source", "a", "--target", "b", "--every", "soon"], "invalid interval"),
    ],
)
async def test_a_usage_error_exits_2_and_changes_nothing(deltavol: Cli, argv: list[str], words: str) -> None:
    ran = await deltavol(*argv)
    assert ran.code == 2 and words in ran.err, ran
    assert (await deltavol("volume", "list", "--json")).json() == []
    assert (await deltavol("session", "list", "--json")).json() == []


async def test_a_failed_operation_exits_1_with_what_and_why(deltavol: Cli) -> None:
    ran = await deltavol("volume", "info", "nope")
    assert (ran.code, ran.err) == (1, "deltavol: volume 'nope' does not exist\n"), ran
    assert (await deltavol("volume", "create", "a", "--size", "1MiB")).code == 0
    ran = await deltavol("volume", "create", "a", "--size", "2MiB")
    assert ran.code == 1 and ran.err.startswith("deltavol: volume 'a' already exists"), ran
    assert (await deltavol("volume", "info", "a", "--json")).json()["size"] == MiB
    ran = await deltavol("session", "update", "nope")
    assert (ran.code, ran.err) == (1, "deltavol: session 'nope' does not exist\n"), ran


async def test_a_session_made_and_updated_by_the_cli_leaves_an_exact_copy(deltavol: Cli) -> None:
    for name in ("src", "dst"):
        assert (await deltavol("volume", "create", name, "--size", "4MiB")).code == 0
    src = Path((await deltavol("volume", "info", "src", "--json")).json()["path"])
    dst = Path((await deltavol("volume", "info", "dst", "--json")).json()["path"])
    with open(src, "r+b") as f:  # before any session: nothing to track yet
        f.write(bytes(range(256)) * 4096)
    ran = await deltavol("session", "create", "s", "--source", "src", "--target", "dst")
    assert (ran.code, ran.out) == (0, "created session s: src -> dst (granularity 64.0 KiB)\n"), ran
    ran = await deltavol("session", "update", "s", "--full", "--wait")
    assert ran.code == 0, ran
    st = (await deltavol("session", "status", "s", "--json")).json()
    assert st["state"] == "idle" and st["consistent"] and st["update"]["kind"] == "full", st
    assert dst.read_bytes() == src.read_bytes()
    ran = await deltavol("session", "verify", "s")
    assert ran.code == 0 and ran.out.startswith("session s: OK: 64 chunks compared"), ran
    ran = await deltavol("volume", "remove", "dst")
    assert ran.code == 1 and "deltavol: volume 'dst'" in ran.err, ran
    assert dst.exists()
    assert (await deltavol("session", "remove", "s")).out == "removed session s\n"


async def test_a_second_server_on_the_data_dir_exits_1_and_the_first_serves_on(deltavol: Cli) -> None:
    ran = await deltavol(
        "serve", "--data-dir", str(deltavol.root), "--nbd-socket", str(deltavol.root / "2.sock")
    )
    assert (
        ran.code == 1
        and ran.err
        == f"deltavol: data dir {deltavol.root} is in use by another deltavol server (pid {os.getpid()})\n"
    ), ran
    assert (await deltavol("volume", "list", "--json")).json() == []


def test_without_a_server_a_command_exits_1_saying_how_to_start_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["deltavol", "--data-dir", str(tmp_path), "volume", "list"])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert done.value.code == 1
    assert err == (
        f"deltavol: no deltavol server is running on {tmp_path / 'api.sock'} "
        f"(start one with: deltavol serve --data-dir {tmp_path})\n"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_over_tcp_the_cli_uses_the_token_the_server_wrote(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    config = config_in(tmp_path, api_tcp=("127.0.0.1", port))
    async with running(config, caplog):
        token = config.data_dir / "api.token"
        assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) >= 32
        deltavol = Cli(config.data_dir, capsys, monkeypatch)
        url = f"http://127.0.0.1:{port}"
        ran = await deltavol("--api-url", url, "volume", "create", "a", "--size", "1MiB")
        assert ran.code == 0, ran
        ran = await deltavol("--api-url", url, "--token", "wrong", "volume", "remove", "a")
        assert (ran.code, ran.err) == (1, "deltavol: missing or wrong API token\n"), ran
        assert [v["name"] for v in (await deltavol("--api-url", url, "volume", "list", "--json")).json()] == [
            "a"
        ]


def test_a_socket_that_cannot_be_made_exits_1_naming_it_and_frees_the_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = tmp_path / "no" / "such" / "nbd.sock"
    root = tmp_path / "data"
    monkeypatch.setattr(
        sys, "argv", ["deltavol", "serve", "--data-dir", str(root), "--nbd-socket", str(sock)]
    )
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err
    assert (done.value.code, err) == (1, f"deltavol: cannot listen on {sock}: No such file or directory\n")
    dd = DataDir(root)
    dd.open()  # not locked any more
    dd.close()

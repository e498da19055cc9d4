"""``deltavol serve`` options reach the server's configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from deltavol.cli import cli, serve_cmd
from deltavol.config import ServerConfig
from deltavol.errors import UsageError
from deltavol.server import main as server_main


@pytest.fixture
def configs(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """The configuration each ``serve`` would run with (the server itself does not start)."""
    got: list[ServerConfig] = []

    async def serve(config: ServerConfig) -> None:
        got.append(config)

    monkeypatch.setattr(server_main, "serve", serve)
    monkeypatch.setattr(serve_cmd, "setup_logging", lambda level: None)
    return got


def serve(tmp_path: Path, *args: str) -> Result:
    argv = ["serve", "--data-dir", str(tmp_path), "--nbd-socket", str(tmp_path / "nbd.sock"), *args]
    return CliRunner().invoke(cli, argv)


def test_the_hot_set_is_1_gib_unless_given(tmp_path: Path, configs: list[ServerConfig]) -> None:
    result = serve(tmp_path)
    assert result.exit_code == 0, result.output
    result = serve(tmp_path, "--hot-set", "64MiB")
    assert result.exit_code == 0, result.output
    assert [c.hot_set for c in configs] == [1 << 30, 64 << 20]


def test_a_hot_set_smaller_than_one_region_is_a_usage_error(
    tmp_path: Path, configs: list[ServerConfig]
) -> None:
    result = serve(tmp_path, "--hot-set", "1MiB")
    exc = result.exception
    assert isinstance(exc, UsageError) and "4MiB" in exc.message and exc.exit_code == 2
    assert configs == []


def test_tls_options_reach_the_configuration(tmp_path: Path, configs: list[ServerConfig]) -> None:
    from deltavol import tls

    certs = tls.init(tmp_path / "certs", ["localhost"]).directory
    assert serve(tmp_path, "--nbd", "0.0.0.0:10809", "--tls", "off").exit_code == 0
    assert serve(tmp_path, "--tls-certificates", str(certs), "--tls-verify-peer").exit_code == 0
    off, tls_on = configs
    assert (off.tls, off.tls_certificates) == ("off", None) and "plain text" in off.warnings[0]
    assert (tls_on.tls, tls_on.tls_certificates, tls_on.tls_verify_peer) == ("require", certs, True)
    refused = serve(tmp_path, "--nbd", "0.0.0.0:10809")
    assert refused.exception is not None and getattr(refused.exception, "exit_code", 0) == 2
    assert len(configs) == 2

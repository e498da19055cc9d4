"""Addresses as ``serve --nbd`` and ``--api`` take them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from deltavol.config import DEFAULT_NBD, ServerConfig, parse_host_port
from deltavol.errors import UsageError


@pytest.mark.parametrize(
    "text, address",
    [
        ("10.0.0.1:10900", ("10.0.0.1", 10900)),
        ("example.org:1", ("example.org", 1)),
        ("example.org", ("example.org", 10809)),
        (":10900", ("127.0.0.1", 10900)),
        ("[::1]:10900", ("::1", 10900)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("h:65535", ("h", 65535)),
    ],
)
def test_an_address_is_a_host_and_a_port(text: str, address: tuple[str, int]) -> None:
    assert parse_host_port(text, 10809) == address


@pytest.mark.parametrize(
    "text", ["h:65536", "h:99999999", "h:port", "h:-1", "h:", "::1", "::1:80", "[::1:80"]
)
def test_a_bad_address_is_a_usage_error_naming_it(text: str) -> None:
    with pytest.raises(UsageError) as refused:
        parse_host_port(text, 10809)
    assert refused.value.message.startswith(f"invalid address {text!r}: expected HOST:PORT")
    assert refused.value.exit_code == 2


def test_a_config_is_frozen_with_loopback_nbd_by_default(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=tmp_path)
    assert config.nbd_tcp == DEFAULT_NBD == ("127.0.0.1", 10809) and config.api_tcp is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.save_limit = 0  # type: ignore[misc]

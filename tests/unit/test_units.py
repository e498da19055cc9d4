"""Sizes, rates and intervals as users type them: what each spelling means, and a clear
usage error (exit 2, HTTP 400) for what it cannot mean."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deltavol.errors import InvalidSize, UsageError
from deltavol.units import format_size, parse_interval, parse_rate, parse_size

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    "text, size",
    [
        ("0", 0),
        ("512", 512),
        ("512B", 512),
        ("4K", 4 * KiB),
        ("4k", 4 * KiB),
        ("4KB", 4 * KiB),  # binary, as qemu-img reads it
        ("4KiB", 4 * KiB),
        ("4kib", 4 * KiB),
        ("64M", 64 * MiB),
        ("4G", 4 * GiB),
        ("4GiB", 4 * GiB),
        (" 4 GiB ", 4 * GiB),
        ("16T", 16 * TiB),
        ("1P", 1 << 50),
        ("1.5K", 1536),
        ("0.5MiB", 512 * KiB),
        (4096, 4096),
    ],
)
def test_a_size_in_any_spelling(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "expected a number"),
        ("G", "expected a number"),
        ("-1", "expected a number"),
        ("4XB", "expected a number"),
        ("4 G B", "expected a number"),
        ("4e3", "expected a number"),
        ("1,5K", "expected a number"),
        ("0.3K", "not a whole number of bytes"),
        ("1.0001", "not a whole number of bytes"),
        (-1, "must not be negative"),
    ],
)
def test_a_size_that_means_nothing_is_a_usage_error(text: str | int, why: str) -> None:
    with pytest.raises(InvalidSize) as refused:
        parse_size(text)
    assert why in refused.value.message and repr(text) in refused.value.message
    assert (refused.value.exit_code, refused.value.http_status) == (2, 400)


@given(
    st.integers(min_value=0, max_value=1 << 60), st.sampled_from(["", "B", "K", "KiB", "M", "MiB", "G", "T"])
)
def test_a_whole_number_with_a_unit_is_that_many_bytes(n: int, unit: str) -> None:
    mult = {"": 1, "B": 1, "K": KiB, "KiB": KiB, "M": MiB, "MiB": MiB, "G": GiB, "T": TiB}[unit]
    assert parse_size(f"{n}{unit}") == n * mult


@pytest.mark.parametrize(
    "text, rate",
    [
        (None, None),
        ("0", None),
        (0, None),
        ("100MiB/s", 100 * MiB),
        ("100M/S", 100 * MiB),
        (" 1G/s ", GiB),
        ("4096", 4096),
    ],
)
def test_a_rate_per_second_or_unlimited(text: str | int | None, rate: int | None) -> None:
    assert parse_rate(text) == rate


def test_a_rate_that_means_nothing_is_a_usage_error() -> None:
    with pytest.raises(InvalidSize, match="expected a number"):
        parse_rate("fast")


@pytest.mark.parametrize(
    "text, seconds",
    [
        (None, None),
        (30, 30),
        ("45", 45),
        ("45s", 45),
        ("15m", 900),
        ("2h", 7200),
        ("1d", 86400),
        (" 5 m ", 300),
    ],
)
def test_an_interval_in_seconds(text: str | int | None, seconds: int | None) -> None:
    assert parse_interval(text) == seconds


@pytest.mark.parametrize(
    "text, why",
    [
        ("0", "must be positive"),
        ("0m", "must be positive"),
        ("soon", "expected a number"),
        ("1.5h", "expected"),
        ("5w", "expected"),
        ("-5m", "expected"),
    ],
)
def test_an_interval_that_means_nothing_is_a_usage_error(text: str, why: str) -> None:
    with pytest.raises(UsageError) as refused:
        parse_interval(text)
    assert why in refused.value.message and refused.value.exit_code == 2


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (MiB, "1.0 MiB"),
        (4 * GiB, "4.0 GiB"),
        (3 * TiB, "3.0 TiB"),
        (2048 * TiB, "2048.0 TiB"),
    ],
)
def test_a_size_printed_in_the_largest_unit_below_1024(n: int, text: str) -> None:
    assert format_size(n) == text

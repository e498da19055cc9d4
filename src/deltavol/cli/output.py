"""How the CLI prints: stable JSON with --json, plain aligned text otherwise."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """Print ``rows`` with ``columns`` as (key, heading), each column as wide as it needs."""
    cells = [[h.upper() for _, h in columns]] + [
        ["-" if r.get(k) is None else str(r.get(k)) for k, _ in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def fields(data: dict[str, Any], order: Sequence[str]) -> None:
    width = max(len(k) for k in order)
    for key in order:
        value = data.get(key)
        click.echo(f"{key.ljust(width)}  {'-' if value is None else value}")

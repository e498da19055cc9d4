"""``deltavol events``: follow the server's event stream (``GET /v1/events``)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import click

from deltavol.cli import cli
from deltavol.cli.api_client import ApiTarget, StreamEvent, events
from deltavol.errors import ServerNotRunning
from deltavol.units import format_size

RECONNECTS = 5  # tries, 1 s apart, to follow the stream again after the server closed it


@cli.command(name="events")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--session", "only", help="Only events of this session (or volume) name.")
@click.option("--since", type=click.IntRange(min=0), help="Replay the kept events after this id first.")
@click.option("--count", type=click.IntRange(min=1), help="Exit after this many events.")
@click.pass_obj
def events_cmd(api: ApiTarget, as_json: bool, only: str | None, since: int | None, count: int | None) -> None:
    """Follow the server's events: sessions, updates and volumes, as they happen.

    Runs until interrupted (or --count events). If the server closes the stream, it
    reconnects and resumes after the last event it printed."""
    asyncio.run(_follow(api, as_json, only, since, count))


async def _follow(
    api: ApiTarget, as_json: bool, only: str | None, since: int | None, count: int | None
) -> None:
    last, shown, tries = since, 0, 0
    while True:
        try:
            async for ev in events(api, last_id=last):
                tries = 0
                if ev.id is not None:
                    last = ev.id
                if only is not None and ev.data.get("name") != only:
                    continue
                click.echo(json.dumps({"kind": ev.kind, **ev.data}) if as_json else _line(ev))
                shown += 1
                if count is not None and shown >= count:
                    return
        except ServerNotRunning:
            if tries == 0 and last is None:
                raise
        tries += 1
        if tries > RECONNECTS:
            raise ServerNotRunning(socket=api.url or api.unix_socket, data_dir=api.data_dir)
        await asyncio.sleep(1.0)


def _line(ev: StreamEvent) -> str:
    d = ev.data
    at = d.get("at")
    when = dt.datetime.fromtimestamp(at, dt.UTC).strftime("%H:%M:%S.%f")[:-3] if at else "-"
    return f"{when}  {ev.kind:<16} {d.get('name', '-'):<12} {_details(ev.kind, d)}".rstrip()


def _details(kind: str, d: dict[str, Any]) -> str:
    if kind == "gap":
        return f"events after {d.get('after')} were missed"
    if kind == "session.state":
        return str(d.get("state"))
    if kind == "update.marked":
        return f"{d.get('type')} update {d.get('id')}, {format_size(d.get('bytes_total') or 0)} to copy"
    if kind == "update.progress":
        done, total = d.get("bytes_done") or 0, d.get("bytes_total") or 0
        pct = 100 * done / total if total else 100.0
        return f"update {d.get('id')}: {pct:5.1f}% {format_size(done)} of {format_size(total)}"
    if kind == "update.finished":
        return (
            f"update {d.get('id')} done, consistent as of {d.get('point_in_time')} "
            f"({format_size(d.get('bytes_sent') or 0)} sent)"
        )
    if kind == "update.failed":
        return f"update {d.get('id')} failed: {d.get('error')}"
    if kind == "update.retry":
        return f"retry {d.get('attempt')} scheduled"
    skip = {"id", "kind", "at", "name"}
    return " ".join(f"{k}={v}" for k, v in d.items() if k not in skip)

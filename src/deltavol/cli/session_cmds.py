"""``deltavol session ...``."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from deltavol.cli import cli
from deltavol.cli.api_client import ApiTarget, call
from deltavol.cli.output import emit_json, fields, table
from deltavol.errors import UpdateFailed, VerifyMismatch
from deltavol.units import format_size

STATUS_FIELDS = (
    "name",
    "source",
    "target",
    "granularity",
    "state",
    "consistent",
    "point_in_time",
    "tracked_bytes",
    "recopy_bytes",
    "full_reason",
    "last_error",
)
UPDATE_FIELDS = (
    "id",
    "kind",
    "marked_at",
    "bytes_total",
    "bytes_done",
    "bytes_sent",
    "cofw_saved_bytes",
    "remark",
    "rate",
    "eta",
)


@cli.group()
def session() -> None:
    """Copy sessions: a source volume kept up to date on a target."""


@session.command()
@click.argument("name")
@click.option("--source", required=True, help="Source volume.")
@click.option("--target", required=True, help="Target: a volume name or an NBD URI.")
@click.option("--granularity", default="64KiB", show_default=True, help="Chunk size (4KiB-16MiB).")
@click.option("--max-rate", help="Copy rate limit, e.g. 100MiB/s.")
@click.option("--every", help="Run an incremental update every interval, e.g. 15m.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def create(
    api: ApiTarget,
    name: str,
    source: str,
    target: str,
    granularity: str,
    max_rate: str | None,
    every: str | None,
    as_json: bool,
) -> None:
    """Create session NAME copying SOURCE to TARGET (the first update is a full one)."""
    body = {
        "name": name,
        "source": source,
        "target": target,
        "granularity": granularity,
        "max_rate": max_rate,
        "every": every,
    }
    info = call(api, "POST", "/v1/sessions", body)
    emit_json(info) if as_json else click.echo(
        f"created session {name}: {source} -> {target} (granularity {format_size(info['granularity'])})"
    )


@session.command()
@click.argument("name")
@click.option("--full", is_flag=True, help="Copy everything (the target is inconsistent until done).")
@click.option("--wait", is_flag=True, help="Wait for the update to finish, showing progress.")
@click.option("--max-rate", help="Rate limit for this update, e.g. 50MiB/s.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def update(api: ApiTarget, name: str, full: bool, wait: bool, max_rate: str | None, as_json: bool) -> None:
    """Start an update of NAME; returns once marked (or waits with --wait)."""
    info = call(api, "POST", f"/v1/sessions/{name}/update", {"full": full, "max_rate": max_rate})
    u = info["update"]
    if not as_json or not wait:
        if as_json:
            emit_json(info)
        else:
            mark = u["marked_at"] or "(at the end of the full copy)"
            click.echo(
                f"session {name}: {u['kind']} update {u['id']} marked at {mark}, "
                f"{format_size(u['bytes_total'])} to copy"
            )
    if wait:
        final = _wait(api, name, u["id"], quiet=as_json)
        if as_json:
            emit_json(final)
        _check_finished(name, final)


def _wait(api: ApiTarget, name: str, update_id: int, quiet: bool) -> dict[str, Any]:
    if sys.stderr.isatty() and not quiet:
        return _wait_bar(api, name)
    last_line = 0.0
    while True:
        info = call(api, "GET", f"/v1/sessions/{name}")
        if info["state"] != "copying":
            return info
        if not quiet and time.monotonic() - last_line >= 2:
            u = info["update"] or {}
            click.echo(f"session {name}: {_progress_line(u)}", err=True)
            last_line = time.monotonic()
        time.sleep(0.2)


def _progress_line(u: dict[str, Any]) -> str:
    done, total = u.get("bytes_done", 0), u.get("bytes_total", 0) or 1
    eta = u.get("eta")
    return (
        f"{100 * done / total:5.1f}% {format_size(done)} of {format_size(total)}, "
        f"{format_size(u.get('rate') or 0)}/s, eta {'?' if eta is None else f'{eta:.0f}s'}"
    )


def _wait_bar(api: ApiTarget, name: str) -> dict[str, Any]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        "[bold]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task(name, total=None)
        while True:
            info = call(api, "GET", f"/v1/sessions/{name}")
            u = info["update"] or {}
            bar.update(task, total=u.get("bytes_total") or None, completed=u.get("bytes_done", 0))
            if info["state"] != "copying":
                return info
            time.sleep(0.2)


def _check_finished(name: str, info: dict[str, Any]) -> None:
    if info["state"] == "failed":
        raise UpdateFailed(name=name, why=f"update failed: {info['last_error']}")
    if info["state"] != "idle":
        raise UpdateFailed(name=name, why=f"update stopped ({info['state']})")
    u = info["update"] or {}
    click.echo(
        f"session {name}: update {u.get('id')} done, consistent as of {info['point_in_time']} "
        f"({format_size(u.get('bytes_sent', 0))} sent)",
        err=True,
    )


@session.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status(api: ApiTarget, name: str | None, as_json: bool) -> None:
    """Show one session (or all)."""
    sessions = [call(api, "GET", f"/v1/sessions/{name}")] if name else call(api, "GET", "/v1/sessions")
    if as_json:
        emit_json(sessions[0] if name else sessions)
        return
    for i, s in enumerate(sessions):
        if i:
            click.echo()
        fields(s, STATUS_FIELDS)
        if s.get("update"):
            click.echo("update:")
            fields({f"  {k}": v for k, v in s["update"].items()}, [f"  {k}" for k in UPDATE_FIELDS])


@session.command(name="list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def list_(api: ApiTarget, as_json: bool) -> None:
    """List sessions."""
    sessions = call(api, "GET", "/v1/sessions")
    if as_json:
        emit_json(sessions)
        return
    rows = [
        {**s, "progress": _progress_line(s["update"]) if s["state"] == "copying" and s["update"] else ""}
        for s in sessions
    ]
    table(
        rows,
        [
            ("name", "name"),
            ("source", "source"),
            ("target", "target"),
            ("state", "state"),
            ("consistent", "consistent"),
            ("point_in_time", "point in time"),
            ("progress", "progress"),
        ],
    )


def _action(verb: str, help_text: str) -> None:
    @session.command(name=verb, help=help_text)
    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_obj
    def run(api: ApiTarget, name: str, as_json: bool) -> None:
        info = call(api, "POST", f"/v1/sessions/{name}/{verb}")
        emit_json(info) if as_json else click.echo(f"session {name}: {info['state']}")


_action("pause", "Stop copying, keeping both bitmaps.")
_action("resume", "Go on with what is left of the update.")
_action("cancel", "End the update; what it did not copy goes back into tracking.")


@session.command()
@click.argument("name")
@click.pass_obj
def remove(api: ApiTarget, name: str) -> None:
    """Remove session NAME and release its target."""
    call(api, "DELETE", f"/v1/sessions/{name}")
    click.echo(f"removed session {name}")


@session.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def verify(api: ApiTarget, name: str, as_json: bool) -> None:
    """Compare source and target on every chunk not changed since the mark."""
    result = call(api, "POST", f"/v1/sessions/{name}/verify", timeout=24 * 3600)
    if as_json:
        emit_json(result)
    else:
        click.echo(
            f"session {name}: {'OK' if result['ok'] else 'MISMATCH'}: "
            f"{result['chunks_compared']} chunks compared, {result['chunks_skipped']} changed since "
            f"the mark, {result['mismatches']} different"
        )
        for off in result["mismatch_offsets"]:
            click.echo(f"  differs at offset {off}")
    if not result["ok"]:
        raise VerifyMismatch(name=name, count=result["mismatches"])

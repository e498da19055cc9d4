"""``deltavol session ...``."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import click

from deltavol.cli import cli
from deltavol.cli.api_client import ApiTarget, acall, call, events
from deltavol.cli.output import emit_json, fields, table
from deltavol.errors import ApiError, UpdateFailed, VerifyMismatch
from deltavol.tls import with_certificates
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
    "last_success_at",
    "last_failure_at",
    "rpo_seconds",
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
@click.option(
    "--target",
    required=True,
    help="Target: a volume name or an NBD URI (nbd://, nbd+unix://, or over TLS nbds://, nbds+unix://).",
)
@click.option(
    "--tls-certificates",
    metavar="DIR",
    help="For an nbds:// target: ca-cert.pem to verify it with (client-cert.pem/client-key.pem "
    "presented when there), on the server's host. Same as ?tls-certificates=DIR in the URI.",
)
@click.option("--granularity", default="64KiB", show_default=True, help="Chunk size (4KiB-16MiB).")
@click.option("--max-rate", help="Copy rate limit, e.g. 100MiB/s.")
@click.option("--every", help="Run an incremental update every interval, e.g. 15m.")
@click.option(
    "--peer-api",
    metavar="URL",
    help="The target is a volume of the deltavol server with this control API: it guards the "
    "volume for this session, and 'session reverse' hands the session over to it.",
)
@click.option(
    "--peer-token-file",
    type=click.Path(dir_okay=False, exists=True, readable=True),
    help="File holding the peer's token (its DATA_DIR/peer.token).",
)
@click.option(
    "--peer-certificates",
    metavar="DIR",
    help="For an https:// --peer-api: ca-cert.pem (and client-cert.pem/client-key.pem), "
    "on this server's host.",
)
@click.option(
    "--reverse-api",
    metavar="URL",
    help="This server's control API as the peer reaches it (default: its --api address).",
)
@click.option(
    "--reverse-target",
    metavar="URI",
    help="The source as the peer reaches it over NBD (default: this server's NBD address).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def create(
    api: ApiTarget,
    name: str,
    source: str,
    target: str,
    tls_certificates: str | None,
    granularity: str,
    max_rate: str | None,
    every: str | None,
    peer_api: str | None,
    peer_token_file: str | None,
    peer_certificates: str | None,
    reverse_api: str | None,
    reverse_target: str | None,
    as_json: bool,
) -> None:
    """Create session NAME copying SOURCE to TARGET (the first update is a full one)."""
    if not peer_api and (peer_token_file or peer_certificates or reverse_api or reverse_target):
        raise click.UsageError("--peer-token-file, --peer-certificates and --reverse-* need --peer-api")
    if tls_certificates:
        target = with_certificates(target, os.path.abspath(os.path.expanduser(tls_certificates)))
    body = {
        "name": name,
        "source": source,
        "target": target,
        "granularity": granularity,
        "max_rate": max_rate,
        "every": every,
    }
    if peer_api:
        token = None
        if peer_token_file:
            with open(peer_token_file, encoding="utf-8", errors="replace") as f:
                token = f.read().strip()
        certs = os.path.abspath(os.path.expanduser(peer_certificates)) if peer_certificates else None
        body.update(
            peer_api=peer_api,
            peer_token=token,
            peer_certificates=certs,
            reverse_api=reverse_api,
            reverse_target=reverse_target,
        )
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
    body = {"full": full, "max_rate": max_rate}
    if not wait:
        info = call(api, "POST", f"/v1/sessions/{name}/update", body)
        emit_json(info) if as_json else _say_marked(name, info["update"])
        return
    final = asyncio.run(_follow(api, name, body, quiet=as_json))
    if as_json:
        emit_json(final)
    _check_finished(name, final)


def _say_marked(name: str, u: dict[str, Any]) -> None:
    mark = u["marked_at"] or "(at the end of the full copy)"
    click.echo(
        f"session {name}: {u['kind']} update {u['id']} marked at {mark}, "
        f"{format_size(u['bytes_total'])} to copy"
    )


class _Rate:
    """Bytes per second over the last few seconds of progress events, and the time left."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []

    def add(self, done: int) -> None:
        now = time.monotonic()
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > 5.0:
            self.samples.pop(0)

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


async def _follow(api: ApiTarget, name: str, body: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """Start the update once the event stream is subscribed, then follow its events (no
    polling) until the session stops copying: the session's JSON at that moment. If the
    stream ends first (the server stopped), the status is polled instead."""
    started: dict[str, Any] = {}

    async def start() -> None:
        info = await acall(api, "POST", f"/v1/sessions/{name}/update", body)
        started.update(info)
        if not quiet:
            _say_marked(name, info["update"])

    show = None if quiet else (_Bar(name) if sys.stderr.isatty() else _Lines(name))
    try:
        async for ev in events(api, opened=start):
            if ev.data.get("name") != name or not started:
                continue
            uid = started["update"]["id"]
            if ev.kind == "update.progress" and ev.data.get("id") == uid and show is not None:
                show.progress(ev.data.get("bytes_done", 0), ev.data.get("bytes_total", 0))
            elif ev.kind in ("update.finished", "update.failed") or (
                ev.kind == "session.state" and ev.data.get("state") != "copying"
            ):
                info = await acall(api, "GET", f"/v1/sessions/{name}")
                if info["state"] != "copying":
                    return info
    finally:
        if show is not None:
            show.close()
    if not started:  # the stream ended before it was subscribed: nothing was started
        raise ApiError(502, "Disconnected", "the server closed the event stream")
    while True:  # the server closed the stream: follow the status instead
        info = await acall(api, "GET", f"/v1/sessions/{name}")
        if info["state"] != "copying":
            return info
        await asyncio.sleep(0.5)


class _Lines:
    """Progress as plain lines on stderr, at most one every ``EVERY`` seconds."""

    EVERY = 1.0

    def __init__(self, name: str) -> None:
        self.name, self.rate, self.last = name, _Rate(), 0.0

    def progress(self, done: int, total: int) -> None:
        self.rate.add(done)
        if time.monotonic() - self.last < self.EVERY:
            return
        self.last = time.monotonic()
        rate = self.rate.rate()
        eta = (total - done) / rate if rate > 0 else None
        u = {"bytes_done": done, "bytes_total": total, "rate": rate, "eta": eta}
        click.echo(f"session {self.name}: {_progress_line(u)}", err=True)

    def close(self) -> None:
        pass


class _Bar:
    """A rich progress bar on the terminal: bytes, rate and time left."""

    def __init__(self, name: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.bar = Progress(
            "[bold]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task(name, total=None)

    def progress(self, done: int, total: int) -> None:
        self.bar.update(self.task, total=total or None, completed=done)

    def close(self) -> None:
        self.bar.stop()


def _progress_line(u: dict[str, Any]) -> str:
    done, total = u.get("bytes_done", 0), u.get("bytes_total", 0) or 1
    eta = u.get("eta")
    return (
        f"{100 * done / total:5.1f}% {format_size(done)} of {format_size(total)}, "
        f"{format_size(round(u.get('rate') or 0))}/s, eta {'?' if eta is None else f'{eta:.0f}s'}"
    )


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
        {
            **s,
            "progress": _progress_line(s["update"])
            if s["state"] in ("copying", "restoring") and s["update"]
            else "",
        }
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
@click.option("--wait", is_flag=True, help="Wait for the restore to finish, showing progress.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def restore(api: ApiTarget, name: str, wait: bool, as_json: bool) -> None:
    """Roll the source of NAME back to its target's point in time.

    Copies back only the chunks changed since; the source refuses writes until it is done."""
    info = call(api, "POST", f"/v1/sessions/{name}/restore")
    u = info["update"]
    if not as_json or not wait:
        if as_json:
            emit_json(info)
        else:
            if info.get("notice"):  # an update under way was cancelled first
                click.echo(f"session {name}: {info['notice']}")
            click.echo(
                f"session {name}: restoring {info['source']} to {info['point_in_time']} "
                f"(the source refuses writes until it is done)"
            )
    if wait:
        if as_json and info.get("notice"):  # the JSON printed is the end's: say it here
            click.echo(f"session {name}: {info['notice']}", err=True)
        final = _wait_restore(api, name, quiet=as_json)
        if as_json:
            emit_json(final)
        if final["state"] != "idle":
            raise UpdateFailed(name=name, why=f"restore stopped: {final['last_error'] or final['state']}")
        done = (final["update"] or u).get("bytes_done", 0)
        click.echo(
            f"session {name}: {info['source']} restored to {final['point_in_time']} "
            f"({format_size(done)} copied back)",
            err=True,
        )


def _wait_restore(api: ApiTarget, name: str, quiet: bool) -> dict[str, Any]:
    """Until the restore ends, or stops on an error (it stays ``restoring`` then)."""
    last_line = 0.0
    while True:
        info = call(api, "GET", f"/v1/sessions/{name}")
        if info["state"] != "restoring" or info["last_error"]:
            return info
        if not quiet and time.monotonic() - last_line >= 2:
            click.echo(f"session {name}: restoring: {_progress_line(info['update'] or {})}", err=True)
            last_line = time.monotonic()
        time.sleep(0.2)


@session.command()
@click.argument("name")
@click.option(
    "--reverse-api",
    metavar="URL",
    help="For a session with a peer: this server's API as the peer reaches it, to reverse back.",
)
@click.option(
    "--reverse-target",
    metavar="URI",
    help="For a session with a peer: the source as the peer reaches it over NBD.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def reverse(
    api: ApiTarget, name: str, reverse_api: str | None, reverse_target: str | None, as_json: bool
) -> None:
    """Make the target of NAME its writable source, and the source its target (failover).

    The next update copies only what changed on either side since the point in time. With
    a target on another deltavol server (created with --peer-api), that server takes the
    session over and this one no longer lists it."""
    body = {"reverse_api": reverse_api, "reverse_target": reverse_target}
    info = call(api, "POST", f"/v1/sessions/{name}/reverse", body)
    if as_json:
        emit_json(info)
    elif "reversed_to" in info:
        where = info["reversed_to"]
        click.echo(f"session {name}: reversed: it runs on {where} now, this source is its target")
    else:
        source, target = info["source"], info["target"]
        click.echo(f"session {name}: reversed: {source} is the source now, {target} the target")


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

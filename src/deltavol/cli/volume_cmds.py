"""``deltavol volume ...``."""

from __future__ import annotations

import click

from deltavol.cli import cli
from deltavol.cli.api_client import ApiTarget, call
from deltavol.cli.output import emit_json, fields, table
from deltavol.errors import InvalidSize
from deltavol.units import format_size, parse_size

INFO_FIELDS = (
    "name",
    "size",
    "path",
    "imported",
    "created_at",
    "connections",
    "written_bytes",
    "read_only",
    "guarded_by",
    "peer_target",
    "allocated",
)


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except InvalidSize as exc:
        raise click.BadParameter(exc.message) from None


def _human(v: dict) -> dict:
    return {
        **v,
        "size_h": format_size(v["size"]),
        "allocated_h": format_size(v["allocated"]) if v.get("allocated") is not None else None,
        "written_h": format_size(v["written_bytes"]) if v.get("written_bytes") is not None else None,
    }


@cli.group()
def volume() -> None:
    """Create, import, list and remove volumes."""


@volume.command()
@click.argument("name")
@click.option("--size", callback=_size, help="Size, e.g. 4GiB (B K KiB M MiB G GiB T TiB).")
@click.option(
    "--from-session",
    metavar="SESSION",
    help="Copy the point in time of SESSION's target into the new volume (its source's size).",
)
@click.option(
    "--peer-target",
    is_flag=True,
    help="Let another deltavol server's session (its peer token) guard and write this volume.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the new volume as JSON.")
@click.pass_obj
def create(
    api: ApiTarget, name: str, size: int | None, from_session: str | None, peer_target: bool, as_json: bool
) -> None:
    """Create a sparse volume NAME of SIZE bytes in the data dir, or a copy of a session's
    point in time (--from-session)."""
    if (size is None) == (from_session is None):
        raise click.UsageError("give exactly one of --size and --from-session")
    if from_session is not None and peer_target:
        raise click.UsageError("--peer-target goes with --size (use 'volume peer-target' afterwards)")
    if from_session is not None:
        body: dict[str, object] = {"name": name, "from_session": from_session}
        info = call(api, "POST", "/v1/volumes", body, timeout=24 * 3600)
        emit_json(info) if as_json else click.echo(
            f"created volume {info['name']} ({format_size(info['size'])}) "
            f"from the point in time of session {from_session}"
        )
        return
    body = {"name": name, "size": size, **({"peer_target": True} if peer_target else {})}
    info = call(api, "POST", "/v1/volumes", body)
    emit_json(info) if as_json else click.echo(f"created volume {info['name']} ({format_size(info['size'])})")


@volume.command(name="import")
@click.argument("name")
@click.option("--path", required=True, help="Existing file or block device, used in place.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def import_(api: ApiTarget, name: str, path: str, as_json: bool) -> None:
    """Make an existing file or block device the volume NAME (its data stays where it is)."""
    import os

    info = call(api, "POST", "/v1/volumes", {"name": name, "path": os.path.abspath(path)})
    emit_json(info) if as_json else click.echo(
        f"imported volume {info['name']} from {info['path']} ({format_size(info['size'])})"
    )


@volume.command(name="list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def list_(api: ApiTarget, as_json: bool) -> None:
    """List volumes."""
    vols = call(api, "GET", "/v1/volumes")
    for warning in call(api, "GET", "/v1/server").get("warnings", []):
        click.echo(f"deltavol: warning: {warning}", err=True)
    if as_json:
        emit_json(vols)
    else:
        table(
            [_human(v) for v in vols],
            [
                ("name", "name"),
                ("size_h", "size"),
                ("allocated_h", "allocated"),
                ("connections", "conns"),
                ("written_h", "written"),
                ("path", "path"),
            ],
        )


@volume.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def info(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Show one volume (or all of them)."""
    api: ApiTarget = ctx.obj
    vols = [call(api, "GET", f"/v1/volumes/{name}")] if name else call(api, "GET", "/v1/volumes")
    if as_json:
        emit_json(vols[0] if name else vols)
        return
    for i, v in enumerate(vols):
        if i:
            click.echo()
        fields(v, INFO_FIELDS)


@volume.command()
@click.argument("name")
@click.pass_obj
def remove(api: ApiTarget, name: str) -> None:
    """Remove volume NAME (deletes its image unless it was imported)."""
    call(api, "DELETE", f"/v1/volumes/{name}")
    click.echo(f"removed volume {name}")


@volume.command()
@click.argument("name")
@click.pass_obj
def unguard(api: ApiTarget, name: str) -> None:
    """Drop the guard another deltavol server's session holds on volume NAME (its source host is
    lost, or its session was removed while this server did not answer): NAME becomes writable,
    and that session's copies to it are refused from now on."""
    info = call(api, "DELETE", f"/v1/volumes/{name}/guard")
    was = info.get("was")
    click.echo(f"volume {name}: guard of {was} dropped" if was else f"volume {name} had no guard")


@volume.command(name="peer-target")
@click.argument("name")
@click.option("--on/--off", "on", required=True, help="Allow (or no longer allow) peers to guard NAME.")
@click.pass_obj
def peer_target(api: ApiTarget, name: str, on: bool) -> None:
    """Whether a session of another deltavol server may make volume NAME its target: with
    --on, the peer token can guard NAME (and that session's copier then writes it); no other
    volume can be guarded with the peer token. --off refuses new guards (one that stands stays)."""
    call(api, "PUT", f"/v1/volumes/{name}/peer-target", {"enabled": on})
    click.echo(f"volume {name}: {'a peer target' if on else 'no peer target'}")

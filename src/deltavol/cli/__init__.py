"""The ``deltavol`` command. Every command but ``serve`` talks to the running server over
its control API. ``main`` is the one place errors become messages and exit codes:
0 ok, 1 operation failed, 2 usage error; no traceback for an expected failure."""

from __future__ import annotations

import sys

import click

from deltavol.cli.api_client import ApiTarget
from deltavol.errors import DeltavolError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data-dir", envvar="DELTAVOL_DATA_DIR", help="Data dir of the server to talk to.")
@click.option("--api-socket", help="Control API unix socket (default: DATA_DIR/api.sock).")
@click.option(
    "--api-url", envvar="DELTAVOL_API_URL", help="Control API over TCP, https://HOST:PORT (or http://)."
)
@click.option(
    "--token",
    envvar="DELTAVOL_API_TOKEN",
    help="Bearer token for --api-url (seen by anyone who can list processes: prefer "
    "$DELTAVOL_API_TOKEN or --token-file).",
)
@click.option(
    "--token-file",
    envvar="DELTAVOL_API_TOKEN_FILE",
    type=click.Path(dir_okay=False, exists=True, readable=True),
    help="File holding the bearer token for --api-url (such as the server's DATA_DIR/api.token).",
)
@click.option(
    "--api-certificates",
    envvar="DELTAVOL_API_CERTIFICATES",
    metavar="DIR",
    help="For an https:// --api-url: ca-cert.pem to verify the server with (and "
    "client-cert.pem/client-key.pem to present, when there).",
)
@click.version_option(package_name="deltavol")
@click.pass_context
def cli(
    ctx: click.Context,
    data_dir: str | None,
    api_socket: str | None,
    api_url: str | None,
    token: str | None,
    token_file: str | None,
    api_certificates: str | None,
) -> None:
    """Serve block volumes over NBD and keep copies of them up to date."""
    if token_file and not token:
        with open(token_file, encoding="utf-8", errors="replace") as f:
            token = f.read().strip()
    ctx.obj = ApiTarget.resolve(data_dir, api_socket, api_url, token, api_certificates)


def main() -> None:
    from deltavol.cli import events_cmd, serve_cmd, session_cmds, tls_cmds, volume_cmds  # noqa: F401  (registers)

    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except DeltavolError as exc:
        click.echo(f"deltavol: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)

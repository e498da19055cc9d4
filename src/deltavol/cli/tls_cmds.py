"""``deltavol tls ...``: certificates for a quick start (no server needed)."""

from __future__ import annotations

from pathlib import Path

import click

from deltavol.cli import cli


@cli.group()
def tls() -> None:
    """TLS certificates for NBD and the control API."""


@tls.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--host",
    "hosts",
    multiple=True,
    required=True,
    help="Name or IP address the server is reached by (repeat for each; goes in its certificate).",
)
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 36500), help="Validity.")
def init(directory: Path, hosts: tuple[str, ...], days: int) -> None:
    """Make a CA, a server and a client certificate in DIRECTORY.

    The files are named as nbdkit and qemu name them (ca-cert.pem, server-cert.pem,
    server-key.pem, client-cert.pem, client-key.pem; the CA's key is ca-key.pem):
    give the directory to `deltavol serve --tls-certificates`, to
    `session create --tls-certificates`, to `nbdkit --tls-certificates` or to qemu's
    `--object tls-creds-x509,dir=DIRECTORY`. Private keys are 0600, the directory 0700.
    """
    from deltavol import tls as tls_files

    made = tls_files.init(directory.absolute(), list(hosts), days=days)
    click.echo(f"made {', '.join(made.files)} in {made.directory}")
    click.echo(
        f"keep {tls_files.CA_KEY} safe (it signs certificates); "
        "a client host needs ca-cert.pem, client-cert.pem and client-key.pem"
    )

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
@click.option(
    "--ca",
    "ca_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the CA (ca-cert.pem, ca-key.pem) that signs the set; made there if it "
    "holds none. Default: DIRECTORY-ca beside DIRECTORY. Keep it on one host only.",
)
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 36500), help="Validity.")
def init(directory: Path, hosts: tuple[str, ...], ca_dir: Path | None, days: int) -> None:
    """Make a server and a client certificate for one host in DIRECTORY, signed by a CA.

    The files are named as nbdkit and qemu name them (ca-cert.pem, server-cert.pem,
    server-key.pem, client-cert.pem, client-key.pem): give the directory to
    `deltavol serve --tls-certificates`, to `session create --tls-certificates`, to
    `nbdkit --tls-certificates` or to qemu's `--object tls-creds-x509,dir=DIRECTORY`.

    The CA's key (ca-key.pem) is never put in DIRECTORY: it lives in the CA's directory
    (--ca, by default DIRECTORY-ca), made with the first set. For a second host, sign its
    own set with the same CA: `deltavol tls init DIR2 --ca CA_DIR --host NAME2`, and copy
    only DIR2 to that host. Private keys are 0600, a directory made here 0700.
    """
    from deltavol import tls as tls_files

    made = tls_files.init(
        directory.absolute(), list(hosts), days=days, ca_directory=ca_dir and ca_dir.absolute()
    )
    if made.new_ca:
        click.echo(f"made a CA in {made.ca_directory} (keep {tls_files.CA_KEY} there: it signs certificates)")
    click.echo(f"made {', '.join(made.files)} in {made.directory}, signed by the CA of {made.ca_directory}")
    for warning in made.warnings:
        click.echo(f"warning: {warning}", err=True)

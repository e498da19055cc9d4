"""X.509 certificates for TLS tests, made with GnuTLS ``certtool``.

``make_certs(dir)`` fills ``dir`` the way nbdkit, qemu and libnbd read a certificate
directory: ``ca-cert.pem`` (plus ``ca-key.pem``), ``server-cert.pem``/``server-key.pem``
for the given host names (IP addresses become IP SANs) and ``client-cert.pem``/
``client-key.pem``. ECDSA keys: made in milliseconds, understood by every peer.
"""

from __future__ import annotations

import ipaddress
import ssl
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.harness import require


def _certtool(*args: str | Path) -> None:
    subprocess.run(["certtool", *map(str, args)], check=True, capture_output=True)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_certs(
    where: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1"), *, ca_name: str = "deltavol test CA"
) -> Path:
    require("certtool")
    where.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = where / "ca-key.pem", where / "ca-cert.pem"
    (where / "ca.info").write_text(f'cn = "{ca_name}"\nca\ncert_signing_key\nexpiration_days = 3650\n')
    _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", ca_key)
    _certtool(
        "--generate-self-signed",
        "--load-privkey",
        ca_key,
        "--template",
        where / "ca.info",
        "--outfile",
        ca_cert,
    )
    names = "".join(f'ip_address = "{h}"\n' if _is_ip(h) else f'dns_name = "{h}"\n' for h in hosts)
    usage = "signing_key\nencryption_key\nexpiration_days = 3650\n"
    templates = {
        "server": f'cn = "{hosts[0]}"\n{names}tls_www_server\n{usage}',
        "client": f'cn = "deltavol test client"\ntls_www_client\n{usage}',
    }
    for role, template in templates.items():
        info, key, cert = where / f"{role}.info", where / f"{role}-key.pem", where / f"{role}-cert.pem"
        info.write_text(template)
        _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", key)
        _certtool(
            "--generate-certificate",
            "--load-privkey",
            key,
            "--load-ca-certificate",
            ca_cert,
            "--load-ca-privkey",
            ca_key,
            "--template",
            info,
            "--outfile",
            cert,
        )
        key.chmod(0o600)
    ca_key.chmod(0o600)
    return where


def server_context(certs: Path, *, verify_peer: bool = False) -> ssl.SSLContext:
    """What a server makes of ``certs``: its certificate, and the CA for client certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server-cert.pem", certs / "server-key.pem")
    context.load_verify_locations(certs / "ca-cert.pem")
    context.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    return context


def client_context(certs: Path, *, client_cert: bool = True) -> ssl.SSLContext:
    """What a client makes of ``certs``: the CA to check the server, and its own certificate."""
    context = ssl.create_default_context(cafile=certs / "ca-cert.pem")
    if client_cert:
        context.load_cert_chain(certs / "client-cert.pem", certs / "client-key.pem")
    return context

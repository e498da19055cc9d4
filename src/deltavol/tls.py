"""TLS with X.509 certificates: the files, the contexts, and a quick-start set of them.

Notes on the design
-------------------
* **Files are named as nbdkit and qemu name them**, so one directory serves deltavol,
  ``nbdkit --tls-certificates DIR`` and qemu's ``tls-creds-x509,dir=DIR`` alike::

      ca-cert.pem                      the CA that signs every peer's certificate
      ca-crl.pem                       optional: certificates the CA revoked
      server-cert.pem, server-key.pem  what a server presents
      client-cert.pem, client-key.pem  what a client presents (optional unless the
                                       server verifies its peers)

* **Certificates are re-read at each connection.** ``ServerTls.context()`` is called at
  each STARTTLS (and each HTTPS connection); it looks at the files' size and mtime and
  loads them again when they changed, so a renewed certificate needs no restart. A
  renewal that leaves a broken file behind fails the connections that follow (with the
  file named in the log) and the server goes on with the others.
* **A client always verifies the server**: against ``ca-cert.pem`` of its directory (the
  system's CAs when there is none), with the host name checked against the certificate,
  as libnbd does. Over a unix socket there is no host name to check unless the URI gives
  one (``?tls-hostname=NAME``); the CA is still checked.
* **TLS 1.2 at least.** TLS-PSK is not offered: Python's ``ssl`` has no PSK before 3.13.
* Every problem with a file is a ``TlsFileMissing`` / ``TlsFileInvalid`` naming the file:
  a server checks its files at start and refuses to start without them.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from deltavol.errors import AlreadyExists, InsecureListen, TlsFileInvalid, TlsFileMissing, UsageError

log = logging.getLogger("deltavol.tls")

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

ROLES = {
    CA_CERT: "the certificate of the CA that signs the peers' certificates",
    CA_KEY: "the CA's private key",
    CA_CRL: "the CA's list of revoked certificates",
    SERVER_CERT: "the server's certificate",
    SERVER_KEY: "the server's private key",
    CLIENT_CERT: "the client's certificate",
    CLIENT_KEY: "the client's private key",
}
INIT_HINT = "make a set with: deltavol tls init DIR --host NAME"


def _need(directory: Path, name: str) -> str:
    path = directory / name
    if not path.is_file():
        if not directory.is_dir():
            raise TlsFileMissing(path=path, role=ROLES[name], hint=f"no directory {directory}; {INIT_HINT}")
        raise TlsFileMissing(path=path, role=ROLES[name], hint=INIT_HINT)
    if not os.access(path, os.R_OK):
        raise TlsFileInvalid(path=path, role=ROLES[name], why="permission denied")
    return str(path)


def _why(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _load_chain(ctx: ssl.SSLContext, directory: Path, cert: str, key: str) -> None:
    cert_path, key_path = _need(directory, cert), _need(directory, key)
    try:  # which of the two is bad: load the certificate alone first
        ssl.create_default_context().load_verify_locations(cafile=cert_path)
    except (ssl.SSLError, OSError) as exc:
        raise TlsFileInvalid(path=cert_path, role=ROLES[cert], why=_why(exc)) from None
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        raise TlsFileInvalid(
            path=key_path, role=ROLES[key], why=f"{_why(exc)} (does it belong to {cert_path}?)"
        ) from None


def _load_ca(ctx: ssl.SSLContext, directory: Path) -> None:
    ca = _need(directory, CA_CERT)
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TlsFileInvalid(path=ca, role=ROLES[CA_CERT], why=_why(exc)) from None
    crl = directory / CA_CRL
    if crl.exists():
        try:
            ctx.load_verify_locations(cafile=_need(directory, CA_CRL))
        except (ssl.SSLError, OSError) as exc:
            raise TlsFileInvalid(path=crl, role=ROLES[CA_CRL], why=_why(exc)) from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def server_context(directory: Path, verify_peer: bool = False) -> ssl.SSLContext:
    """A server's context: its certificate and key; with ``verify_peer``, clients must
    present a certificate the CA signed (and did not revoke)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # a client may not make the server redo handshakes
    _load_chain(ctx, directory, SERVER_CERT, SERVER_KEY)
    if verify_peer:
        _load_ca(ctx, directory)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(directory: Path | None, check_hostname: bool = True) -> ssl.SSLContext:
    """A client's context: the server verified against the CA of ``directory`` (the
    system's CAs without one); the client's certificate presented when the directory
    has one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if directory is None:
        ctx.load_default_certs()
        return ctx
    _load_ca(ctx, directory)
    has_cert, has_key = (directory / CLIENT_CERT).exists(), (directory / CLIENT_KEY).exists()
    if has_cert or has_key:  # one without the other is a mistake worth naming
        _load_chain(ctx, directory, CLIENT_CERT, CLIENT_KEY)
    return ctx


class ServerTls:
    """The server's certificates, checked at start and re-read when they change."""

    def __init__(self, directory: Path, verify_peer: bool = False) -> None:
        self.directory = directory
        self.verify_peer = verify_peer
        self._stamp: tuple[Any, ...] | None = None
        self._ctx: ssl.SSLContext | None = None

    def _files(self) -> list[Path]:
        names = [SERVER_CERT, SERVER_KEY] + ([CA_CERT, CA_CRL] if self.verify_peer else [])
        return [self.directory / n for n in names]

    def _signature(self) -> tuple[Any, ...]:
        stamp: list[tuple[int, int, int] | None] = []
        for path in self._files():
            try:
                st = path.stat()
                stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def context(self) -> ssl.SSLContext:
        """The context for a new connection; the files are loaded again if they changed."""
        stamp = self._signature()
        if self._ctx is None or stamp != self._stamp:
            self._ctx = server_context(self.directory, self.verify_peer)
            self._stamp = stamp
        return self._ctx

    def https_context(self) -> ssl.SSLContext:
        """For the HTTPS API: a context each connection of which is made from ``context()``,
        so that it too sees renewed certificates and a CRL added later without a restart.

        (Switching contexts in an SNI callback is not enough: OpenSSL keeps the first
        context's verify flags, so a ``ca-crl.pem`` added later would go unchecked.)"""
        return _PerConnection(ssl.PROTOCOL_TLS_SERVER, tls=self)


class _PerConnection(ssl.SSLContext):
    """A server context whose ``wrap_bio`` (what asyncio's and uvloop's TLS layers call
    for each connection) uses a context freshly checked by ``ServerTls.context()``; when
    the files are broken, one that refuses the handshake, and a log line naming the file."""

    _tls: ServerTls

    def __new__(cls, protocol: int, *, tls: ServerTls) -> _PerConnection:
        self = super().__new__(cls, protocol)
        self._tls = tls
        return self

    def __init__(self, protocol: int, *, tls: ServerTls) -> None:
        pass

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        try:
            ctx = self._tls.context()
        except (TlsFileMissing, TlsFileInvalid) as exc:
            log.warning("https: TLS handshake refused: %s", exc.message)
            ctx = _refusing()
        return ctx.wrap_bio(*args, **kwargs)


def _refusing() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sni_callback = lambda *_: ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
    return ctx


def loose_key(path: Path) -> str | None:
    """A warning when the private key at ``path`` can be read by others than its owner."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & 0o044:
        return f"{path} can be read by others than its owner (mode {mode & 0o777:o}): chmod 600 it"
    return None


# --- what a server may listen on -----------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True when every address ``host`` stands for is a loopback one (a name that does not
    resolve is taken as reachable from elsewhere)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


@dataclass(frozen=True)
class ListenPolicy:
    mode: str  # off, on, require
    certificates: Path | None
    verify_peer: bool
    warnings: tuple[str, ...]


def listen_policy(
    mode: str | None,
    certificates: str | None,
    verify_peer: bool,
    nbd_tcp: tuple[str, int] | None,
    api_tcp: tuple[str, int] | None,
) -> ListenPolicy:
    """Decide, before anything listens, whether the server may start as asked.

    Without ``--tls``, NBD and API addresses on loopback (and unix sockets) are served in
    plain text; any other address is refused, as is plain text there unless ``--tls off``
    says so (then it is warned about). With ``--tls on|require`` the certificates are
    loaded once here, so a missing or broken file stops the start, named.
    """
    exposed = [
        (what, f"{host}:{port}")
        for what, addr in (("NBD", nbd_tcp), ("the control API", api_tcp))
        if addr is not None
        for host, port in [addr]
        if not is_loopback(host)
    ]
    if mode is None:
        mode = "require" if certificates else "off"
        if mode == "off" and exposed:
            what, address = exposed[0]
            raise InsecureListen(
                what=what,
                address=address,
                risk="read and overwrite every volume" if what == "NBD" else "see the API token",
                hint="give --tls require --tls-certificates DIR (make DIR with: deltavol tls init DIR "
                "--host NAME), listen on 127.0.0.1 or a unix socket, or say --tls off to accept it",
            )
    if mode == "off":
        if certificates or verify_peer:
            raise UsageError(msg="--tls-certificates and --tls-verify-peer need --tls on or --tls require")
        warnings = tuple(
            f"{what} on {address} is served in plain text (--tls off): anyone who can reach it "
            + ("can read and overwrite every volume" if what == "NBD" else "can read the API token")
            for what, address in exposed
        )
        return ListenPolicy("off", None, False, warnings)
    if not certificates:
        raise UsageError(msg=f"--tls {mode} needs --tls-certificates DIR ({INIT_HINT})")
    if mode == "on" and verify_peer:
        raise UsageError(
            msg="--tls on lets clients in without TLS, so --tls-verify-peer would not bind them: "
            "give --tls require --tls-verify-peer to verify every client"
        )
    directory = Path(certificates).expanduser().absolute()
    ServerTls(directory, verify_peer).context()  # every file there and usable, or a named error
    found = [w for w in [loose_key(directory / SERVER_KEY)] if w]
    if mode == "on" and nbd_tcp is not None and not is_loopback(nbd_tcp[0]):
        found.append(
            f"NBD on {nbd_tcp[0]}:{nbd_tcp[1]} also lets plain-text clients in (--tls on); "
            "--tls require refuses them"
        )
    if not verify_peer:
        found.extend(
            f"{what} on {address} verifies no client's certificate: anyone who can reach it "
            + ("can read and overwrite every volume" if what == "NBD" else "can try the API token")
            + "; give --tls-verify-peer (clients then need a certificate signed by the CA)"
            for what, address in exposed
        )
    warnings = tuple(found)
    return ListenPolicy(mode, directory, verify_peer, warnings)


# --- clients of remote targets ----------------------------------------------------------------
def client_tls(uri: str, certificates: str | None = None) -> dict[str, Any]:
    """What ``NbdClient.connect`` needs to reach an ``nbds://`` or ``nbds+unix://`` URI:
    ``{}`` for a plain URI, else ``tls_context`` and ``server_hostname``. Certificates come
    from ``?tls-certificates=DIR`` (libnbd's spelling), else ``certificates``."""
    parts = urlsplit(uri)
    if parts.scheme not in ("nbds", "nbds+unix"):
        return {}
    query = parse_qs(parts.query)
    directory = query.get("tls-certificates", [certificates])[0]
    hostname = query.get("tls-hostname", [parts.hostname if parts.scheme == "nbds" else None])[0]
    ctx = client_context(Path(directory) if directory else None, check_hostname=hostname is not None)
    return {"tls_context": ctx, "server_hostname": hostname}


def with_certificates(uri: str, directory: str) -> str:
    """``uri`` carrying ``tls-certificates=DIR`` in its query (libnbd's spelling)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("nbds", "nbds+unix"):
        raise UsageError(msg=f"--tls-certificates needs an nbds:// or nbds+unix:// target, not {uri!r}")
    if "tls-certificates" in parse_qs(parts.query):
        raise UsageError(msg=f"{uri!r} already names its certificates (tls-certificates=)")
    if parts.fragment:
        raise UsageError(msg=f"invalid NBD URI {uri!r}: no #fragment expected")
    return f"{uri}{'&' if parts.query else '?'}tls-certificates={quote(directory, safe='/')}"


def explain(exc: BaseException, uri: str) -> str | None:
    """A sentence for a failed certificate check found in ``exc``'s chain, else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            code, text = seen.verify_code, seen.verify_message or str(seen)
            parts = urlsplit(uri)
            directory = parse_qs(parts.query).get("tls-certificates", [None])[0]
            ca = f"the CA in {Path(directory) / CA_CERT}" if directory else "the system's CAs"
            if code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH (and 64: IP address mismatch)
                return f"its certificate names another host than {parts.hostname!r} ({text})"
            if code == 64:
                return f"its certificate names another address than {parts.hostname!r} ({text})"
            if code in (2, 18, 19, 20, 21):  # issuer unknown / self-signed / not trusted
                return f"its certificate is not signed by {ca} ({text})"
            return f"its certificate was refused: {text}"
        if isinstance(seen, ssl.SSLError):
            return f"TLS failed: {seen.reason or seen}"
        seen = seen.__cause__ or seen.__context__
    return None


# --- a quick-start set: deltavol tls init ---------------------------------------------------------
@dataclass(frozen=True)
class Made:
    directory: Path
    files: list[str]
    ca_directory: Path
    new_ca: bool  # the CA was made now (else an existing one signed)
    warnings: list[str]


def _private_dir(directory: Path, role: str) -> tuple[bool, str | None]:
    """Make ``directory`` 0700 if it is not there; leave an existing one as it is (a
    warning when others may look in it). Returns (made, warning)."""
    made = not directory.exists()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if made:
            os.chmod(directory, 0o700)  # the umask may have taken bits off
        mode = directory.stat().st_mode & 0o777
    except OSError as exc:
        raise TlsFileInvalid(path=directory, role=role, why=_why(exc)) from None
    if not made and mode & 0o077:
        return made, f"{directory} is open to others (mode {mode:o}): chmod 700 it"
    return made, None


def init(directory: Path, hosts: list[str], days: int = 825, ca_directory: Path | None = None) -> Made:
    """A server and a client certificate for ``hosts`` in ``directory``, signed by the CA
    of ``ca_directory`` (default: ``DIRECTORY-ca`` beside it), made there first when it
    holds no CA. The CA's key stays in its own directory, never in ``directory``, which is
    the one to copy to a host. Private keys 0600; a directory made here 0700. Refuses to
    overwrite any file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise UsageError(msg="tls init needs at least one --host NAME (the server's name or address)")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() or c in "/:@" for c in host):
                raise UsageError(
                    msg=f"invalid --host {host!r}: expected a DNS name or an IP address"
                ) from None
            names.append(x509.DNSName(host))
    ca_dir = ca_directory or directory.with_name(directory.name + "-ca")
    if ca_dir.resolve() == directory.resolve():
        raise UsageError(
            msg=f"the CA's directory must not be {directory}: its key ({CA_KEY}) would be copied "
            "to every host along with the certificates"
        )
    has_ca = [(ca_dir / n).exists() for n in (CA_CERT, CA_KEY)]
    if any(has_ca) and not all(has_ca):
        missing = CA_KEY if has_ca[0] else CA_CERT
        raise TlsFileMissing(path=ca_dir / missing, role=ROLES[missing], hint="a CA needs both files")
    if (directory / CA_KEY).exists():
        raise UsageError(
            msg=f"{directory / CA_KEY} is in the directory meant to be copied to a host: "
            f"move it to a directory of its own and give that with --ca"
        )
    files = [CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY]
    for name in files:
        if (directory / name).exists():
            raise AlreadyExists(kind="file", name=str(directory / name))

    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)  # a clock a bit behind

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def cert(
        subject: str, pub: Any, issuer: x509.Name | None, signer: Any, extensions: list[tuple[Any, bool]]
    ) -> x509.Certificate:
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "deltavol"),
                x509.NameAttribute(NameOID.COMMON_NAME, subject),
            ]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        )
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    def usage(sign_certs: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=not sign_certs,
            data_encipherment=False, key_agreement=False, key_cert_sign=sign_certs, crl_sign=sign_certs,
            encipher_only=False, decipher_only=False,
        )  # fmt: skip

    def pem_key(k: Any) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write(where: Path, name: str, data: bytes, mode: int) -> None:
        path = where / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(path, mode)  # the umask may have taken bits off; give exactly these
        except OSError as exc:
            raise TlsFileInvalid(path=path, role=ROLES[name], why=_why(exc)) from None

    warnings: list[str] = []
    new_ca = not all(has_ca)
    if new_ca:
        _, warning = _private_dir(ca_dir, "the CA's directory")
        warnings += [warning] if warning else []
        ca_key: Any = key()
        ca = cert(
            "deltavol CA",
            ca_key.public_key(),
            None,
            ca_key,
            [(x509.BasicConstraints(ca=True, path_length=0), True), (usage(True), True)],
        )
        write(ca_dir, CA_KEY, pem_key(ca_key), 0o600)
        write(ca_dir, CA_CERT, ca.public_bytes(serialization.Encoding.PEM), 0o644)
    else:
        try:
            ca = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        except (OSError, ValueError) as exc:
            raise TlsFileInvalid(path=ca_dir / CA_CERT, role=ROLES[CA_CERT], why=_why(exc)) from None
        try:
            ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise TlsFileInvalid(path=ca_dir / CA_KEY, role=ROLES[CA_KEY], why=_why(exc)) from None
        if ca_key.public_key() != ca.public_key():
            raise TlsFileInvalid(path=ca_dir / CA_KEY, role=ROLES[CA_KEY], why=f"not the key of {CA_CERT}")
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())

    def leaf(subject: str, purpose: Any, alt: list[x509.GeneralName] | None) -> tuple[Any, x509.Certificate]:
        k = key()
        exts: list[tuple[Any, bool]] = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (usage(False), True),
            (x509.ExtendedKeyUsage([purpose]), False),
            (aki, False),
        ]
        if alt:
            exts.append((x509.SubjectAlternativeName(alt), False))
        return k, cert(subject, k.public_key(), ca.subject, ca_key, exts)

    server_key, server = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, names)
    client_key, client = leaf(f"deltavol client {hosts[0]}", ExtendedKeyUsageOID.CLIENT_AUTH, None)

    _, warning = _private_dir(directory, "the certificates' directory")
    warnings += [warning] if warning else []
    contents = {
        CA_CERT: (ca.public_bytes(serialization.Encoding.PEM), 0o644),
        SERVER_CERT: (server.public_bytes(serialization.Encoding.PEM), 0o644),
        SERVER_KEY: (pem_key(server_key), 0o600),
        CLIENT_CERT: (client.public_bytes(serialization.Encoding.PEM), 0o644),
        CLIENT_KEY: (pem_key(client_key), 0o600),
    }
    for name, (data, mode) in contents.items():
        write(directory, name, data, mode)
    return Made(directory, files, ca_dir, new_ca, warnings)

"""deltavol.tls: certificate directories to contexts (checked with in-memory handshakes),
renewal without a restart, the listen policy, nbds:// URIs."""

from __future__ import annotations

import datetime
import os
import shutil
import ssl
import stat
from pathlib import Path

import pytest

from deltavol import tls
from deltavol.errors import AlreadyExists, InsecureListen, TlsFileInvalid, TlsFileMissing, UsageError


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tls.init(tmp_path_factory.mktemp("a") / "certs", ["localhost", "127.0.0.1"]).directory


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tls.init(tmp_path_factory.mktemp("b") / "certs", ["localhost"]).directory


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str | None = "localhost") -> None:
    """A TLS handshake between two contexts through memory; raises what either side raises.
    TLS 1.3 servers judge the client's certificate after the client is done: one record more."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    done = {"srv": False, "cli": False}
    for _ in range(10):
        for name, obj in (("cli", cli), ("srv", srv)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            cli.write(b"ping")
            s_in.write(c_out.read())
            assert srv.read(4) == b"ping"
            return
    raise AssertionError("handshake never finished")


def test_a_server_and_its_clients(certs: Path) -> None:
    handshake(tls.server_context(certs), tls.client_context(certs))
    handshake(tls.server_context(certs, verify_peer=True), tls.client_context(certs))
    handshake(tls.server_context(certs), tls.client_context(certs), hostname="127.0.0.1")


def test_the_server_is_verified_ca_and_host_name(certs: Path, other: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as exc:
        handshake(tls.server_context(other), tls.client_context(certs))
    assert "not signed by" in (tls.explain(exc.value, f"nbds://localhost/x?tls-certificates={certs}") or "")
    with pytest.raises(ssl.SSLCertVerificationError) as exc:
        handshake(tls.server_context(certs), tls.client_context(certs), hostname="db.example")
    assert "another host" in (tls.explain(exc.value, "nbds://db.example/x") or "")
    # over a unix socket: no name to check, the CA still is
    handshake(tls.server_context(certs), tls.client_context(certs, check_hostname=False), hostname=None)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tls.server_context(other), tls.client_context(certs, check_hostname=False), hostname=None)


def test_verify_peer_wants_a_client_certificate_of_the_ca(certs: Path, other: Path, tmp_path: Path) -> None:
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    shutil.copy(certs / "ca-cert.pem", ca_only)
    foreign = tmp_path / "foreign"
    shutil.copytree(ca_only, foreign)
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(other / name, foreign)
    handshake(tls.server_context(certs), tls.client_context(ca_only))  # not asked: fine
    for client in (ca_only, foreign):
        with pytest.raises(ssl.SSLError):
            handshake(tls.server_context(certs, verify_peer=True), tls.client_context(client))


def test_missing_and_broken_files_are_named(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(TlsFileMissing, match=r"nowhere/server-cert.pem is missing"):
        tls.server_context(tmp_path / "nowhere")
    half = tmp_path / "half"
    shutil.copytree(certs, half)
    (half / "client-key.pem").unlink()
    with pytest.raises(TlsFileMissing, match=r"half/client-key.pem is missing \(the client's private key\)"):
        tls.client_context(half)
    (half / "ca-cert.pem").unlink()
    tls.server_context(half)  # the CA is needed only to verify peers
    with pytest.raises(TlsFileMissing, match=r"ca-cert\.pem"):
        tls.server_context(half, verify_peer=True)
    (half / "server-key.pem").write_text("junk\n")
    with pytest.raises(TlsFileInvalid, match=r"half/server-key.pem cannot be used"):
        tls.server_context(half)
    (half / "server-cert.pem").write_text("junk\n")
    with pytest.raises(TlsFileInvalid, match=r"half/server-cert.pem cannot be used"):
        tls.server_context(half)


def test_a_renewed_certificate_is_used_without_a_restart(certs: Path, other: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    shutil.copytree(certs, live)
    server = tls.ServerTls(live)
    first = server.context()
    assert server.context() is first  # unchanged files: not loaded again
    https = server.https_context()
    handshake(https, tls.client_context(certs))
    for name in ("server-cert.pem", "server-key.pem"):
        shutil.copy(other / name, live / f".{name}")
        os.replace(live / f".{name}", live / name)
    assert server.context() is not first
    handshake(server.context(), tls.client_context(other))
    handshake(https, tls.client_context(other))  # the HTTPS context made before switches too
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(https, tls.client_context(certs))


def test_listen_policy() -> None:
    loop, net = ("127.0.0.1", 10809), ("0.0.0.0", 10809)
    assert tls.listen_policy(None, None, False, loop, ("localhost", 8080)).mode == "off"
    assert tls.listen_policy(None, None, False, ("::1", 1), None).warnings == ()
    for nbd, api in ((net, None), (loop, ("192.0.2.1", 8080)), (("::", 1), None)):
        with pytest.raises(InsecureListen, match="--tls off"):
            tls.listen_policy(None, None, False, nbd, api)
    off = tls.listen_policy("off", None, False, net, None)
    assert off.mode == "off" and "0.0.0.0:10809 is served in plain text" in off.warnings[0]
    with pytest.raises(UsageError, match="needs --tls-certificates"):
        tls.listen_policy("on", None, False, net, None)
    with pytest.raises(UsageError, match="need --tls on"):
        tls.listen_policy("off", None, True, loop, None)


def test_listen_policy_refuses_on_with_verify_peer(certs: Path) -> None:
    """--tls on lets plain clients in: verify-peer would bind only those who ask for TLS."""
    with pytest.raises(UsageError, match="--tls require --tls-verify-peer"):
        tls.listen_policy("on", str(certs), True, ("127.0.0.1", 10809), None)


def test_listen_policy_warns_of_network_addresses_that_verify_no_client(certs: Path) -> None:
    net, loop = ("0.0.0.0", 10809), ("127.0.0.1", 10809)
    nbd = tls.listen_policy("require", str(certs), False, net, None).warnings
    assert (
        len(nbd) == 1
        and "NBD on 0.0.0.0:10809 verifies no client" in nbd[0]
        and "--tls-verify-peer" in nbd[0]
    )
    api = tls.listen_policy("require", str(certs), False, loop, ("192.0.2.1", 8443)).warnings
    assert len(api) == 1 and "control API on 192.0.2.1:8443 verifies no client" in api[0]
    assert tls.listen_policy("require", str(certs), False, loop, ("::1", 8443)).warnings == ()
    assert tls.listen_policy("require", str(certs), True, net, ("0.0.0.0", 1)).warnings == ()


def test_listen_policy_with_certificates(certs: Path) -> None:
    net = ("0.0.0.0", 10809)
    chosen = tls.listen_policy(None, str(certs), True, net, None)
    assert (chosen.mode, chosen.certificates, chosen.verify_peer, chosen.warnings) == (
        "require",
        certs,
        True,
        (),
    )
    assert "plain-text clients" in tls.listen_policy("on", str(certs), False, net, None).warnings[0]


def test_nbds_uris(certs: Path) -> None:
    assert tls.client_tls("nbd://h/x") == {}
    assert tls.client_tls("nbd+unix:///x?socket=/s") == {}
    tcp = tls.client_tls(f"nbds://h.example:10810/x?tls-certificates={certs}")
    assert tcp["server_hostname"] == "h.example" and tcp["tls_context"].check_hostname
    unix = tls.client_tls(f"nbds+unix:///x?socket=/s&tls-certificates={certs}")
    assert unix["server_hostname"] is None and not unix["tls_context"].check_hostname
    named = tls.client_tls(f"nbds+unix:///x?socket=/s&tls-hostname=h&tls-certificates={certs}")
    assert named["server_hostname"] == "h" and named["tls_context"].check_hostname
    assert tls.client_tls("nbds://h/x", str(certs))["tls_context"].verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(TlsFileMissing):
        tls.client_tls("nbds://h/x?tls-certificates=/nowhere")


def test_with_certificates() -> None:
    assert tls.with_certificates("nbds://h/x", "/c") == "nbds://h/x?tls-certificates=/c"
    assert (
        tls.with_certificates("nbds+unix:///x?socket=/s", "/c")
        == "nbds+unix:///x?socket=/s&tls-certificates=/c"
    )
    assert tls.with_certificates("nbds://h/x", "/a b") == "nbds://h/x?tls-certificates=/a%20b"
    with pytest.raises(TlsFileMissing, match=r"/a b/ca-cert\.pem"):  # read back as it was given
        tls.client_tls(tls.with_certificates("nbds://h/x", "/a b"))
    with pytest.raises(UsageError, match="nbds://"):
        tls.with_certificates("nbd://h/x", "/c")
    with pytest.raises(UsageError, match="already"):
        tls.with_certificates("nbds://h/x?tls-certificates=/a", "/c")


def test_init_refuses_to_overwrite(certs: Path) -> None:
    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    with pytest.raises(AlreadyExists):
        tls.init(certs, ["x"])
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == before


def test_init_keeps_the_ca_key_apart_and_signs_a_set_per_host(tmp_path: Path) -> None:
    a = tls.init(tmp_path / "a", ["a.example"])
    assert a.new_ca and a.ca_directory == tmp_path / "a-ca"
    assert not (tmp_path / "a" / "ca-key.pem").exists()
    assert sorted(p.name for p in (tmp_path / "a-ca").iterdir()) == ["ca-cert.pem", "ca-key.pem"]
    assert stat.S_IMODE((tmp_path / "a-ca").stat().st_mode) == 0o700
    b = tls.init(tmp_path / "b", ["b.example"], ca_directory=tmp_path / "a-ca")
    assert not b.new_ca and not (tmp_path / "b" / "ca-key.pem").exists()
    assert (tmp_path / "b" / "ca-cert.pem").read_bytes() == (tmp_path / "a" / "ca-cert.pem").read_bytes()
    assert (tmp_path / "b" / "server-key.pem").read_bytes() != (
        tmp_path / "a" / "server-key.pem"
    ).read_bytes()
    # each host's server certificate names that host, and each trusts the other's client
    handshake(tls.server_context(b.directory, verify_peer=True), tls.client_context(a.directory), "b.example")
    handshake(tls.server_context(a.directory, verify_peer=True), tls.client_context(b.directory), "a.example")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tls.server_context(b.directory), tls.client_context(a.directory), "a.example")
    with pytest.raises(UsageError, match="must not be"):
        tls.init(tmp_path / "c", ["c"], ca_directory=tmp_path / "c")
    assert not (tmp_path / "c").exists()
    (tmp_path / "d").mkdir()
    shutil.copy(tmp_path / "a-ca" / "ca-key.pem", tmp_path / "d" / "ca-key.pem")
    with pytest.raises(UsageError, match="move it"):
        tls.init(tmp_path / "d", ["d"])


def test_init_leaves_an_existing_directory_as_it_is_and_warns_when_open(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    made = tls.init(shared, ["h"])
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert len(made.warnings) == 1 and str(shared) in made.warnings[0] and "755" in made.warnings[0]
    assert stat.S_IMODE((shared / "server-key.pem").stat().st_mode) == 0o600
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert tls.init(private, ["h"]).warnings == []


def _revoke(ca_dir: Path, cert_file: Path, crl_file: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca = x509.load_pem_x509_certificate((ca_dir / "ca-cert.pem").read_bytes())
    key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    leaf = x509.load_pem_x509_certificate(cert_file.read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    revoked = x509.RevokedCertificateBuilder().serial_number(leaf.serial_number).revocation_date(now).build()
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - datetime.timedelta(hours=1))
        .next_update(now + datetime.timedelta(days=1))
        .add_revoked_certificate(revoked)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    crl_file.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def test_a_crl_added_while_serving_is_enforced_by_the_https_context(tmp_path: Path) -> None:
    made = tls.init(tmp_path / "live", ["localhost"])
    client = tls.client_context(shutil.copytree(made.directory, tmp_path / "client"))
    server = tls.ServerTls(made.directory, verify_peer=True)
    https = server.https_context()  # made before the CRL, as at the server's start
    handshake(https, client)
    handshake(server.context(), client)
    _revoke(made.ca_directory, made.directory / "client-cert.pem", made.directory / "ca-crl.pem")
    with pytest.raises(ssl.SSLError, match="revoked"):
        handshake(https, client)
    with pytest.raises(ssl.SSLError, match="revoked"):
        handshake(server.context(), client)
    (made.directory / "ca-crl.pem").write_text("not a CRL\n")  # broken: refused, not let through
    with pytest.raises(ssl.SSLError):
        handshake(https, client)


def test_server_contexts_refuse_renegotiation_and_loose_keys_are_named(tmp_path: Path) -> None:
    made = tls.init(tmp_path / "c", ["localhost"])
    assert tls.server_context(made.directory).options & ssl.OP_NO_RENEGOTIATION
    assert tls.loose_key(made.directory / "server-key.pem") is None
    os.chmod(made.directory / "server-key.pem", 0o640)
    assert "chmod 600" in str(tls.loose_key(made.directory / "server-key.pem"))
    chosen = tls.listen_policy("require", str(made.directory), True, ("127.0.0.1", 1), None)
    assert any("server-key.pem can be read by others" in w for w in chosen.warnings)

"""Remote targets over TLS: deltavol copying to qemu-nbd with tls-creds-x509 and to nbdkit
--tls=require, full and incremental, exact; targets whose certificate is not signed by the
CA, or names another host, refused before a byte of data is sent."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import make_certs
from tests.harness import DELTAVOL, Server, require
from tests.interop.peers import run, sha
from tests.interop.tls import TlsServer, free_port, nbdcopy_sha, nbdkit_tls, qemu_nbd_tls, target
from tests.sessions.common import MiB, Model, apply, differing_chunks, start_update, wait_for

pytestmark = pytest.mark.interop

SIZE = 16 * MiB


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """Retries off: a refused target leaves the session ``failed`` for the test to see."""
    srv = Server(tmp_path / "data", "--retry-limit", "0")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        srv.log.close()
    assert "Traceback" not in srv.log_path.read_text()


def source(server: Server) -> Model:
    server.cli("volume", "create", "src", "--size", str(SIZE))
    model = Model(SIZE)
    apply(server, "src", model.write(0xA1, 0, 3 * MiB), model.write(0xA2, 9 * MiB, 2 * MiB))
    return model


def assert_target(uri: str, want: bytes, tmp: Path) -> None:
    got = nbdcopy_sha(uri, tmp)
    if got != hashlib.sha256(want).hexdigest():
        image = (tmp / "dump.img").read_bytes()
        raise AssertionError(f"target differs in chunks {differing_chunks(image, want)}")


def full_then_incremental(server: Server, model: Model, uri: str, tmp: Path) -> None:
    server.cli("session", "update", "s", "--wait")
    assert_target(uri, model.snapshot(), tmp)
    apply(server, "src", *model.chunks(0xB3, list(range(0, 256, 7))), model.zero(9 * MiB, MiB))
    st = start_update(server)
    assert st["update"]["kind"] == "incremental"
    st = wait_for(server, lambda s: s["state"] == "idle" and s["consistent"], "idle")
    assert st["update"]["bytes_total"] < SIZE // 4  # only what changed went over
    assert_target(uri, model.snapshot(), tmp)


def test_qemu_nbd_tls_target_full_and_incremental(server: Server, tls_certs: Path, tmp_path: Path) -> None:
    model = source(server)
    image = tmp_path / "t.img"
    image.write_bytes(b"\x77" * SIZE)  # stale bytes everywhere, over the source's holes too
    port = free_port()
    uri = f"nbds://localhost:{port}/t?tls-certificates={tls_certs}"
    with target(qemu_nbd_tls(image, tls_certs, port), port=port):
        server.cli("session", "create", "s", "--source", "src", "--target", uri)
        full_then_incremental(server, model, uri, tmp_path)
    assert image.read_bytes() == model.snapshot()


def test_nbdkit_tls_target_full_and_incremental(server: Server, tls_certs: Path, tmp_path: Path) -> None:
    model = source(server)
    port = free_port()
    with target(nbdkit_tls(tls_certs, SIZE, port=port), port=port):
        plain = f"nbds://127.0.0.1:{port}/t"  # an IP address, checked against the certificate's
        server.cli(
            "session",
            "create",
            "s",
            "--source",
            "src",
            "--target",
            plain,
            "--tls-certificates",
            str(tls_certs),
        )
        assert server.status()["target"] == f"{plain}?tls-certificates={tls_certs}"
        full_then_incremental(server, model, f"{plain}?tls-certificates={tls_certs}", tmp_path)


def test_nbds_unix_target(server: Server, tls_certs: Path, tmp_path: Path) -> None:
    model = source(server)
    sock = tmp_path / "k.sock"
    uri = f"nbds+unix:///t?socket={sock}&tls-certificates={tls_certs}"
    with target(nbdkit_tls(tls_certs, SIZE, sock=sock), sock=sock):
        server.cli("session", "create", "s", "--source", "src", "--target", uri)
        server.cli("session", "update", "s", "--wait")
        assert_target(uri, model.snapshot(), tmp_path)


def signed_for(ca: Path, where: Path, host: str) -> Path:
    """A server's certificate dir for ``host``, signed by the CA of ``ca`` (certtool)."""
    require("certtool")
    where.mkdir()
    shutil.copy(ca / "ca-cert.pem", where / "ca-cert.pem")
    (where / "info").write_text(
        f'cn = "{host}"\ndns_name = "{host}"\ntls_www_server\nsigning_key\nencryption_key\n'
    )
    key, cert = where / "server-key.pem", where / "server-cert.pem"
    run("certtool", "--generate-privkey", "--key-type=ecdsa", "--outfile", str(key))
    run(
        "certtool", "--generate-certificate", "--load-privkey", str(key),
        "--load-ca-certificate", str(ca / "ca-cert.pem"), "--load-ca-privkey", str(ca / "ca-key.pem"),
        "--template", str(where / "info"), "--outfile", str(cert),
    )  # fmt: skip
    return where


@pytest.mark.parametrize("wrong", ["another CA", "another host"])
def test_an_untrusted_target_is_refused_before_a_byte_is_sent(
    server: Server, tls_certs: Path, tmp_path: Path, wrong: str
) -> None:
    """Create is refused (as for an unreachable target); a session whose target later shows
    such a certificate goes ``failed``; the target's bytes never change."""
    model = source(server)
    if wrong == "another CA":
        trusted, good = tls_certs, tls_certs
        bad, says = make_certs(tmp_path / "evil", ca_name="some other CA"), "not signed by the CA"
    else:  # signed by the CA the client trusts, for another name
        bad = make_certs(tmp_path / "other-host", hosts=("db.example",))
        trusted, good, says = (
            bad,
            signed_for(bad, tmp_path / "good", "localhost"),
            "another host than 'localhost'",
        )
    image = tmp_path / "t.img"
    image.write_bytes(b"\x77" * SIZE)
    before = sha(image)
    port = free_port()
    uri = f"nbds://localhost:{port}/t?tls-certificates={trusted}"
    with target(qemu_nbd_tls(image, bad, port), port=port):
        out = server.run("session", "create", "s", "--source", "src", "--target", uri)
        assert out.returncode == 1 and says in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        assert server.cli("session", "list", "--json").strip() == "[]"
    assert sha(image) == before

    with target(qemu_nbd_tls(image, good, port), port=port):  # trusted: a session, a full copy
        server.cli("session", "create", "s", "--source", "src", "--target", uri)
        server.cli("session", "update", "s", "--wait")
    after_full = image.read_bytes()
    assert after_full == model.snapshot()
    apply(server, "src", *model.chunks(0xC4, [1, 2, 3]))
    with target(qemu_nbd_tls(image, bad, port), port=port):  # then the wrong certificate
        start_update(server)
        st = wait_for(server, lambda s: s["state"] == "failed", "failed", failed_ok=True)
    assert says in st["last_error"] and str(port) in st["last_error"], st["last_error"]
    assert image.read_bytes() == after_full


def test_deltavol_to_deltavol_verifying_each_other(server: Server, tmp_path: Path) -> None:
    """The README's two hosts on one: a set per host from `deltavol tls init`, signed by one
    CA whose key is in neither; the target a deltavol server that requires TLS and a client
    certificate of that CA. The source presents its own set's client certificate."""
    dr_certs, prod_certs, ca = tmp_path / "dr-tls", tmp_path / "prod-tls", tmp_path / "ca"
    run(
        str(DELTAVOL),
        "tls",
        "init",
        str(dr_certs),
        "--ca",
        str(ca),
        "--host",
        "localhost",
        "--host",
        "127.0.0.1",
    )
    run(str(DELTAVOL), "tls", "init", str(prod_certs), "--ca", str(ca), "--host", "prod.example")
    assert not (dr_certs / "ca-key.pem").exists() and not (prod_certs / "ca-key.pem").exists()
    certs = prod_certs
    model = source(server)
    dr = TlsServer(
        tmp_path / "dr", "--tls", "require", "--tls-certificates", str(dr_certs), "--tls-verify-peer"
    )
    dr.start()
    try:
        dr.cli("volume", "create", "copy", "--size", str(SIZE))
        uri = f"nbds://localhost:{dr.port}/copy"
        server.cli(
            "session", "create", "s", "--source", "src", "--target", uri, "--tls-certificates", str(certs)
        )
        server.cli("session", "update", "s", "--wait")
        assert dr.image("copy") == model.snapshot()
        apply(server, "src", *model.chunks(0xD5, [0, 17, 200]))
        start_update(server)
        wait_for(server, lambda s: s["state"] == "idle" and s["consistent"], "idle")
        assert dr.image("copy") == model.snapshot()
    finally:
        dr.stop()
        dr.log.close()
    assert "Traceback" not in dr.log_path.read_text()


def test_restore_from_a_tls_target(server: Server, tls_certs: Path, tmp_path: Path) -> None:
    """The restore reads the copy back over TLS: the changed chunks only, bytes exact."""
    model = source(server)
    sock = tmp_path / "k.sock"
    uri = f"nbds+unix:///t?socket={sock}&tls-certificates={tls_certs}"
    with target(nbdkit_tls(tls_certs, SIZE, sock=sock), sock=sock):
        server.cli("session", "create", "s", "--source", "src", "--target", uri)
        server.cli("session", "update", "s", "--wait")
        at_pit = model.snapshot()
        apply(server, "src", *model.chunks(0x66, [1, 2, 100]))
        out = server.run("session", "restore", "s", "--wait", "--json")
        assert out.returncode == 0, out.stderr
        st = wait_for(server, lambda s: s["state"] == "idle", "restored")
        assert st["consistent"] and st["update"]["kind"] == "restore", st
        assert st["update"]["bytes_done"] == 3 * 64 * 1024, st
        assert server.image("src") == at_pit

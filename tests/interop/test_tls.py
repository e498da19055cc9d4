"""deltavol serving over TLS to real clients: qemu-io and qemu-img with tls-creds-x509,
nbdinfo and nbdcopy with nbds:// URIs; refusals that change nothing; what may not be
served in plain text; the HTTPS control API; the data dir's permissions; tls init.

Certificates come from certtool (``tls_certs``, ``tests/certs.py``) and from
``deltavol tls init``, each used by the other's peers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import make_certs
from tests.harness import DELTAVOL, Server, require
from tests.interop.peers import run, sha
from tests.interop.tls import (
    TlsServer,
    client_dir,
    free_port,
    image_opts,
    nbdcopy_sha,
    qemu_io_tls,
    tls_object,
    wait_port,
)

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def require_server(tmp_path: Path, tls_certs: Path) -> Iterator[TlsServer]:
    """TLS required, clients' certificates verified; no traceback in its log."""
    srv = TlsServer(
        tmp_path / "data", "--tls", "require", "--tls-certificates", str(tls_certs), "--tls-verify-peer"
    )
    srv.start()
    try:
        srv.cli("volume", "create", "v", "--size", str(SIZE))
        yield srv
    finally:
        srv.stop()
        srv.log.close()
    assert "Traceback" not in srv.log_path.read_text()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second CA's set: its certificates mean nothing to a peer of ``tls_certs``."""
    return make_certs(tmp_path_factory.mktemp("other"), ca_name="some other CA")


# --- real clients over TLS ------------------------------------------------------------------------
def test_qemu_io_writes_and_reads_patterns_over_tls(require_server: TlsServer, tls_certs: Path) -> None:
    spans = [(0, 512), (4095, 3), (65535, 65538), (MiB + 7, 300_000), (SIZE - 1, 1)]
    port = require_server.port
    qemu_io_tls(tls_certs, port, "v", *(f"write -P {0x21 + i} {o} {n}" for i, (o, n) in enumerate(spans)))
    qemu_io_tls(tls_certs, port, "v", "write -z 8M 1M", "discard 10M 64K", "flush")
    qemu_io_tls(tls_certs, port, "v", *(f"read -P {0x21 + i} {o} {n}" for i, (o, n) in enumerate(spans)))
    image = require_server.image("v")
    for i, (o, n) in enumerate(spans):
        assert image[o : o + n] == bytes([0x21 + i]) * n
    assert image[8 * MiB : 9 * MiB] == bytes(MiB)
    assert image[512:4095] == bytes(4095 - 512)


def test_qemu_img_converts_in_and_out_over_tls(
    require_server: TlsServer, tls_certs: Path, tmp_path: Path
) -> None:
    require("qemu-img")
    data = bytearray(random.Random(5).randbytes(SIZE))
    data[4 * MiB : 8 * MiB] = bytes(4 * MiB)  # zeroes qemu-img may send as WRITE_ZEROES
    src = tmp_path / "in.img"
    src.write_bytes(data)
    obj, opts = tls_object(tls_certs), image_opts(require_server.port, "v")
    run("qemu-img", "convert", "-n", "--object", obj, "-f", "raw", "--target-image-opts", str(src), opts)
    assert require_server.image("v") == bytes(data)
    out = tmp_path / "out.img"
    run("qemu-img", "convert", "--object", obj, "--image-opts", "-O", "raw", opts, str(out))
    assert sha(out) == sha(src)


def test_nbdinfo_and_nbdcopy_with_nbds_uris(
    require_server: TlsServer, tls_certs: Path, tmp_path: Path
) -> None:
    require("nbdinfo", "nbdcopy")
    uri = require_server.nbds("v", tls_certs)
    info = json.loads(run("nbdinfo", "--json", uri).stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == SIZE
    src = tmp_path / "in.img"
    src.write_bytes(random.Random(6).randbytes(SIZE))
    run("nbdcopy", str(src), uri)
    assert require_server.image("v") == src.read_bytes()
    assert nbdcopy_sha(require_server.nbds("v", tls_certs, host="127.0.0.1"), tmp_path) == sha(src)


def test_fio_writes_and_verifies_over_tls(tmp_path: Path, tls_certs: Path) -> None:
    """fio's engine (libnbd) may not read tls-certificates from a URI: it finds the CA in
    $HOME/.pki/libnbd, as libnbd does by default (without presenting a client certificate
    from there: this server does not ask for one)."""
    require("fio")
    shutil.copytree(tls_certs, tmp_path / "home" / ".pki" / "libnbd")
    srv = TlsServer(tmp_path / "data", "--tls", "require", "--tls-certificates", str(tls_certs))
    srv.start()
    try:
        srv.cli("volume", "create", "v", "--size", str(SIZE))
        common = [
            "fio", "--ioengine=nbd", f"--uri=nbds://localhost:{srv.port}/v", "--size=8M",
            "--iodepth=16", "--bsrange=4k-64k", "--verify=crc32c", "--output-format=json",
            "--randseed=42", "--verify_state_save=0", "--name=w", "--rw=randwrite",
        ]  # fmt: skip
        env = {**os.environ, "HOME": str(tmp_path / "home")}
        for extra in ("--do_verify=1", "--verify_only"):
            out = subprocess.run([*common, extra], capture_output=True, text=True, env=env, timeout=120)
            assert out.returncode == 0, out.stderr
            report = json.loads(out.stdout[out.stdout.index("{") :])
            assert all(job["error"] == 0 for job in report["jobs"])
        assert srv.image("v")[: 8 * MiB] != bytes(8 * MiB)
        plain = [*common[:2], f"--uri=nbd://localhost:{srv.port}/v", *common[3:], "--verify_only"]
        out = subprocess.run(plain, capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode != 0  # and without TLS, nothing
    finally:
        srv.stop()


# --- refusals that change nothing ---------------------------------------------------------------
def assert_unchanged_and_serving(srv: TlsServer, before: bytes, certs: Path) -> None:
    assert srv.image("v") == before
    assert srv.proc is not None and srv.proc.poll() is None
    qemu_io_tls(certs, srv.port, "v", f"read -P 0x5a 0 {MiB}")  # others are still served


def test_a_plain_client_is_refused_by_require(require_server: TlsServer, tls_certs: Path) -> None:
    require("nbdinfo", "qemu-io")
    qemu_io_tls(tls_certs, require_server.port, "v", f"write -P 0x5a 0 {MiB}")
    before = require_server.image("v")
    plain = f"nbd://localhost:{require_server.port}/v"
    out = run("nbdinfo", plain, ok=False)
    # as against nbdkit --tls=require: libnbd reports NBD_REP_ERR_TLS_REQD as not supported
    assert out.returncode != 0 and "nbd_opt_go" in out.stderr, out.stderr
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 4096", plain, ok=False)
    assert out.returncode != 0 or "failed" in out.stdout + out.stderr
    assert_unchanged_and_serving(require_server, before, tls_certs)


@pytest.mark.parametrize("client", ["none", "other CA"])
def test_clients_without_a_certificate_of_the_ca_are_refused_by_verify_peer(
    require_server: TlsServer, tls_certs: Path, other_ca: Path, tmp_path: Path, client: str
) -> None:
    qemu_io_tls(tls_certs, require_server.port, "v", f"write -P 0x5a 0 {MiB}")
    before = require_server.image("v")
    certs = client_dir(tmp_path / "client", tls_certs, None if client == "none" else other_ca)
    qemu_io_tls(certs, require_server.port, "v", "write -P 0x66 0 4096", ok=False)
    out = run("nbdinfo", require_server.nbds("v", certs), ok=False)
    assert out.returncode != 0
    assert_unchanged_and_serving(require_server, before, tls_certs)


def test_a_client_that_does_not_trust_the_server_sends_nothing(
    require_server: TlsServer, tls_certs: Path, other_ca: Path, tmp_path: Path
) -> None:
    qemu_io_tls(tls_certs, require_server.port, "v", f"write -P 0x5a 0 {MiB}")
    before = require_server.image("v")
    src = tmp_path / "in.img"
    src.write_bytes(b"\x66" * SIZE)
    out = run("nbdcopy", str(src), require_server.nbds("v", other_ca), ok=False)
    assert out.returncode != 0 and "certificate" in out.stderr.lower(), out.stderr
    assert_unchanged_and_serving(require_server, before, tls_certs)


def test_garbage_before_and_inside_the_handshake_leaves_the_server_up(
    require_server: TlsServer, tls_certs: Path
) -> None:
    qemu_io_tls(tls_certs, require_server.port, "v", f"write -P 0x5a 0 {MiB}")
    before = require_server.image("v")
    rng = random.Random(9)
    for prefix in (b"", b"\x00\x00\x00\x03"):  # at the greeting, and as a client's flags
        with socket.create_connection(("127.0.0.1", require_server.port), timeout=5) as s:
            s.recv(18)  # the greeting
            s.sendall(prefix + rng.randbytes(4096))
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    # STARTTLS acknowledged, then garbage where the TLS ClientHello belongs
    starttls = b"IHAVEOPT" + (5).to_bytes(4, "big") + (0).to_bytes(4, "big")
    with socket.create_connection(("127.0.0.1", require_server.port), timeout=5) as s:
        s.recv(18)
        s.sendall((3).to_bytes(4, "big") + starttls)
        reply = s.recv(20)
        assert reply[:8] == bytes.fromhex("0003e889045565a9") and reply[12:16] == (1).to_bytes(4, "big")
        s.sendall(rng.randbytes(8192))
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
    assert_unchanged_and_serving(require_server, before, tls_certs)


def test_tls_on_serves_plain_and_tls_clients(tmp_path: Path, tls_certs: Path) -> None:
    srv = TlsServer(tmp_path / "data", "--tls", "on", "--tls-certificates", str(tls_certs))
    srv.start()
    try:
        srv.cli("volume", "create", "v", "--size", str(SIZE))
        run("qemu-io", "-f", "raw", "-c", "write -P 0x31 0 64K", f"nbd://localhost:{srv.port}/v")
        qemu_io_tls(tls_certs, srv.port, "v", "read -P 0x31 0 64K", "write -P 0x32 64K 64K")
        assert srv.image("v")[: 128 * 1024] == b"\x31" * 65536 + b"\x32" * 65536
    finally:
        srv.stop()


def test_renewed_certificates_are_used_without_a_restart(
    tmp_path: Path, tls_certs: Path, other_ca: Path
) -> None:
    certs = tmp_path / "certs"
    shutil.copytree(tls_certs, certs)
    srv = TlsServer(tmp_path / "data", "--tls", "require", "--tls-certificates", str(certs))
    srv.start()
    try:
        srv.cli("volume", "create", "v", "--size", str(SIZE))
        run("nbdinfo", srv.nbds("v", tls_certs))
        for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):  # renewed by another CA
            tmp = certs / f".{name}"
            shutil.copy(other_ca / name, tmp)
            os.replace(tmp, certs / name)
        assert run("nbdinfo", srv.nbds("v", tls_certs), ok=False).returncode != 0
        run("nbdinfo", srv.nbds("v", other_ca))
    finally:
        srv.stop()


# --- what may listen on a network -------------------------------------------------------------------
def serve(data: Path, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DELTAVOL, "serve", "--data-dir", str(data), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("flag", ["--nbd", "--api"])
def test_plain_text_on_a_network_address_is_refused_at_start(tmp_path: Path, flag: str) -> None:
    port = free_port()
    args = [flag, f"0.0.0.0:{port}"] + (["--nbd-socket", str(tmp_path / "n.sock")] if flag == "--api" else [])
    out = serve(tmp_path / "data", *args)
    assert out.returncode == 2, out
    assert "plain text" in out.stderr and "--tls require --tls-certificates" in out.stderr
    assert "--tls off" in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1
    assert not (tmp_path / "data").exists()  # nothing made, nothing listened
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_tls_settings_that_cannot_work_are_refused_naming_what(tmp_path: Path, tls_certs: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--tls", "require"], "needs --tls-certificates"),
        (["--tls", "require", "--tls-certificates", str(empty)], f"{empty}/server-cert.pem is missing"),
        (["--tls", "off", "--tls-certificates", str(tls_certs)], "need --tls on or --tls require"),
    ]
    half = tmp_path / "half"
    shutil.copytree(tls_certs, half)
    (half / "ca-cert.pem").unlink()
    cases.append((["--tls", "require", "--tls-certificates", str(half), "--tls-verify-peer"], "ca-cert.pem"))
    bad = tmp_path / "bad"
    shutil.copytree(tls_certs, bad)
    (bad / "server-key.pem").write_text("not a key\n")
    cases.append(
        (["--tls", "require", "--tls-certificates", str(bad)], f"{bad}/server-key.pem cannot be used")
    )
    for args, says in cases:
        out = serve(tmp_path / "data", "--nbd", f"127.0.0.1:{free_port()}", *args)
        assert out.returncode == 2 and says in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_tls_off_on_a_network_address_warns_at_start_and_in_volume_list(tmp_path: Path) -> None:
    port = free_port()
    srv = Server(tmp_path / "data", "--nbd", f"0.0.0.0:{port}", "--tls", "off")
    srv.start()
    try:
        wait_port(port, srv.proc)
        out = srv.run("volume", "list")
        assert out.returncode == 0 and f"NBD on 0.0.0.0:{port} is served in plain text" in out.stderr
        assert "warning" in srv.log_path.read_text()
    finally:
        srv.stop()
    quiet = Server(tmp_path / "data2")
    quiet.start()
    try:
        assert "warning" not in quiet.run("volume", "list").stderr
    finally:
        quiet.stop()


# --- HTTPS control API --------------------------------------------------------------------------------
def test_the_tcp_api_is_https_verified_against_the_ca(
    tmp_path: Path, tls_certs: Path, other_ca: Path
) -> None:
    api = free_port()
    srv = Server(
        tmp_path / "data", "--api", f"127.0.0.1:{api}", "--tls", "require",
        "--tls-certificates", str(tls_certs), "--tls-verify-peer",
    )  # fmt: skip
    srv.start()
    try:
        wait_port(api, srv.proc)
        srv.cli("volume", "create", "v", "--size", "1MiB")
        for host in ("localhost", "127.0.0.1"):
            url = f"https://{host}:{api}"
            out = srv.run("--api-url", url, "--api-certificates", str(tls_certs), "volume", "list", "--json")
            assert out.returncode == 0, out.stderr
            assert [v["name"] for v in json.loads(out.stdout)] == ["v"]
        url = f"https://localhost:{api}"
        refusals = [
            ([], "cannot trust"),  # the system's CAs do not know this one
            (["--api-certificates", str(other_ca)], "cannot trust"),
            (["--api-certificates", str(client_dir(tmp_path / "c", tls_certs, None))], "client-cert.pem"),
            (["--api-certificates", str(tls_certs), "--token", "wrong"], "token"),
        ]
        for args, says in refusals:
            out = srv.run("--api-url", url, *args, "volume", "create", "w", "--size", "1MiB")
            assert out.returncode == 1 and says in out.stderr, (args, out.stderr)
            assert "Traceback" not in out.stderr
        out = srv.run("--api-url", f"http://localhost:{api}", "volume", "list")
        assert out.returncode == 1 and "https" in out.stderr, out.stderr
        assert [v["name"] for v in json.loads(srv.cli("volume", "list", "--json"))] == ["v"]
    finally:
        srv.stop()


# --- the data dir -------------------------------------------------------------------------------------
def test_the_data_dir_is_private_and_fixed_at_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "volumes").mkdir(parents=True)
    os.chmod(data, 0o755)
    os.chmod(data / "volumes", 0o755)
    (data / "notes").write_bytes(b"")  # a file someone left there, readable by all
    os.chmod(data / "notes", 0o644)
    srv = Server(data)
    srv.start()
    try:
        srv.cli("volume", "create", "v", "--size", "1MiB")
        modes = {}
        for top, dirs, files in os.walk(data):
            for name in [*dirs, *files]:
                path = Path(top, name)
                modes[str(path.relative_to(data))] = stat.S_IMODE(path.lstat().st_mode)
        modes["."] = stat.S_IMODE(data.stat().st_mode)
        assert modes["."] == 0o700 and modes["volumes"] == 0o700
        assert modes["notes"] == 0o600 and modes["volumes/v.img"] == 0o600
        assert modes["api.sock"] == 0o600 and modes["deltavol.db"] == 0o600
        loose = {k: oct(m) for k, m in modes.items() if m & 0o077}
        assert not loose, loose
        assert stat.S_IMODE(srv.sock.stat().st_mode) == 0o600  # the NBD socket too
    finally:
        srv.stop()


# --- deltavol tls init ----------------------------------------------------------------------------------
def test_tls_init_makes_certificates_qemu_nbd_and_nbdkit_accept(tmp_path: Path) -> None:
    require("qemu-nbd", "nbdkit", "nbdinfo", "qemu-io")
    certs = tmp_path / "certs"
    out = run(str(DELTAVOL), "tls", "init", str(certs), "--host", "localhost", "--host", "127.0.0.1")
    assert "ca-cert.pem" in out.stdout and f"{certs}-ca" in out.stdout
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in certs.iterdir()}
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    assert all(modes[k] == 0o600 for k in ("server-key.pem", "client-key.pem")), modes
    assert set(modes) == {"ca-cert.pem"} | {
        f"{r}-{k}.pem" for r in ("server", "client") for k in ("cert", "key")
    }
    ca = Path(f"{certs}-ca")  # the CA's key is kept apart from the set a host is given
    assert (
        stat.S_IMODE(ca.stat().st_mode) == 0o700 and stat.S_IMODE((ca / "ca-key.pem").stat().st_mode) == 0o600
    )
    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    again = run(str(DELTAVOL), "tls", "init", str(certs), "--host", "x", ok=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == before

    port = free_port()  # nbdkit verifying the client: both certificates are good
    proc = subprocess.Popen(
        ["nbdkit", "-f", "--tls=require", f"--tls-certificates={certs}", "--tls-verify-peer",
         "-i", "127.0.0.1", "-p", str(port), "pattern", "1M"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port, proc)
        info = json.loads(
            run("nbdinfo", "--json", f"nbds://localhost:{port}/?tls-certificates={certs}").stdout
        )
        assert info["TLS"] is True and info["exports"][0]["export-size"] == MiB
    finally:
        proc.kill()
        proc.wait()
    image = tmp_path / "q.img"
    image.write_bytes(bytes(MiB))
    port = free_port()
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "--object", tls_object(certs, "server") + ",verify-peer=on",
         "--tls-creds", "tls0", "-b", "127.0.0.1", "-p", str(port), "-x", "v", str(image)],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port, proc)
        qemu_io_tls(certs, port, "v", "write -P 0x42 0 64K")
    finally:
        proc.kill()
        proc.wait()
    assert image.read_bytes()[:65536] == b"\x42" * 65536


def test_tls_init_refuses_bad_hosts_and_makes_nothing(tmp_path: Path) -> None:
    for args in (["--host", "a b"], ["--host", "x/y"]):
        out = run(str(DELTAVOL), "tls", "init", str(tmp_path / "c"), *args, ok=False)
        assert out.returncode == 2 and "invalid --host" in out.stderr, out.stderr
    out = run(str(DELTAVOL), "tls", "init", str(tmp_path / "c"), ok=False)
    assert out.returncode == 2
    assert not (tmp_path / "c").exists()

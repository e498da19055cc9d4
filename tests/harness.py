"""``deltavol serve`` as a subprocess, and the third-party programs tests drive it with."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

DELTAVOL = Path(sys.executable).with_name("deltavol")
# nbdsh and the libnbd Python module belong to Debian's own interpreter, not the venv's.
SYSTEM_PYTHON = "/usr/bin/python3"


def require(*tools: str) -> None:
    """Skip when a peer program is missing; under CI=true a missing peer fails the run."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    message = f"missing programs: {', '.join(missing)} (run `make setup`)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on at this moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``deltavol serve`` that can be killed -9 and started again on the same data dir.

    A subclass serving on TCP sets ``port`` (from ``free_port``) and names it in ``extra``
    as ``HOST:PORT``: another process (an xdist worker's server, any client's connection)
    may take that port before the server binds it, and the first start then moves to
    another free port."""

    exe: tuple[str | Path, ...] = (DELTAVOL,)  # what runs ``serve`` (tests/powercut wraps it)
    port: int | None = None

    def __init__(self, root: Path, *extra: str, log_path: Path | None = None) -> None:
        self.root = root
        self.extra = extra
        self.sock = root / "nbd.sock"
        self.env = {**os.environ, "DELTAVOL_DATA_DIR": str(root)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = log_path or root.with_name(root.name + ".log")
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.started = False

    def start(self) -> None:
        for _ in range(3):
            seen = self.log_path.stat().st_size
            try:
                self._start()
            except AssertionError:
                told = self._log_since(seen).lower()
                taken = f"cannot listen on 127.0.0.1:{self.port}:" in told and "already in use" in told
                if self.started or self.port is None or not taken:
                    raise
                old, self.port = self.port, free_port()
                self.extra = tuple(a.replace(f":{old}", f":{self.port}") for a in self.extra)
                continue
            self.started = True
            return
        raise AssertionError("no free port stayed free: " + self.log_path.read_text()[-2000:])

    def _log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def _start(self) -> None:
        (self.root / "api.sock").unlink(missing_ok=True)
        ready = self._readies()
        self.proc = subprocess.Popen(
            [*self.exe, "serve", "--nbd-socket", str(self.sock), "--retry-backoff", "0.2", *self.extra],
            env=self.env,
            stderr=self.log,
        )
        deadline = time.monotonic() + 30  # a loaded machine starts a server slowly
        while time.monotonic() < deadline and self.proc.poll() is None:
            # the API socket listens first, the NBD ones after it (a killed server's nbd.sock
            # is still there, refusing, until the new one replaces it): the server logs that
            # it is ready once every socket listens
            if self._readies() > ready and self._api_answers():
                return
            time.sleep(0.05)
        raise AssertionError("server did not start: " + self.log_path.read_text()[-2000:])

    def _readies(self) -> int:
        """How many starts of a server the log shows as ready (one log for all its starts)."""
        try:
            return self.log_path.read_text(errors="replace").count("server: ready")
        except FileNotFoundError:
            return 0

    def _api_answers(self) -> bool:
        """The API socket accepts connections: it exists from its bind, a moment before the
        server listens on it (a connect then is refused)."""
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(str(self.root / "api.sock"))
            except (FileNotFoundError, ConnectionRefusedError):
                return False
        return True

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            assert self.proc.wait(30) == 0

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DELTAVOL, *args], env=self.env, capture_output=True, text=True)

    def cli(self, *args: str) -> str:
        out = self.run(*args)
        assert out.returncode == 0, f"deltavol {' '.join(args)}: {out.stderr}"
        return out.stdout

    def get(self, path: str) -> Any:
        """GET from the control API on its unix socket: what ``--json`` commands print, without
        starting a CLI process (polls would otherwise load the machine they wait on)."""
        conn = _UnixHTTPConnection(str(self.root / "api.sock"))
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        assert resp.status == 200, f"GET {path}: {resp.status} {body[-2000:]!r}"
        return json.loads(body)

    def status(self, session: str = "s") -> dict:
        """``session status SESSION --json``."""
        st: dict = self.get(f"/v1/sessions/{session}")
        return st

    def wait_state(self, state: str, timeout: float = 60, session: str = "s") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status(session)
            if st["state"] == state:
                return st
            time.sleep(0.05)
        raise AssertionError(f"session {session} never {state}: {self.status(session)}")

    def wait_idle(self, update_id: int, timeout: float = 60, session: str = "s") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status(session)
            if st["state"] == "idle" and st["update"]["id"] == update_id:
                return st
            assert st["state"] != "failed", st
            time.sleep(0.1)
        raise AssertionError(f"update {update_id} did not finish: {self.status(session)}")

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.sock}"

    def image(self, name: str) -> bytes:
        path = self.get(f"/v1/volumes/{name}")["path"]
        return Path(path).read_bytes()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60) -> None:
        super().__init__("deltavol", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)

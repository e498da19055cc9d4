"""``deltavol serve`` as a subprocess, and the third-party programs tests drive it with."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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


class Server:
    """``deltavol serve`` that can be killed -9 and started again on the same data dir."""

    exe: tuple[str | Path, ...] = (DELTAVOL,)  # what runs ``serve`` (tests/powercut wraps it)

    def __init__(self, root: Path, *extra: str, log_path: Path | None = None) -> None:
        self.root = root
        self.extra = extra
        self.sock = root / "nbd.sock"
        self.env = {**os.environ, "DELTAVOL_DATA_DIR": str(root)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = log_path or root.with_name(root.name + ".log")
        self.log = open(self.log_path, "ab")  # noqa: SIM115

    def start(self) -> None:
        (self.root / "api.sock").unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [*self.exe, "serve", "--nbd-socket", str(self.sock), "--retry-backoff", "0.2", *self.extra],
            env=self.env,
            stderr=self.log,
        )
        for _ in range(100):
            if (self.root / "api.sock").exists():
                return
            time.sleep(0.05)
        raise AssertionError("server did not start: " + self.log_path.read_text()[-2000:])

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

    def status(self, session: str = "s") -> dict:
        return json.loads(self.cli("session", "status", session, "--json"))

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
        path = json.loads(self.cli("volume", "info", name, "--json"))["path"]
        return Path(path).read_bytes()

"""Running the third-party clients the interop tests drive, each in a line."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from tests.harness import SYSTEM_PYTHON, require


def run(*cmd: str, ok: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if ok:
        assert out.returncode == 0, f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def qemu_io_run(uri: str, *commands: str, read_only: bool = False) -> subprocess.CompletedProcess[str]:
    """qemu-io on an NBD URI, whatever it answers (exit status, stdout, stderr)."""
    require("qemu-io")
    args = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for c in commands:
        args += ["-c", c]
    return run(*args, uri, ok=False)


def qemu_io(uri: str, *commands: str, ok: bool = True, read_only: bool = False) -> str:
    """qemu-io on an NBD URI; with ok, every command must succeed (patterns verified)."""
    out = qemu_io_run(uri, *commands, read_only=read_only)
    text = out.stdout + out.stderr
    if ok:
        assert out.returncode == 0 and "failed" not in text and "error" not in text.lower(), text
    return text


def nbdsh(uri: str, script: str, *options: str) -> subprocess.CompletedProcess[str]:
    """An nbdsh script (Debian's python3 with libnbd) connected to ``uri`` as ``h``."""
    require("nbdsh")  # a shell script that runs `python3 -m nbd`: PATH's python3 may lack it
    return run(SYSTEM_PYTHON, "-m", "nbd", *options, "-u", uri, "-c", script)


def nbdinfo_json(uri: str, *extra: str) -> Any:
    require("nbdinfo")
    return json.loads(run("nbdinfo", "--json", *extra, uri).stdout)


def dump_sha(uri: str, tmp: Path) -> str:
    """sha256 of an export's bytes, read with nbdcopy."""
    require("nbdcopy")
    out = tmp / "dump.img"
    out.unlink(missing_ok=True)
    run("nbdcopy", uri, str(out))
    return sha(out)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

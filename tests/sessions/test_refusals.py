"""Refusals (DESIGN §2, §4): each with a clear one-line message naming what and why, exit 1
for a failed operation and 2 for a usage error, no traceback, and nothing changed. A local
target refuses NBD writes for as long as its session exists."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.harness import SYSTEM_PYTHON, Server, require
from tests.interop.peers import qemu_io
from tests.sessions.common import G, MiB, apply, session_with_copy, start_update

pytestmark = pytest.mark.interop

SIZE = 16 * MiB


def snapshot(server: Server) -> tuple[str, str, str]:
    """What a refusal must leave as it was: sessions, the session's status, volumes."""
    status = json.loads(server.cli("session", "status", "s", "--json"))
    status["update"].pop("rate"), status["update"].pop("eta")
    sessions = json.loads(server.cli("session", "list", "--json"))
    for s in [status, *sessions]:
        s.pop("rpo_seconds")  # the age of the point in time grows by itself
    return (
        json.dumps(sessions, sort_keys=True),
        json.dumps(status, sort_keys=True),
        server.cli("volume", "list", "--json"),
    )


def assert_refused(server: Server, args: list[str], code: int, *words: str) -> None:
    out = server.run(*args)
    assert out.returncode == code, (args, out.returncode, out.stderr)
    err = out.stderr
    assert err.startswith("deltavol: ") and err.count("\n") == 1, (args, err)  # one line
    assert "Traceback" not in err + out.stdout, (args, err)
    for word in words:
        assert word in err.lower(), (args, word, err)


# libnbd with strict mode off sends what qemu-io would refuse on its own side, so the server's
# own refusal is what is tested: each change is refused, or the export cannot be opened at all
RAW_CHANGES = """
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
try:
    h.connect_uri(sys.argv[1])
except nbd.Error as e:
    print("open refused:", e.string)
    sys.exit(0)
print("read-only" if h.is_read_only() else "writable")
for name, op in (
    ("write", lambda: h.pwrite(b"\\x66" * 65536, 0)),
    ("zero", lambda: h.zero(1 << 20, 1 << 20)),
    ("trim", lambda: h.trim(1 << 20, 2 << 20)),
    ("fua write", lambda: h.pwrite(b"\\x66" * 4096, 8192, nbd.CMD_FLAG_FUA)),
):
    try:
        op()
        print(name, "ACCEPTED")
    except nbd.Error as e:
        print(name, "refused", e.errno)
"""


def raw_changes(uri: str) -> str:
    require("nbdsh")  # Debian's python3-libnbd comes with it
    out = subprocess.run([SYSTEM_PYTHON, "-c", RAW_CHANGES, uri], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_refusals_change_nothing(server: Server) -> None:
    session_with_copy(server, SIZE)
    server.cli("volume", "create", "small", "--size", str(SIZE - 512))
    server.cli("volume", "create", "other", "--size", str(SIZE))
    before = snapshot(server)
    images = {v: server.image(v) for v in ("src", "dst", "other")}
    create = ["session", "create", "x", "--source"]
    cases = [
        ([*create, "src", "--target", "small"], 2, "smaller", "small"),
        ([*create, "src", "--target", "src"], 2, "source", "src"),
        ([*create, "src", "--target", "dst"], 1, "session 's'", "dst"),  # already another session's
        ([*create, "other", "--target", "dst"], 1, "session 's'", "dst"),
        ([*create, "dst", "--target", "other"], 1, "target", "dst"),  # a target is no source
        ([*create, "other", "--target", "src"], 1, "source", "src"),  # nor a source a target
        ([*create, "src", "--target", "other", "--granularity", "3KiB"], 2, "granularity"),
        ([*create, "src", "--target", "other", "--granularity", "2KiB"], 2, "granularity"),
        ([*create, "src", "--target", "other", "--granularity", "32MiB"], 2, "granularity"),
        ([*create, "src", "--target", "other", "--granularity", "lots"], 2, "lots"),
        ([*create, "src", "--target", "other", "--every", "soon"], 2, "interval"),
        ([*create, "nope", "--target", "other"], 1, "nope"),
        (["session", "create", "s", "--source", "src", "--target", "other"], 1, "already exists"),
        (["session", "update", "nope"], 1, "nope"),
        (["session", "update", "nope", "--full"], 1, "nope"),
        (["session", "pause", "s"], 1, "idle"),  # nothing to pause
        (["session", "resume", "s"], 1, "idle"),
        (["session", "cancel", "s"], 1, "idle"),
        (["session", "verify", "nope"], 1, "nope"),
        (["session", "remove", "nope"], 1, "nope"),
        (["volume", "remove", "src"], 1, "session"),
        (["volume", "remove", "dst"], 1, "session"),
    ]  # fmt: skip
    for args, code, *words in cases:
        assert_refused(server, args, code, *words)
    assert snapshot(server) == before
    assert {v: server.image(v) for v in images} == images


def test_update_of_a_copying_session_is_refused(server: Server) -> None:
    session_with_copy(server, SIZE)
    apply(server, "src", f"write -P 0xbb 0 {2 * MiB}")
    started = start_update(server, "--max-rate", "64KiB/s")  # 32 s: far longer than the checks
    for args in (["session", "update", "s"], ["session", "update", "s", "--full"]):
        assert_refused(server, args, 1, "already copying")
    st = server.status()
    assert st["state"] == "copying" and st["update"]["id"] == started["update"]["id"]
    assert st["update"]["kind"] == "incremental"
    assert_refused(server, ["session", "create", "y", "--source", "src", "--target", "dst"], 1, "session 's'")
    st = server.status()
    assert st["state"] == "copying" and st["update"]["id"] == started["update"]["id"], st
    # the rest at full speed: what the cancelled update owed goes to the next one
    server.cli("session", "cancel", "s")
    server.cli("session", "update", "s", "--wait")
    assert server.image("dst") == server.image("src")


def test_local_target_refuses_nbd_writes_while_the_session_exists(server: Server) -> None:
    """New, copying a full update, idle, copying an incremental one, paused, cancelled: a write
    through the target's export never lands."""
    server.cli("volume", "create", "src", "--size", str(SIZE))
    server.cli("volume", "create", "dst", "--size", str(SIZE))
    apply(server, "src", f"write -P 0xaa 0 {SIZE}")
    server.cli("session", "create", "s", "--source", "src", "--target", "dst")

    def refuses(stage: str, copying: bool = False) -> None:
        before = server.image("dst")
        text = qemu_io(server.uri("dst"), f"write -P 0x66 0 {G}", ok=False)
        assert "can't open" in text or "failed" in text, (stage, text)
        raw = raw_changes(server.uri("dst"))
        if raw.startswith("open refused"):
            assert "can't open" in text and "session 's'" in text, (stage, text)  # qemu-io shows why
        else:  # exported read-only, and each change refused by the server itself
            assert raw.startswith("read-only") and "ACCEPTED" not in raw and raw.count("refused") == 4, (
                stage,
                raw,
            )
        after = server.image("dst")
        assert b"\x66" * 4096 not in after, stage
        if not copying:  # (else the update writes to it meanwhile)
            assert after == before, stage

    refuses("new")  # inconsistent: cannot be opened
    start_update(server, "--full", "--max-rate", "512KiB/s")  # 32 s: far longer than the checks
    refuses("full", copying=True)
    assert server.status()["state"] == "copying"
    server.cli("session", "cancel", "s")
    refuses("full cancelled")  # inconsistent again: cannot be opened
    server.cli("session", "update", "s", "--full", "--wait")
    refuses("idle")  # consistent: read-only
    assert server.image("dst") == server.image("src")
    apply(server, "src", f"write -P 0xbb 0 {4 * MiB}")
    start_update(server, "--max-rate", "256KiB/s")  # lasts 16 s: pause comes first
    refuses("incremental", copying=True)
    server.cli("session", "pause", "s")
    refuses("paused")
    server.cli("session", "cancel", "s")
    refuses("cancelled")
    server.cli("session", "update", "s", "--wait")
    refuses("idle again")
    assert server.image("dst") == server.image("src")

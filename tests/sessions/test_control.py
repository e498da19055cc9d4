"""Controlling updates (DESIGN §2 states): pause / resume / cancel of incremental and full
updates, the scheduler, several sessions on one source, verify. Each ends comparing bytes."""

from __future__ import annotations

import json
import time

import pytest

from tests.harness import Server
from tests.sessions.common import (
    G,
    MiB,
    Model,
    apply,
    differing_chunks,
    refused_open,
    session_with_copy,
    start_update,
    volume_path,
    wait_for,
)

pytestmark = pytest.mark.interop

SIZE = 16 * MiB
NCHUNKS = SIZE // G


def idle(st: dict) -> bool:
    return st["state"] == "idle"


def assert_same(server: Server, target: str, want: bytes) -> None:
    got = server.image(target)
    assert got == want, f"{target} differs in chunks {differing_chunks(got, want)}"


def test_pause_resume_cancel_an_incremental_update(server: Server) -> None:
    model = session_with_copy(server, SIZE)
    apply(server, "src", *model.chunks(0xBB, list(range(64))))
    total = 64 * G
    start_update(server, "--max-rate", "128KiB/s")  # 32 s: the cancel comes long before
    wait_for(server, lambda s: s["update"]["bytes_done"] > 0, "copying anything")
    server.cli("session", "pause", "s")
    paused = server.status()
    # part of the target is as of the new mark: no image of any point in time now, but the
    # session still names the last one
    assert paused["state"] == "paused" and not paused["consistent"] and paused["point_in_time"]
    done = paused["update"]["bytes_done"]
    assert 0 < done < total
    # while paused the chunks still owed stay protected: C over the last ones is saved first
    # (test_a_paused_update_keeps_its_point_in_time follows such writes to the target)
    apply(server, "src", *model.chunks(0xCC, [60, 61, 62, 63]))
    time.sleep(0.5)  # nothing to poll for: the absence of progress
    u = server.status()["update"]
    assert u["bytes_done"] == done, "pause did not stop the copy"
    assert u["cofw_saved_bytes"] == 4 * G, u
    server.cli("session", "resume", "s")
    assert server.status()["state"] == "copying"
    wait_for(server, lambda s: s["update"]["bytes_done"] > done, "copying again")
    server.cli("session", "cancel", "s")
    st = server.status()
    assert st["state"] == "idle" and not st["consistent"]  # part old, part new: no point in time
    remaining = total - st["update"]["bytes_done"]
    assert 0 < remaining < total
    # what the update did not copy went back into tracking (the C chunks are among it)
    assert st["tracked_bytes"] == remaining
    assert "session 's'" in refused_open(server, "dst")
    server.cli("session", "update", "s", "--wait")
    st = server.status()
    assert st["consistent"] and st["update"]["kind"] == "incremental"
    assert st["update"]["bytes_total"] == remaining  # only what was left
    assert_same(server, "dst", model.snapshot())


def test_a_paused_update_keeps_its_point_in_time(server: Server) -> None:
    model = session_with_copy(server, SIZE)
    owed = list(range(16))
    apply(server, "src", *model.chunks(0xBB, owed))
    at_mark = model.snapshot()
    # 16 s: the pause (a CLI process, slow to start on a loaded machine) comes long before
    # the copy reaches chunk 12
    start_update(server, "--max-rate", "64KiB/s")
    wait_for(server, lambda s: s["update"]["bytes_done"] > 0, "copying anything")
    server.cli("session", "pause", "s")
    paused = server.status()
    assert paused["state"] == "paused", paused
    done = paused["update"]["bytes_done"]
    assert 0 < done <= 12 * G, paused  # chunks 12-15 are still owed
    # C over the owed chunks while paused: each must be saved before it goes down
    apply(server, "src", *model.chunks(0xCC, [15, 14, 13, 12]), model.write(0xC1, 13 * G + 100, 1000))
    u = server.status()["update"]
    assert u["bytes_done"] == done, "pause did not stop the copy"
    assert u["cofw_saved_bytes"] == 4 * G, u
    server.cli("session", "resume", "s")
    st = wait_for(server, idle, "idle", timeout=120)
    u = st["update"]
    assert st["consistent"] and u["bytes_total"] == u["bytes_done"] == len(owed) * G, st
    assert u["cofw_saved_bytes"] == 4 * G, u
    assert_same(server, "dst", at_mark)  # B, not C: the point in time of the mark
    assert st["tracked_bytes"] == 4 * G


def test_pause_resume_a_full_update(server: Server) -> None:
    server.cli("volume", "create", "src", "--size", str(SIZE))
    server.cli("volume", "create", "dst", "--size", str(SIZE))
    model = Model(SIZE)
    apply(server, "src", model.write(0xAA, 0, SIZE))
    server.cli("session", "create", "s", "--source", "src", "--target", "dst")
    start_update(server, "--full", "--max-rate", "1MiB/s")  # 16 s: the pause comes long before
    wait_for(server, lambda s: s["update"]["bytes_done"] > 0, "copying anything")
    server.cli("session", "pause", "s")
    paused = server.status()
    assert paused["state"] == "paused" and not paused["consistent"] and paused["point_in_time"] is None
    assert "session 's'" in refused_open(server, "dst")
    apply(server, "src", *model.chunks(0xBB, [1, 100, 255]))  # tracked, not protected
    assert server.status()["tracked_bytes"] == 3 * G
    server.cli("session", "resume", "s")
    st = wait_for(server, idle, "idle", timeout=120)
    assert st["consistent"] and st["update"]["kind"] == "full"
    assert st["update"]["catchup_bytes"] == 3 * G
    assert_same(server, "dst", model.snapshot())


def test_cancel_a_full_update(server: Server) -> None:
    server.cli("volume", "create", "src", "--size", str(SIZE))
    server.cli("volume", "create", "dst", "--size", str(SIZE))
    model = Model(SIZE)
    apply(server, "src", model.write(0xAA, 0, SIZE))
    server.cli("session", "create", "s", "--source", "src", "--target", "dst")
    start_update(server, "--full", "--max-rate", "1MiB/s")  # 16 s: the cancel comes long before
    wait_for(server, lambda s: s["update"]["bytes_done"] > 0, "copying anything")
    server.cli("session", "cancel", "s")
    st = server.status()
    assert st["state"] == "idle" and not st["consistent"] and st["point_in_time"] is None
    assert "session 's'" in refused_open(server, "dst")  # still protected
    out = server.run("session", "verify", "s")
    assert out.returncode == 1 and "consistent" in out.stderr
    # never consistent: the next update is a full one again
    server.cli("session", "update", "s", "--wait")
    st = server.status()
    assert st["consistent"] and st["update"]["kind"] == "full"
    assert_same(server, "dst", model.snapshot())

    # a full update cancelled after a good copy: the next incremental one copies what it left
    start_update(server, "--full", "--max-rate", "1MiB/s")
    wait_for(server, lambda s: s["update"]["bytes_done"] > 0, "copying anything")
    apply(server, "src", *model.chunks(0xBB, [NCHUNKS - 2, NCHUNKS - 1]))
    server.cli("session", "cancel", "s")
    st = server.status()
    assert not st["consistent"]
    left = st["tracked_bytes"]
    assert SIZE - st["update"]["bytes_done"] <= left < SIZE
    server.cli("session", "update", "s", "--wait")
    st = server.status()
    assert st["consistent"] and st["update"]["kind"] == "incremental" and st["update"]["bytes_total"] == left
    assert_same(server, "dst", model.snapshot())


def test_scheduler_runs_updates_by_itself(server: Server) -> None:
    server.cli("volume", "create", "src", "--size", str(SIZE))
    server.cli("volume", "create", "dst", "--size", str(SIZE))
    model = Model(SIZE)
    apply(server, "src", model.write(0xAA, 0, SIZE))
    server.cli("session", "create", "s", "--source", "src", "--target", "dst", "--every", "2s")
    assert server.status()["every"] == 2
    # the first scheduled update is the full one
    st = wait_for(server, lambda s: idle(s) and s["consistent"], "updated by the scheduler", timeout=30)
    assert st["update"]["kind"] == "full"
    first = st["update"]["id"]
    assert_same(server, "dst", model.snapshot())
    apply(server, "src", *model.chunks(0xBB, [3, 4, 200]))
    st = wait_for(
        server,
        lambda s: idle(s) and s["consistent"] and s["update"]["id"] > first and s["tracked_bytes"] == 0,
        "caught up by the scheduler",
        timeout=30,
    )
    assert st["update"]["kind"] == "incremental"
    assert_same(server, "dst", model.snapshot())


def test_two_sessions_on_one_source_update_at_once(server: Server) -> None:
    model = session_with_copy(server, SIZE)
    server.cli("volume", "create", "dst2", "--size", str(SIZE))
    server.cli("session", "create", "s2", "--source", "src", "--target", "dst2")
    server.cli("session", "update", "s2", "--wait")
    assert_same(server, "dst2", model.snapshot())
    apply(server, "src", model.write(0xBB, 0, SIZE // 4))
    mark1 = model.snapshot()
    start_update(server, "--max-rate", "256KiB/s")  # 4 MiB: about 16 s
    # the writes go to the chunks each update copies last (the copy goes up): they find them
    # still owed however slowly qemu-io and the CLI start on a loaded machine
    apply(server, "src", *model.chunks(0xCC, list(range(63, 55, -1))))
    mark2 = model.snapshot()
    start_update(server, "--max-rate", "256KiB/s", session="s2")
    apply(server, "src", *model.chunks(0xDD, list(range(63, 47, -1))), model.write(0xDD, SIZE // 2, 4 * G))
    assert server.status()["state"] == server.status("s2")["state"] == "copying", (
        "writes outlived the updates"
    )
    for name in ("s", "s2"):
        st = wait_for(server, idle, "idle", timeout=120, session=name)
        assert st["consistent"] and st["update"]["cofw_saved_bytes"] > 0
    assert_same(server, "dst", mark1)
    assert_same(server, "dst2", mark2)
    server.cli("session", "update", "s", "--wait")
    server.cli("session", "update", "s2", "--wait")
    assert_same(server, "dst", model.snapshot())
    assert_same(server, "dst2", model.snapshot())


def test_verify_finds_a_difference_planted_in_the_target(server: Server) -> None:
    session_with_copy(server, SIZE)
    out = server.run("session", "verify", "s")
    assert out.returncode == 0 and "OK" in out.stdout, out
    report = json.loads(server.cli("session", "verify", "s", "--json"))
    assert report["ok"] and report["chunks_compared"] == NCHUNKS and report["mismatches"] == 0
    path = volume_path(server, "dst")
    with open(path, "r+b") as f:  # behind the session's back
        f.seek(7 * G + 123)
        f.write(b"\x00")
    out = server.run("session", "verify", "s")
    assert out.returncode == 1, out
    text = out.stdout + out.stderr
    assert str(7 * G) in text or "chunk 7" in text, text
    assert "Traceback" not in text
    out = server.run("session", "verify", "s", "--json")
    assert out.returncode == 1, out
    report = json.loads(out.stdout)
    assert not report["ok"] and report["mismatches"] == 1 and report["mismatch_offsets"] == [7 * G]
    # a chunk written since the mark is not compared (the target is not expected to hold it)
    apply(server, "src", "write -P 0xbb 0 4k")
    report = json.loads(server.run("session", "verify", "s", "--json").stdout)
    assert report["chunks_skipped"] == 1 and report["mismatch_offsets"] == [7 * G]
    # an incremental update does not see the planted byte; a full one repairs it
    server.cli("session", "update", "s", "--full", "--wait")
    assert server.image("dst") == server.image("src")
    assert server.run("session", "verify", "s").returncode == 0

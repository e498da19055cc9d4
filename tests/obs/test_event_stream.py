"""``GET /v1/events`` read by a plain HTTP client, ``deltavol events`` and ``update --wait``
following it, during real updates of volumes written by qemu-io."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.harness import DELTAVOL, Server, require
from tests.obs.common import EventReader, MiB, get
from tests.sessions.common import apply
from tests.sessions.targets import qemu_nbd_cmd, serving, uri


def setup_session(server: Server, size: str = "16MiB", *extra: str) -> None:
    server.cli("volume", "create", "a", "--size", size)
    server.cli("volume", "create", "b", "--size", size)
    server.cli("session", "create", "s", "--source", "a", "--target", "b", *extra)


def published_since(server: Server, last: int, timeout: float = 30) -> None:
    """Wait until the server has published an event after id ``last`` (a new stream's
    first line names the newest): a loaded machine may publish none for a while."""
    deadline = time.monotonic() + timeout
    while True:
        probe = EventReader(server)
        probe.close()
        if probe.opened_at > last:
            return
        assert time.monotonic() < deadline, f"no event published after {last}"
        time.sleep(0.05)


def test_update_events_in_order_and_a_reconnect_resumes(server: Server) -> None:
    require("qemu-io")
    setup_session(server)
    server.cli("session", "update", "s", "--wait")  # the full one
    apply(server, "a", "write -P 1 0 8M")
    reader = EventReader(server)
    events = iter(reader)
    # about 4 s: a progress event every 0.25 s, many more than the 4 asked for below
    st = json.loads(server.cli("session", "update", "s", "--json", "--max-rate", "2MiB/s"))
    uid = st["update"]["id"]
    seen = []
    for ev in events:
        seen.append(ev)
        if [e["event"] for e in seen].count("update.progress") == 2:
            break
    # the stream goes away mid-update; a new one with Last-Event-ID picks up after the last seen
    last = seen[-1]["sse_id"]
    reader.close()
    published_since(server, last)  # events are published meanwhile (progress every 0.25 s)
    reconnected = time.time()
    again = EventReader(server, last_id=last)
    replayed = []
    for ev in again:
        replayed.append(ev)
        seen.append(ev)
        if ev["event"] == "update.finished":
            break
    again.close()
    assert replayed[0]["sse_id"] == last + 1 and replayed[0]["at"] < reconnected, replayed[0]
    kinds = [e["event"] for e in seen if e.get("name") == "s"]
    assert kinds[0] == "session.state" and kinds[1] == "update.marked", kinds
    assert kinds[-1] == "update.finished", kinds
    assert kinds.count("update.progress") >= 4, kinds
    ids = [e["sse_id"] for e in seen]
    assert ids == list(range(ids[0], ids[0] + len(ids))), f"lost or repeated events: {ids}"
    progress = [e for e in seen if e["event"] == "update.progress"]
    done = [e["bytes_done"] for e in progress]
    assert done == sorted(done) and done[0] > 0 and done[-1] <= 8 * MiB, done
    assert all(e["id"] == uid for e in progress)
    finished = seen[-1]
    assert finished["id"] == uid and finished["bytes_sent"] >= 8 * MiB, finished
    assert "data" not in finished and finished["kind"] == "update.finished"


def test_a_client_too_far_behind_is_told_of_the_gap(server: Server) -> None:
    setup_session(server)
    status, body = get(server, "/v1/events", {"Last-Event-ID": "x"})
    assert status == 400 and b"Last-Event-ID" in body
    server.cli("volume", "create", "c", "--size", "1MiB")
    reader = EventReader(server, last_id=0)
    evs = []
    for ev in reader:
        evs.append(ev)
        if ev.get("name") == "c":
            break
    reader.close()
    # nothing was let go yet: a replay from 0 is every event, in order, no gap
    kinds = [e["event"] for e in evs]
    assert kinds == ["volume.created", "volume.created", "session.created", "volume.created"]
    assert [e["sse_id"] for e in evs] == [1, 2, 3, 4]


def test_a_restart_is_a_gap_and_a_stop_ends_the_stream(server: Server) -> None:
    setup_session(server, "4MiB")
    reader = EventReader(server)
    server.stop()  # with a stream open: it ends, and the server exits 0 at once
    assert list(reader) == []
    reader.close()
    server.start()
    server.cli("volume", "create", "c", "--size", "1MiB")
    again = EventReader(server, last_id=3)  # the old run's id: this run has published 1 event
    evs = []
    for ev in again:
        evs.append(ev)
        if ev["event"] == "volume.created":
            break
    again.close()
    assert [e["event"] for e in evs] == ["gap", "volume.created"], evs
    assert evs[1]["sse_id"] == 1 and evs[1]["name"] == "c"


def test_events_cli_json_and_text(server: Server) -> None:
    setup_session(server, "4MiB")
    out = server.cli("events", "--json", "--since", "0", "--count", "3")
    evs = [json.loads(line) for line in out.splitlines()]
    assert [e["kind"] for e in evs] == ["volume.created", "volume.created", "session.created"]
    assert [e["event_id"] for e in evs] == [1, 2, 3]
    text = server.cli("events", "--since", "2", "--count", "1")
    assert "session.created" in text and " s " in text, text
    bad = server.run("events", "--since", "-1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_update_wait_follows_events_and_prints_progress(server: Server, tmp_path: Path) -> None:
    require("qemu-io")
    setup_session(server)
    server.cli("session", "update", "s", "--wait")  # the first, full update
    apply(server, "a", "write -P 5 0 6M")
    t0 = time.monotonic()
    out = server.run("session", "update", "s", "--wait", "--max-rate", "2MiB/s")
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    assert "incremental update 2 marked" in out.stdout
    lines = [line for line in out.stderr.splitlines() if "%" in line]
    assert len(lines) >= 2, out.stderr  # one line a second at most, for about 3 seconds
    assert "MiB/s" in lines[-1] and "eta" in lines[-1], lines
    assert "update 2 done" in out.stderr
    assert took >= 2.0, took  # it waited for the copy (6 MiB at 2 MiB/s)
    st = server.status()
    assert st["state"] == "idle" and st["update"]["id"] == 2 and st["consistent"]
    assert st["last_success_at"] is not None and st["rpo_seconds"] is not None


def test_update_wait_exits_1_with_the_error_when_the_update_fails(server: Server, tmp_path: Path) -> None:
    server.cli("volume", "create", "a", "--size", "4MiB")
    image, gone = tmp_path / "t.img", tmp_path / "t.sock"
    image.write_bytes(bytes(4 * MiB))
    with serving(qemu_nbd_cmd(image, gone), gone):
        server.cli("session", "create", "s", "--source", "a", "--target", uri(gone))
    # the target is gone now: the update fails as it connects
    out = server.run("session", "update", "s", "--wait")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "update failed" in out.stderr and str(gone) in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    st = server.status()
    assert st["state"] == "failed" and st["last_failure_at"] is not None
    nosuch = server.run("session", "update", "nosuch", "--wait")
    assert nosuch.returncode == 1 and "nosuch" in nosuch.stderr and "Traceback" not in nosuch.stderr


def test_update_wait_on_a_terminal_draws_a_bar(server: Server, tmp_path: Path) -> None:
    """Under a pseudo-terminal (script(1)) the progress is a rich bar, not lines."""
    require("qemu-io", "script")
    setup_session(server, "8MiB")
    apply(server, "a", "write -P 3 0 4M")
    typescript = tmp_path / "typescript"
    cmd = f"{DELTAVOL} session update s --wait --max-rate 2MiB/s"
    out = subprocess.run(
        ["script", "-qec", cmd, str(typescript)], env=server.env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout
    screen = typescript.read_text(errors="replace")
    assert "━" in screen and "MiB/s" in screen, screen[-2000:]
    assert "update 1 done" in screen

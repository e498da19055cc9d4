"""``session restore``: the source rolled back to the target's point in time, copying back only
the chunks changed since; refusals that change nothing; ``volume create --from-session``."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from tests.harness import Server, require
from tests.interop.peers import qemu_io, run
from tests.sessions.common import (
    G,
    MiB,
    apply,
    differing_chunks,
    session_with_copy,
    start_update,
    wait_for,
)
from tests.sessions.targets import qemu_nbd_cmd, serving, uri

pytestmark = pytest.mark.interop

SIZE = 8 * MiB


def restore_wait(server: Server, session: str = "s") -> dict:
    out = server.run("session", "restore", session, "--wait", "--json")
    assert out.returncode == 0, out.stderr
    st: dict = json.loads(out.stdout)
    return st


def changed_chunks(model_before: bytes, image: bytes) -> list[int]:
    return differing_chunks(image, model_before)


def test_restore_copies_back_only_the_changed_chunks(server: Server) -> None:
    model = session_with_copy(server, SIZE)
    pit = server.status()["point_in_time"]
    at_pit = model.snapshot()
    chunks = sorted(random.Random(1).sample(range(SIZE // G), 9))
    apply(server, "src", *model.chunks(0x5C, chunks[:6]), model.zero(chunks[6] * G, G))
    apply(server, "src", model.write(0x11, chunks[7] * G + 512, 4096), model.discard(chunks[8] * G, G))
    assert changed_chunks(at_pit, server.image("src")) == chunks
    assert server.status()["tracked_bytes"] == len(chunks) * G

    st = restore_wait(server)
    assert st["state"] == "idle" and st["consistent"] and st["last_error"] is None, st
    assert st["point_in_time"] == pit and st["tracked_bytes"] == 0, st
    assert st["update"]["kind"] == "restore", st
    # copied back: the changed chunks, not the volume
    assert st["update"]["bytes_done"] == st["update"]["bytes_total"] == len(chunks) * G, st
    assert st["update"]["bytes_sent"] <= len(chunks) * G, st  # data read back (zeroes are not)
    assert server.image("src") == at_pit == server.image("dst")
    assert (Path(server.root) / "bitmaps" / "s.tracking").exists()
    assert not (Path(server.root) / "bitmaps" / "s.restore").exists()
    model.data[:] = at_pit
    # writable again, tracked again: the next update copies just that
    apply(server, "src", model.write(0x77, 3 * G, G))
    u = start_update(server)["update"]
    done = server.wait_idle(u["id"])
    assert done["update"]["bytes_total"] == G and server.image("dst") == model.snapshot()


def test_restore_over_nbd_then_the_source_is_the_point_in_time(server: Server, tmp_path: Path) -> None:
    """A remote target (qemu-nbd): read back over NBD with many requests in flight."""
    require("qemu-nbd")
    image, sock = tmp_path / "t.img", tmp_path / "t.sock"
    image.write_bytes(bytes(SIZE))
    with serving(qemu_nbd_cmd(image, sock), sock):
        server.cli("volume", "create", "src", "--size", str(SIZE))
        apply(server, "src", f"write -P 0xa1 0 {SIZE}")
        server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
        server.cli("session", "update", "s", "--full", "--wait")
        at_pit = server.image("src")
        apply(server, "src", f"write -P 0x66 {G} {40 * G}", f"write -z {48 * G} {G}")
        st = restore_wait(server)
        assert st["state"] == "idle" and st["consistent"], st
        assert st["update"]["bytes_done"] == st["update"]["bytes_sent"] == 41 * G, st  # the target has data
        assert server.image("src") == at_pit == image.read_bytes()


def test_volume_create_from_session_holds_the_point_in_time(server: Server) -> None:
    model = session_with_copy(server, SIZE)
    at_pit = model.snapshot()
    apply(server, "src", *model.chunks(0x42, [1, 5, 9]))
    server.cli("volume", "create", "copy", "--from-session", "s")
    assert server.image("copy") == at_pit
    assert server.image("src") == model.snapshot()  # the source is left alone
    info = json.loads(server.cli("volume", "info", "copy", "--json"))
    assert info["size"] == SIZE and not info["read_only"]
    qemu_io(server.uri("copy"), f"write -P 0x01 0 {G}")  # an independent, writable volume
    assert server.image("dst") == at_pit
    # refused, creating nothing: an existing name, an unknown session, an inconsistent one
    for args, word in (
        (["copy", "--from-session", "s"], "already exists"),
        (["copy2", "--from-session", "nope"], "does not exist"),
    ):
        out = server.run("volume", "create", *args)
        assert out.returncode == 1 and word in out.stderr and "Traceback" not in out.stderr, out.stderr
    server.cli("volume", "create", "x", "--size", str(SIZE))
    server.cli("volume", "create", "y", "--size", str(SIZE))
    server.cli("session", "create", "n", "--source", "x", "--target", "y")
    out = server.run("volume", "create", "copy3", "--from-session", "n")
    assert out.returncode == 1 and "not consistent" in out.stderr, out.stderr
    names = {v["name"] for v in json.loads(server.cli("volume", "list", "--json"))}
    assert names == {"src", "dst", "copy", "x", "y"}
    assert not list((Path(server.root) / "volumes").glob("copy2*")) + list(
        (Path(server.root) / "volumes").glob("copy3*")
    )


def _refused(server: Server, args: list[str], code: int, *words: str) -> str:
    out = server.run(*args)
    assert out.returncode == code, (args, out.returncode, out.stderr)
    assert out.stderr.startswith("deltavol: ") and "Traceback" not in out.stderr, out.stderr
    for w in words:
        assert w in out.stderr, (w, out.stderr)
    return out.stderr


def test_refusals_change_nothing(server: Server) -> None:
    model = session_with_copy(server, SIZE)
    apply(server, "src", *model.chunks(0x33, [2, 3]), model.write(0x34, 64 * G, 32 * G))
    images = {v: server.image(v) for v in ("src", "dst")}
    before = server.status()
    _refused(server, ["session", "restore", "nope"], 1, "session 'nope' does not exist")
    # an update under way that has written: its target holds part of the new mark
    start_update(server, "--max-rate", "64KiB/s")
    wait_for(server, lambda s: s["update"]["bytes_done"] > 0, "copied a chunk")
    _refused(server, ["session", "restore", "s"], 1, "cannot restore", "copying", "part of its new mark")
    server.cli("session", "pause", "s")
    _refused(server, ["session", "restore", "s"], 1, "paused")
    server.cli("session", "cancel", "s")  # cancelled: the target is no point in time any more
    _refused(server, ["session", "restore", "s"], 1, "not consistent")
    assert server.image("src") == images["src"]
    st = server.status()
    assert st["state"] == "idle" and st["point_in_time"] == before["point_in_time"]
    assert 0 < st["tracked_bytes"] <= 34 * G  # what the cancelled update did not copy
    # a new session: never copied
    server.cli("volume", "create", "a", "--size", str(SIZE))
    server.cli("volume", "create", "b", "--size", str(SIZE))
    server.cli("session", "create", "n", "--source", "a", "--target", "b")
    _refused(server, ["session", "restore", "n"], 1, "not consistent")
    assert server.status("n")["state"] == "new"


def test_target_down_is_refused_and_changes_nothing(server: Server, tmp_path: Path) -> None:
    require("nbdkit")
    sock = tmp_path / "t.sock"
    server.cli("volume", "create", "src", "--size", str(SIZE))
    with serving(["nbdkit", "-f", "-U", str(sock), "-e", "t", "memory", str(SIZE)], sock):
        server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
        server.cli("session", "update", "s", "--full", "--wait")
    apply(server, "src", f"write -P 0x66 0 {4 * G}")
    src, before = server.image("src"), server.status()
    _refused(server, ["session", "restore", "s"], 1, uri(sock))
    after = server.status()
    assert after["state"] == "idle" and after["tracked_bytes"] == before["tracked_bytes"] == 4 * G
    assert after["update"] == before["update"]
    assert server.image("src") == src
    qemu_io(server.uri("src"), f"write -P 0x67 0 {G}")  # still writable


def delayed_target(image: Path, sock: Path, rdelay: str) -> list[str]:
    """nbdkit serving ``image`` with every read delayed: a restore that lasts."""
    require("nbdkit")
    delay = ["--filter=delay", "file", str(image), f"rdelay={rdelay}"]
    return ["nbdkit", "-f", "-U", str(sock), "-e", "t", *delay]


def api_post(server: Server, path: str) -> tuple[int, dict]:
    """POST on the control API's unix socket at once (no CLI start-up in between)."""
    from tests.obs.common import UnixHTTPConnection

    conn = UnixHTTPConnection(str(Path(server.root) / "api.sock"))
    try:
        conn.request("POST", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def kept_events(server: Server) -> list[dict]:
    """The events the server keeps, as its stream replays them (``Last-Event-ID: 0``)."""
    from tests.obs.common import EventReader

    reader = EventReader(server, last_id=0)
    try:
        events = []
        for event in reader:
            events.append(event)
            if event["sse_id"] is not None and event["sse_id"] >= reader.opened_at:
                return events
        return events
    finally:
        reader.close()


def test_an_update_that_has_not_written_is_cancelled_for_the_restore(server: Server, tmp_path: Path) -> None:
    """The target takes seconds to open a connection (nbdkit's delay filter): an update just
    marked has not written a byte to it, so a restore cancels it, says so, and restores."""
    require("nbdkit")
    image, sock = tmp_path / "t.img", tmp_path / "t.sock"
    image.write_bytes(bytes(SIZE))
    slow_open = [
        "nbdkit",
        "-f",
        "-U",
        str(sock),
        "-e",
        "t",
        "--filter=delay",
        "file",
        str(image),
        "delay-open=4",
    ]
    with serving(slow_open, sock):
        server.cli("volume", "create", "src", "--size", str(SIZE))
        apply(server, "src", f"write -P 0xa1 0 {SIZE}")
        server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
        server.cli("session", "update", "s", "--full", "--wait")
        at_pit, pit = server.image("src"), server.status()["point_in_time"]
        assert image.read_bytes() == at_pit
        apply(server, "src", f"write -P 0x66 0 {8 * G}", f"write -P 0x67 {64 * G} {2 * G}")
        status, marked = api_post(server, "/v1/sessions/s/update")
        assert status == 200 and marked["state"] == "copying", marked
        # its copy waits for the target's connection: nothing is written yet
        status, st = api_post(server, "/v1/sessions/s/restore")
        assert status == 200, st
        update_id = marked["update"]["id"]
        assert st["notice"].startswith(f"update {update_id} was cancelled first"), st
        assert st["state"] == "restoring" and st["point_in_time"] == pit, st
        st = wait_for(server, lambda s: s["state"] == "idle", "restored", timeout=120)
    assert st["consistent"] and st["point_in_time"] == pit and st["tracked_bytes"] == 0, st
    assert st["update"]["bytes_done"] == 10 * G, st  # the changes since the point in time
    assert server.image("src") == at_pit == image.read_bytes()
    kinds = [(e["event"], e.get("id")) for e in kept_events(server)]
    assert ("update.cancelled", update_id) in kinds, kinds
    assert kinds.index(("update.cancelled", update_id)) < kinds.index(("restore.started", st["update"]["id"]))

    # a paused update that never wrote: the CLI says it was cancelled, then restores
    with serving(slow_open, sock):
        apply(server, "src", f"write -P 0x68 {3 * G} {G}")
        status, marked = api_post(server, "/v1/sessions/s/update")
        assert status == 200, marked
        status, paused = api_post(server, "/v1/sessions/s/pause")
        assert status == 200 and paused["state"] == "paused", paused
        out = server.run("session", "restore", "s", "--wait")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"session s: update {marked['update']['id']} was cancelled first: "), out
        assert "src restored to" in out.stderr and "(64.0 KiB copied back)" in out.stderr, out.stderr
    st = server.status()
    assert st["state"] == "idle" and st["consistent"] and st["point_in_time"] == pit, st
    assert server.image("src") == at_pit == image.read_bytes()


def test_an_update_with_a_write_in_flight_is_not_cancelled(server: Server, tmp_path: Path) -> None:
    """The update's first write to the target is in flight (nbdkit logs it, then holds it
    15 seconds): the target may hold part of the new mark, so the restore is refused and
    nothing changes; the update goes on."""
    require("nbdkit")
    image, sock, log = tmp_path / "t.img", tmp_path / "t.sock", tmp_path / "writes.log"
    image.write_bytes(bytes(SIZE))
    target = ["nbdkit", "-f", "-U", str(sock), "-e", "t", "file", str(image)]
    with serving(target, sock):
        server.cli("volume", "create", "src", "--size", str(SIZE))
        server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
        server.cli("session", "update", "s", "--full", "--wait")
    apply(server, "src", f"write -P 0x66 0 {G}")
    slow_writes = [*target[:6], "--filter=log", "--filter=delay", *target[6:]]
    with serving([*slow_writes, "delay-write=15", "delay-zero=15", f"logfile={log}"], sock):
        u = start_update(server)["update"]
        # the log filter logs a request as it comes in, then the delay filter holds it
        wait_for(server, lambda s: " Write " in (log.read_text() if log.exists() else ""), "writing")
        src = server.image("src")
        _refused(server, ["session", "restore", "s"], 1, "cannot restore", "has begun writing its target")
        st = server.status()
        assert st["state"] == "copying" and st["update"]["id"] == u["id"], st
        assert st["update"]["kind"] == "incremental" and server.image("src") == src
        assert not json.loads(server.cli("volume", "info", "src", "--json"))["read_only"]
        done = server.wait_idle(u["id"], timeout=120)  # the update goes on, and ends
    assert done["consistent"] and done["update"]["bytes_total"] == G, done
    assert image.read_bytes() == server.image("src")


def test_the_source_refuses_writes_while_it_is_restored(server: Server, tmp_path: Path) -> None:
    image, sock = tmp_path / "t.img", tmp_path / "t.sock"
    image.write_bytes(bytes(SIZE))
    # reads of 15 s: the restore outlasts a qemu-io and a CLI call on a loaded machine
    with serving(delayed_target(image, sock, "15"), sock):
        server.cli("volume", "create", "src", "--size", str(SIZE))
        apply(server, "src", f"write -P 0xa1 0 {SIZE}")
        server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
        server.cli("session", "update", "s", "--full", "--wait")
        at_pit = server.image("src")
        apply(server, "src", f"write -P 0x66 0 {8 * G}")
        st = json.loads(server.cli("session", "restore", "s", "--json"))
        assert st["state"] == "restoring", st
        text = qemu_io(server.uri("src"), f"write -P 0x99 {G} 4096", ok=False)
        assert "failed" in text or "can't open" in text or "read-only" in text.lower(), text
        out = server.run("session", "update", "s")
        assert out.returncode == 1 and "restoring" in out.stderr, out.stderr
        st = wait_for(server, lambda s: s["state"] == "idle", "restored")
        assert st["consistent"] and st["last_error"] is None, st
        assert server.image("src") == at_pit
        qemu_io(server.uri("src"), f"write -P 0x99 {G} 4096")  # writable again


def test_kill9_during_a_restore_resumes_and_ends_at_the_point_in_time(server: Server, tmp_path: Path) -> None:
    image, sock = tmp_path / "t.img", tmp_path / "t.sock"
    image.write_bytes(bytes(SIZE))
    rng = random.Random(7)
    with serving(delayed_target(image, sock, "1"), sock):
        server.cli("volume", "create", "src", "--size", str(SIZE))
        apply(server, "src", f"write -P 0xa1 0 {SIZE}")
        server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
        server.cli("session", "update", "s", "--full", "--wait")
    at_pit = server.image("src")
    assert at_pit == image.read_bytes()
    interrupted = 0
    for trial in range(5):
        # a fresh target for each trial: nbdkit 1.32's delay filter may abort ("sock >= 0"
        # assertion) when its client is killed in the middle of a delayed request
        with serving(delayed_target(image, sock, "1"), sock):
            chunks = sorted(rng.sample(range(SIZE // G), 100))
            apply(server, "src", *(f"write -P {0x10 + trial} {c * G} {G}" for c in chunks))
            server.cli("session", "restore", "s")
            time.sleep(rng.uniform(0.0, 1.2))  # a random moment of the restore, not an ordering
            server.kill9()
        resumed = server.log_path.read_text().count("resuming interrupted restore")
        with serving(delayed_target(image, sock, "1"), sock):
            server.start()
            st = wait_for(server, lambda s: s["state"] == "idle", "restored", timeout=120)
        assert st["consistent"] and st["tracked_bytes"] == 0, st
        assert differing_chunks(server.image("src"), at_pit) == [], trial
        interrupted += server.log_path.read_text().count("resuming interrupted restore") > resumed
    assert interrupted, "no kill landed during a restore: the test proved nothing"


@pytest.mark.slow
def test_ransomware_drill_ext4_comes_back_file_for_file(server: Server, tmp_path: Path) -> None:
    """ext4 on the source through nbdfuse and a loop device: files, an update, then files
    deleted and others overwritten with random bytes; the restore brings every file back and
    copies back just the chunks written since the mark."""
    from tests.interop.test_kernel import loop_device, mounted

    require("mkfs.ext4", "e2fsck")
    size = 64 * MiB
    server.cli("volume", "create", "src", "--size", str(size))
    server.cli("volume", "create", "dst", "--size", str(size))
    server.cli("session", "create", "s", "--source", "src", "--target", "dst")
    rng = random.Random(17)
    files = {f"d{i % 3}/f{i}.bin": rng.randbytes(20_000 * (i + 1)) for i in range(12)}
    with loop_device(server, "src", tmp_path / "a") as dev:
        run("mkfs.ext4", "-q", "-F", dev)
        with mounted(dev, tmp_path / "mnt") as mnt:
            for name, data in files.items():
                (mnt / name).parent.mkdir(exist_ok=True)
                (mnt / name).write_bytes(data)
            run("sync")
    server.cli("session", "update", "s", "--wait")
    at_pit = server.image("src")
    with loop_device(server, "src", tmp_path / "b") as dev, mounted(dev, tmp_path / "mnt") as mnt:
        for i, name in enumerate(sorted(files)):
            if i % 3 == 0:
                (mnt / name).unlink()
            elif i % 3 == 1:  # encrypted in place
                with open(mnt / name, "r+b") as f:
                    f.write(os.urandom(len(files[name])))
        (mnt / "README-ransom.txt").write_text("pay up\n")
        run("sync")
    changed = differing_chunks(server.image("src"), at_pit)
    tracked = server.status()["tracked_bytes"]
    assert changed and tracked >= len(changed) * G and tracked < size // 4, (len(changed), tracked)

    st = restore_wait(server)
    assert st["state"] == "idle" and st["consistent"] and st["tracked_bytes"] == 0, st
    assert st["update"]["bytes_done"] == tracked, st  # what was written since the mark, not the volume
    assert server.image("src") == at_pit
    with loop_device(server, "src", tmp_path / "c") as dev:
        run("e2fsck", "-fn", dev)
        with mounted(dev, tmp_path / "mnt2") as mnt:
            assert not (mnt / "README-ransom.txt").exists()
            for name, data in files.items():
                assert (mnt / name).read_bytes() == data, name


def test_a_target_lost_mid_restore_leaves_it_restoring_and_restore_goes_on(
    server: Server, tmp_path: Path
) -> None:
    image, sock = tmp_path / "t.img", tmp_path / "t.sock"
    image.write_bytes(bytes(SIZE))
    with serving(delayed_target(image, sock, "5"), sock):
        server.cli("volume", "create", "src", "--size", str(SIZE))
        apply(server, "src", f"write -P 0xa1 0 {SIZE}")
        server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
        server.cli("session", "update", "s", "--full", "--wait")
        at_pit = server.image("src")
        apply(server, "src", *(f"write -P 0x66 {c * G} {G}" for c in range(0, 128, 2)))
        server.cli("session", "restore", "s")
    # the target is gone under the restore
    st = wait_for(server, lambda s: s["last_error"] is not None, "failed", timeout=120)
    assert st["state"] == "restoring" and "restore" in st["last_error"], st
    text = qemu_io(server.uri("src"), f"write -P 0x99 0 {G}", ok=False)  # still protected
    assert "failed" in text or "can't open" in text, text
    out = server.run("session", "restore", "s", "--wait")  # target still down: refused, still restoring
    assert out.returncode == 1 and uri(sock) in out.stderr, out.stderr
    assert server.status()["state"] == "restoring"
    with serving(delayed_target(image, sock, "1ms"), sock):
        st = restore_wait(server)
    assert st["state"] == "idle" and st["consistent"] and st["last_error"] is None, st
    assert st["update"]["bytes_done"] == 64 * G, st
    assert server.image("src") == at_pit


def test_removing_a_restoring_session_lifts_the_protection(server: Server, tmp_path: Path) -> None:
    image, sock = tmp_path / "t.img", tmp_path / "t.sock"
    image.write_bytes(bytes(SIZE))
    with serving(delayed_target(image, sock, "10"), sock):
        server.cli("volume", "create", "src", "--size", str(SIZE))
        server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
        server.cli("session", "update", "s", "--full", "--wait")
        apply(server, "src", f"write -P 0x66 0 {G}")
        server.cli("session", "restore", "s")
        # asked at once (no CLI process to start): the restore's one chunk takes 2 s
        assert server.get("/v1/volumes/src")["read_only"]
        server.cli("session", "remove", "s")
    assert not json.loads(server.cli("volume", "info", "src", "--json"))["read_only"]
    qemu_io(server.uri("src"), f"write -P 0x99 0 {G}")
    assert not (Path(server.root) / "bitmaps" / "s.restore").exists()


def test_cli_words(server: Server) -> None:
    model = session_with_copy(server, SIZE)
    apply(server, "src", *model.chunks(0x21, [4, 5]))
    out = server.run("session", "restore", "s", "--wait")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("session s: restoring src to "), out.stdout
    assert "src restored to" in out.stderr and "(128.0 KiB copied back)" in out.stderr, out.stderr
    for args in ([], ["--size", "1MiB", "--from-session", "s"]):
        out = server.run("volume", "create", "v", *args)
        assert out.returncode == 2 and "--from-session" in out.stderr and "Traceback" not in out.stderr, out
    out = server.run("session", "reverse", "s")
    assert (
        out.returncode == 0 and out.stdout == "session s: reversed: dst is the source now, src the target\n"
    )


def test_a_corrupt_restore_file_starts_the_restore_over(server: Server, tmp_path: Path) -> None:
    image, sock = tmp_path / "t.img", tmp_path / "t.sock"
    image.write_bytes(bytes(SIZE))
    with serving(delayed_target(image, sock, "8"), sock):
        server.cli("volume", "create", "src", "--size", str(SIZE))
        apply(server, "src", f"write -P 0xa1 0 {SIZE}")
        server.cli("session", "create", "s", "--source", "src", "--target", uri(sock))
        server.cli("session", "update", "s", "--full", "--wait")
        at_pit = server.image("src")
        apply(server, "src", *(f"write -P 0x66 {c * G} {G}" for c in range(0, 128, 3)))
        tracked = server.status()["tracked_bytes"]
        server.cli("session", "restore", "s")
        path = Path(server.root) / "bitmaps" / "s.restore"
        wait_for(server, lambda s: path.exists(), "restore file written")  # by its first checkpoint
        server.kill9()
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF  # the magic
    path.write_bytes(bytes(raw))
    with serving(delayed_target(image, sock, "3"), sock):  # a fresh one (see the kill -9 test)
        server.start()
        st = wait_for(server, lambda s: s["state"] == "idle", "restored", timeout=120)
    assert st["consistent"] and st["update"]["bytes_total"] == tracked, st
    assert server.image("src") == at_pit
    assert "s.restore is corrupt" in server.log_path.read_text()


def test_another_session_of_the_source_tracks_what_the_restore_writes(server: Server) -> None:
    model = session_with_copy(server, SIZE)
    at_pit = model.snapshot()
    server.cli("volume", "create", "dst2", "--size", str(SIZE))
    server.cli("session", "create", "t", "--source", "src", "--target", "dst2")
    server.cli("session", "update", "t", "--full", "--wait")
    apply(server, "src", *model.chunks(0x44, [7, 8, 30]))
    server.cli("session", "update", "t", "--wait")  # dst2 holds the changes, dst does not
    assert server.image("dst2") == model.snapshot()
    st = restore_wait(server)
    assert st["update"]["bytes_done"] == 3 * G and server.image("src") == at_pit
    other = server.status("t")
    assert other["state"] == "idle" and other["tracked_bytes"] == 3 * G, other
    u = start_update(server, session="t")["update"]
    assert server.wait_idle(u["id"], session="t")["update"]["bytes_total"] == 3 * G
    assert server.image("dst2") == at_pit

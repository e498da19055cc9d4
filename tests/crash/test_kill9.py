"""kill -9 of the server while an update runs, then restart: no acknowledged write lost, the
interrupted update finishes by itself with the target exactly the image of its mark, it
sends no more than its mark owed, and the next update copies only what changed since the
mark (no full copy).

Every write lands in the first ``SPAN`` chunks of a volume eight times larger, so a copy of
the whole volume (or a tracking bitmap gone all-set) is far above anything a trial may owe.
Each kill is checked to have landed during the update: the server said ``copying`` just
before it, and the restarted server resumed that update. The trials are seeded; the count
comes from DELTAVOL_CRASH_TRIALS (at least 1) and is printed.

kill -9 keeps the page cache: these trials check the order in which the server acks writes
and records progress, not that what it relies on was fdatasynced. A missing or misplaced
fdatasync passes them; only the unit tests that model power loss can catch one.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Server

pytestmark = [pytest.mark.crash, pytest.mark.slow]

G = 64 * 1024
NCHUNKS = 1024
SPAN = 128  # the writers write chunks [0, SPAN) only
SIZE = G * NCHUNKS
WRITER = Path(__file__).with_name("writer.py")
TRIALS = int(os.environ.get("DELTAVOL_CRASH_TRIALS", "6"))


def pattern(tag: int, length: int = G) -> bytes:
    head = tag.to_bytes(8, "little")
    return (head * (length // 8 + 1))[:length]


def run_writer(uri: str, seed: int, count: int, delay: float = 0.0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["/usr/bin/python3", str(WRITER), uri, str(seed), str(count), str(G), str(SPAN), str(delay)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def acknowledged(output: str) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    """(acked writes in order, the write in flight when the server died, if any)."""
    acked, pending = [], None
    for line in output.splitlines():
        kind, chunk, tag = line.split()
        if kind == "send":
            pending = (int(chunk), int(tag))
        else:
            acked.append((int(chunk), int(tag)))
            pending = None
    return acked, pending


def chunk_tags(image: bytes, model: dict[int, int], maybe: dict[int, int]) -> list[str]:
    """Chunks of ``image`` that hold neither the model's write nor an allowed in-flight one."""
    bad = []
    for c in range(NCHUNKS):
        got = image[c * G : (c + 1) * G]
        allowed = {pattern(model[c]) if model.get(c) else bytes(G)}
        if c in maybe:
            allowed.add(pattern(maybe[c]))
        if got not in allowed:
            bad.append(f"chunk {c}: expected tag {model.get(c, 0)} (or {maybe.get(c)})")
    return bad


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    assert TRIALS >= 1, "DELTAVOL_CRASH_TRIALS must be at least 1: zero trials would test nothing"
    if (
        not Path("/usr/bin/python3").exists()
        or subprocess.run(["/usr/bin/python3", "-c", "import nbd"], capture_output=True).returncode
    ):
        pytest.fail("the crash tests need Debian's python3-libnbd")
    srv = Server(tmp_path / "data")
    srv.start()
    srv.cli("volume", "create", "src", "--size", str(SIZE))
    srv.cli("volume", "create", "dst", "--size", str(SIZE))
    srv.cli("session", "create", "s", "--source", "src", "--target", "dst")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log_path.read_text()


def paced(owed: int) -> str:
    """A --max-rate at which copying ``owed`` bytes takes about 6 s, at least 512 KiB/s: the
    kills come within 1.5 s (more on a loaded machine), and trials that owe more do not
    take longer."""
    return f"{max(512, owed // 6 // 1024)}KiB/s"


def kill_during_update(srv: Server, update_id: int, protecting: bool) -> None:
    """kill -9 right after the server said it was still copying ``update_id`` (in its
    protected pass or not): a kill that comes too late fails here, not silently."""
    st = srv.status()
    u = st["update"]
    assert st["state"] == "copying" and u["id"] == update_id and u["protecting"] == protecting, (
        "the update was not running at the kill: slow it down",
        st,
    )
    assert u["bytes_done"] < u["bytes_total"], st
    srv.kill9()


def restart_and_finish(srv: Server, update_id: int, while_resuming: Callable[[], None] | None = None) -> dict:
    """Start again (then run ``while_resuming``); the interrupted update must be resumed (not
    found finished) and finish."""
    mark = srv.log_path.stat().st_size
    srv.start()
    if while_resuming is not None:
        while_resuming()
    st = srv.wait_idle(update_id)
    assert st["consistent"], st
    with open(srv.log_path, "rb") as log:
        log.seek(mark)
        resumed = log.read().decode(errors="replace")
    assert f"session s: resuming interrupted update {update_id}" in resumed, resumed[-2000:]
    return st


def tag_of(chunk: bytes) -> int:
    """The tag whose pattern ``chunk`` holds, 0 for zeroes, -1 for anything else."""
    if chunk == bytes(G):
        return 0
    tag = int.from_bytes(chunk[:8], "little")
    return tag if chunk == pattern(tag) else -1


def point_in_time(image: bytes, base: dict[int, int], writes: list[tuple[int, int]]) -> int | None:
    """The k for which ``image`` holds exactly ``base`` and the first k of ``writes`` (in
    order, one at a time), or None: whether the image is some point in time of the writes."""
    got = [tag_of(image[c * G : (c + 1) * G]) for c in range(NCHUNKS)]
    want = [base.get(c, 0) for c in range(NCHUNKS)]
    wrong = sum(g != w for g, w in zip(got, want, strict=True))
    for k, (chunk, tag) in enumerate(writes):
        if not wrong:
            return k
        wrong -= got[chunk] != want[chunk]
        want[chunk] = tag
        wrong += got[chunk] != want[chunk]
    return len(writes) if not wrong else None


def test_kill9_during_incremental_update_and_cofw(server: Server) -> None:
    srv = server
    srv.cli("session", "update", "s", "--full", "--wait")
    model: dict[int, int] = {}
    tracked: set[int] = set()  # chunks changed since the last mark
    for trial in range(TRIALS):
        rng = random.Random(trial)
        # writes before the mark, all acknowledged: enough that the update outlives the kill
        before = run_writer(srv.uri("src"), 2 * trial + 1, rng.randint(40, 80))
        out, _ = before.communicate(timeout=60)
        assert before.returncode == 0
        for chunk, tag in acknowledged(out)[0]:
            model[chunk] = tag
            tracked.add(chunk)
        mark_image = dict(model)
        owed = len(tracked) * G
        rate = paced(owed)
        marked = json.loads(srv.cli("session", "update", "s", "--max-rate", rate, "--json"))["update"]
        update_id = marked["id"]
        # no full copy: the mark owes exactly the chunks changed since the last one
        assert marked["bytes_total"] == owed, (marked, sorted(tracked))

        # writes after the mark (copy-on-first-write), then kill -9 while the update copies
        after = run_writer(srv.uri("src"), 2 * trial + 2, 150, delay=0.002)
        time.sleep(rng.uniform(0.05, 1.0))
        kill_during_update(srv, update_id, protecting=True)
        out, _ = after.communicate(timeout=60)
        acked, in_flight = acknowledged(out)
        written_since_mark = {chunk for chunk, _ in acked}
        for chunk, tag in acked:
            model[chunk] = tag
        maybe = {in_flight[0]: in_flight[1]} if in_flight else {}

        st = restart_and_finish(srv, update_id)
        u = st["update"]
        # the resumed update went on from its checkpoint: it owed something, never more
        # than the mark did, and sent no more than that
        assert 0 < u["bytes_total"] <= owed and u["bytes_sent"] <= owed, (u, owed)
        src = srv.image("src")
        assert chunk_tags(src, model, maybe) == [], "an acknowledged write was lost"
        if in_flight and src[in_flight[0] * G : (in_flight[0] + 1) * G] == pattern(in_flight[1]):
            model[in_flight[0]] = in_flight[1]
            written_since_mark.add(in_flight[0])
        assert chunk_tags(srv.image("dst"), mark_image, {}) == [], "target is not the image of the mark"

        # no full copy: what is tracked is exactly what was written since the mark (the
        # in-flight write may have set its bit without landing)
        allowed = {len(written_since_mark) * G, len(written_since_mark | set(maybe)) * G}
        assert min(allowed) <= st["tracked_bytes"] <= max(allowed), (st, sorted(written_since_mark), maybe)
        tracked = written_since_mark | (set(maybe) if st["tracked_bytes"] == max(allowed) else set())
    resumed = srv.log_path.read_text().count("resuming interrupted update")
    print(f"\nkill -9 trials during incremental updates: {TRIALS}, updates resumed: {resumed}")
    assert resumed == TRIALS

    # the next update copies exactly what changed since the last mark
    srv.cli("session", "update", "s", "--wait")
    st = srv.status()
    assert st["consistent"] and st["update"]["bytes_total"] == len(tracked) * G, (st, sorted(tracked))
    assert chunk_tags(srv.image("dst"), model, {}) == []


def test_kill9_during_full_update(server: Server) -> None:
    """The full update's target is checked against the writers' acknowledgements, not
    against the source it copied from. The writes during the full pass (before the kill)
    must reach it; a writer goes on while the resumed update runs, so its catch-up mark
    falls among those writes: the target must then be the image of the writes acknowledged
    before some point, and exactly the chunks written after that point are tracked."""
    srv = server
    model: dict[int, int] = {}
    writer = run_writer(srv.uri("src"), 99, 100)
    out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0
    for chunk, tag in acknowledged(out)[0]:
        model[chunk] = tag
    trials = max(2, TRIALS // 2)
    marks_among_writes = 0
    for trial in range(trials):
        rng = random.Random(100 + trial)
        rate = paced(len(model) * G)  # the holes go at once
        marked = json.loads(srv.cli("session", "update", "s", "--full", "--max-rate", rate, "--json"))
        update_id = marked["update"]["id"]
        writer = run_writer(srv.uri("src"), 200 + trial, 100, delay=0.005)
        time.sleep(rng.uniform(0.05, 1.0))
        kill_during_update(srv, update_id, protecting=False)  # still in the full pass
        out, _ = writer.communicate(timeout=60)
        acked, in_flight = acknowledged(out)
        for chunk, tag in acked:
            model[chunk] = tag
        maybe = {in_flight[0]: in_flight[1]} if in_flight else {}
        writers: list[subprocess.Popen[str]] = []

        def check_source_then_write(
            maybe: dict[int, int] = maybe,
            writers: list[subprocess.Popen[str]] = writers,
            seed: int = 300 + trial,
        ) -> None:
            src = srv.image("src")
            assert chunk_tags(src, model, maybe) == [], "an acknowledged write was lost"
            for chunk, tag in maybe.items():
                if src[chunk * G : (chunk + 1) * G] == pattern(tag):
                    model[chunk] = tag
            writers.append(run_writer(srv.uri("src"), seed, 300, delay=0.01))

        st = restart_and_finish(srv, update_id, check_source_then_write)
        assert st["update"]["kind"] == "full", st
        out, _ = writers[0].communicate(timeout=120)
        assert writers[0].returncode == 0
        during = acknowledged(out)[0]
        k = point_in_time(srv.image("dst"), model, during)
        assert k is not None, "the target is no point in time of the source"
        marks_among_writes += 0 < k < len(during)
        # tracked once the writer is done: it may well outlast the update (then its writes
        # after the update's end are tracked too)
        tracked = srv.status()["tracked_bytes"]
        assert tracked == len({c for c, _ in during[k:]}) * G, (tracked, st, k, len(during))
        for chunk, tag in during:
            model[chunk] = tag
        assert chunk_tags(srv.image("src"), model, {}) == [], "an acknowledged write was lost"
        # the next update brings the rest
        srv.cli("session", "update", "s", "--wait")
        assert chunk_tags(srv.image("dst"), model, {}) == []
    resumed = srv.log_path.read_text().count("resuming interrupted update")
    print(f"\nkill -9 trials during full updates: {trials}, updates resumed: {resumed}, "
          f"catch-up marks among the writes: {marks_among_writes}")  # fmt: skip
    assert resumed == trials

"""Incremental updates (DESIGN §2): mark, copy-on-first-write, copy only what changed, unmark.

Every check compares bytes: the target's file against a model of what the source held at
the mark, not only the counters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Server
from tests.sessions.common import (
    KiB,
    MiB,
    Model,
    apply,
    differing_chunks,
    session_with_copy,
    start_update,
    wait_for,
)

pytestmark = pytest.mark.interop

SIZE = 16 * MiB


def setup(server: Server, granularity: int = 64 * KiB) -> Model:
    return session_with_copy(server, SIZE, granularity)


def assert_target(server: Server, want: bytes, g: int = 64 * KiB) -> None:
    got = server.image("dst")
    assert got == want, (
        f"target differs from the image of the mark in chunks {differing_chunks(got, want, g)}"
    )


def test_a_zeroed_chunk_between_changed_chunks_goes_as_zeroes(server: Server) -> None:
    """Adjacent changed chunks are one request; a zeroed one among them is cut out of its
    data and sent as a zero write, not as a chunk of zero bytes."""
    g = 64 * KiB
    model = setup(server, g)
    zeroed = [model.zero(21 * g, g), model.discard(23 * g, g)]
    apply(server, "src", *model.chunks(0xC1, [20, 22, 24], g), *zeroed)
    start_update(server)
    st = wait_for(server, lambda s: s["state"] == "idle", "idle")
    assert st["update"]["bytes_total"] == 5 * g
    assert st["update"]["bytes_sent"] == 3 * g, "zeroed chunks were sent as data"
    assert_target(server, model.snapshot(), g)


@pytest.mark.parametrize("granularity", [4 * KiB, 64 * KiB, 1 * MiB])
def test_incremental_sends_only_the_changed_chunks(server: Server, granularity: int) -> None:
    g = granularity
    model = setup(server, g)
    nchunks = SIZE // g
    # zeroed and trimmed chunks go as zero writes (the ones next to data: see below)
    commands = [
        *model.chunks(0xB1, [0, 4, 5, 6, nchunks - 1], g),  # whole chunks
        model.zero(2 * g, g),  # zeroes and trims are changes too
        model.write(0xB2, 8 * g + 512, 512),  # 512 bytes dirty a whole chunk
        model.discard(10 * g, g),
        model.write(0xB3, 13 * g - 4096, 8192),  # across a boundary: two chunks
    ]
    changed = 5 + 1 + 1 + 1 + 2
    apply(server, "src", *commands)
    assert server.status()["tracked_bytes"] == changed * g
    started = start_update(server)
    assert started["update"]["kind"] == "incremental" and started["tracked_bytes"] == 0
    st = wait_for(server, lambda s: s["state"] == "idle", "idle")
    u = st["update"]
    assert u["id"] == started["update"]["id"] and st["consistent"]
    assert u["bytes_total"] == u["bytes_done"] == changed * g
    # whole chunks go as data except the zeroed and trimmed ones, which go as zeroes (not data)
    assert u["bytes_sent"] == (changed - 2) * g
    assert u["cofw_saved_bytes"] == 0 and st["tracked_bytes"] == 0
    assert st["point_in_time"] == u["marked_at"]
    assert_target(server, model.snapshot(), g)
    # nothing written since: the next update copies nothing and the target stays exact
    server.cli("session", "update", "s", "--wait")
    u = server.status()["update"]
    assert u["bytes_total"] == u["bytes_sent"] == 0
    assert_target(server, model.snapshot(), g)


@pytest.fixture(params=[None, "128KiB"], ids=["save-area", "copy-before-write"])
def cofw_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Server, str | None]]:
    save_limit: str | None = request.param
    server = Server(tmp_path / "data", *(("--save-limit", save_limit) if save_limit else ()))
    server.start()
    try:
        yield server, save_limit
    finally:
        server.stop()
        server.log.close()
    assert "Traceback" not in server.log_path.read_text()


def test_copy_on_first_write_keeps_the_point_in_time(cofw_server: tuple[Server, str | None]) -> None:
    server, save_limit = cofw_server
    g = 64 * KiB
    model = setup(server)
    b_set, d_set = list(range(10, 30)), list(range(100, 120))
    apply(server, "src", *model.chunks(0xBB, b_set))
    at_mark = model.snapshot()  # A with B
    start_update(server, "--max-rate", "128KiB/s")  # 20 chunks: about 10 s, qemu-io ends well before
    # at once: C over the chunks still owed (the last ones first: the copy goes up), whole and
    # partial, zeroes and a trim among them; and D on chunks the update does not copy
    c_commands = [*model.chunks(0xCC, b_set[:-5:-1])]
    c_commands += [model.write(0xC1, 25 * g + 100, 1000), model.write(0xC2, 22 * g - 512, 1024)]
    c_commands += [model.zero(20 * g, 2 * g), model.discard(18 * g, g), *model.chunks(0xCC, b_set[::-1])]
    apply(server, "src", *c_commands, *model.chunks(0xDD, d_set))
    during = server.status()
    assert during["state"] == "copying", "the writes outlived the update: slow it down"
    assert during["update"]["bytes_done"] < len(b_set) * g
    st = wait_for(server, lambda s: s["state"] == "idle", "idle", timeout=120)
    u = st["update"]
    assert st["consistent"] and u["bytes_total"] == u["bytes_done"] == len(b_set) * g
    assert u["cofw_saved_bytes"] > 0
    if save_limit is not None:  # the rest went to the target before the writes (copy-before-write)
        assert u["cofw_saved_bytes"] <= 128 * KiB
    assert_target(server, at_mark)  # A with B: no C, no D
    assert st["tracked_bytes"] == (len(b_set) + len(d_set)) * g
    # the next update brings C and D, and only them
    server.cli("session", "update", "s", "--wait")
    assert server.status()["update"]["bytes_total"] == (len(b_set) + len(d_set)) * g
    assert_target(server, model.snapshot())
    assert server.image("dst") == server.image("src")

"""The event bus, and the events a real service publishes through a full and an incremental update."""

from __future__ import annotations

import asyncio
from pathlib import Path

from deltavol.events import QUEUE, EventBus
from tests.unit.sessions.test_operations import SIZE, MiB, Server


def test_ids_increase_and_since_returns_what_a_reconnecting_client_missed() -> None:
    bus = EventBus(keep=4)
    for n in range(6):
        bus.publish("volume.created", name=f"v{n}")
    events, gap = bus.since(3)
    assert [e.id for e in events] == [4, 5, 6] and not gap
    events, gap = bus.since(0)  # 1 and 2 are no longer kept: the client is told
    assert [e.id for e in events] == [3, 4, 5, 6] and gap
    assert bus.since(6) == ([], False)


async def test_a_subscriber_that_does_not_keep_up_is_dropped_not_the_publisher() -> None:
    bus = EventBus()
    with bus.subscribe() as slow, bus.subscribe() as fast:
        got = []
        for n in range(QUEUE + 1):
            bus.publish("volume.created", name=f"v{n}")
            got.append((await fast.queue.get()).id)  # type: ignore[union-attr]
        assert slow.dropped and not fast.dropped
        assert [e async for e in slow] == []  # its iterator ends
        assert got == list(range(1, QUEUE + 2))


def test_progress_is_published_at_most_every_quarter_second_per_session() -> None:
    bus = EventBus()
    sent = [bus.progress("a", bytes_done=n) for n in range(100)] + [bus.progress("b", bytes_done=0)]
    assert sum(e is not None for e in sent) == 2
    bus.publish("update.finished", name="a")  # an update's end lets the next progress through
    assert bus.progress("a", bytes_done=0) is not None


async def test_a_service_publishes_state_marked_progress_and_finished_in_order(tmp_path: Path) -> None:
    server = Server(tmp_path / "data")
    svc = server.svc
    try:
        await svc.start()
        with svc.events.subscribe() as sub:
            svc.create_volume("src", SIZE)
            svc.create_volume("dst", SIZE)
            await svc.volumes.get("src").export.pwrite(0, b"A" * MiB)
            await svc.create_session(name="s", source="src", target="dst")
            s = svc.sessions.get("s")
            await s.start_update(True)
            await s.wait()
            await svc.volumes.get("src").export.pwrite(MiB, b"B" * MiB)
            await s.start_update(False)
            await s.wait()
            await svc.remove_session("s")
            await asyncio.sleep(0)
            events = []
            while not sub.queue.empty():
                e = sub.queue.get_nowait()
                assert e is not None
                events.append(e)
        kinds = [(e.kind, e.data.get("state") or e.data.get("type")) for e in events]
        assert kinds[:3] == [("volume.created", None), ("volume.created", None), ("session.created", None)]
        for update in ("full", "incremental"):
            start = kinds.index(("update.marked", update))
            end = next(i for i in range(start, len(kinds)) if kinds[i] == ("update.finished", update))
            between = [k for k, _ in kinds[start + 1 : end]]
            assert "update.progress" in between
            assert kinds[end - 1] == ("session.state", "idle")
        assert ("session.state", "copying") in kinds
        assert kinds[-1] == ("session.removed", None)
        finished = [e for e in events if e.kind == "update.finished"]
        assert finished[-1].data["bytes_sent"] == MiB and finished[-1].data["point_in_time"]
        assert [e.id for e in events] == sorted(e.id for e in events)
    finally:
        await server.stop()

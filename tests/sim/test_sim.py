"""The deterministic simulation (see ``sim.py``): a fixed budget of seeds in CI.

``DELTAVOL_SIM_SEEDS=N`` runs N seeds (default ``CI_SEEDS``, about two minutes here),
``DELTAVOL_SIM_FIRST`` the first one (in four tests of consecutive seeds, which
parallel workers share); ``DELTAVOL_SIM_SEED=S`` replays one seed exactly
(``pytest tests/sim -k replay``), ``DELTAVOL_SIM_OFF=knob,...`` leaves classes of events
out (``sim.KNOBS``). A failing seed prints what broke, the last events and its replay line.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
from typing import Any

import pytest

from deltavol.errors import TargetError
from deltavol.sessions.states import State
from tests.sim.sim import LocalHost, Sim, off_from_env, report, run_seed, unheard
from tests.sim.simfs import Clock, Halt, SimFS, SimLoop

CI_SEEDS = 24
LOCAL_SEED = 3  # a seed with sessions to local volumes within two lives


def test_a_seed_replays_exactly() -> None:
    first, again = run_seed(7), run_seed(7)
    assert len(first.events) > 20
    assert (first.ok, first.message, first.digest) == (again.ok, again.message, again.digest)


def test_sessions_to_local_volumes_run_the_kernel_copy_and_are_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A seed's sessions to local volumes copy with copy_file_range, in pieces (the worker
    parks between them); and the checks read the volume: a byte changed in it behind the
    server's back, while its session is idle and consistent, is a violation."""
    pieces = []
    copy_file_range = SimFS.copy_file_range

    def counted(fs: SimFS, *args: int) -> int:
        pieces.append(args[2])
        return copy_file_range(fs, *args)

    monkeypatch.setattr(SimFS, "copy_file_range", counted)
    r = run_seed(LOCAL_SEED, lives=2)
    assert r.ok, report(r)
    assert any("-> tgt" in e for e in r.events), "no session to a local volume"
    assert len(pieces) > 50, "hardly any kernel copy"
    assert any(n > 4 * 4096 for n in pieces), "no kernel copy asked for more than a piece"

    changed: list[str] = []
    check_live = Sim.check_live

    def tamper(sim: Sim, service: Any) -> None:
        for s in service.sessions.all():
            host = sim.hosts.get(s.target_spec)
            idle = s.state is State.IDLE and s.consistent and not s.busy
            if not changed and isinstance(host, LocalHost) and idle:
                sim.fs.names[host.path].data[5] ^= 0xFF
                changed.append(s.name)
        check_live(sim, service)

    monkeypatch.setattr(Sim, "check_live", tamper)
    bad = run_seed(LOCAL_SEED, lives=2)
    assert changed and not bad.ok and "invariant" in bad.message and changed[0] in bad.message, bad.message


def test_replay() -> None:
    seed = int(os.environ.get("DELTAVOL_SIM_SEED", "0"))
    off = off_from_env()
    r = run_seed(seed, off=off)
    assert r.ok, report(r, off)


def seed_batches(parts: int = 4) -> list[range]:
    """The seeds in ``parts`` runs of consecutive seeds: tests that parallel workers share."""
    count = int(os.environ.get("DELTAVOL_SIM_SEEDS", str(CI_SEEDS)))
    first = int(os.environ.get("DELTAVOL_SIM_FIRST", "1"))
    bounds = [first + count * i // parts for i in range(parts + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]


@pytest.mark.slow
@pytest.mark.timeout(900)  # a loaded machine: the budget is a count of seeds, not a time
@pytest.mark.parametrize("seeds", seed_batches(), ids=lambda r: f"seeds-{r.start}-{r.stop - 1}")
def test_seeds(seeds: range) -> None:
    off = off_from_env()
    failed = []
    count = len(seeds)
    for seed in seeds:
        r = run_seed(seed, off=off)
        if not r.ok:
            failed.append(report(r, off, tail=12))
    assert not failed, f"{len(failed)} of {count} seeds failed:\n" + "\n".join(failed)


@pytest.mark.parametrize("halted", [True, False], ids=["crash", "no-crash"])
def test_a_task_failing_as_the_process_dies_was_heard_only_if_its_callbacks_retrieve_it(halted: bool) -> None:
    """The checker's rule for tasks that fail in the turn a crash stops the loop (see
    ``unheard``): their done callbacks were due in the next turn. Those whose callbacks
    would have retrieved the exception (a callback that looks at it, a task awaiting it,
    ``wait_for``) were heard; one whose only callback is ``set.discard``, or that has none,
    died unheard; and a life that ended without a crash excuses none of them."""
    loop, fs = SimLoop(Clock()), SimFS(random.Random(1), Clock())
    tasks: list[asyncio.Task[Any]] = []
    loop.set_task_factory(lambda lp, coro, **kw: tasks.append(asyncio.Task(coro, loop=lp, **kw)) or tasks[-1])
    seen: list[BaseException | None] = []
    pending: set[asyncio.Task[None]] = set()

    async def fail() -> None:
        await asyncio.sleep(0)  # (the waiters below wait before it fails)
        raise TargetError(msg="target: connection refused")

    async def awaits(t: asyncio.Task[None]) -> None:
        with contextlib.suppress(TargetError):
            await t

    async def waits_for(t: asyncio.Task[None]) -> None:
        with contextlib.suppress(TargetError):
            await asyncio.wait_for(t, 10)

    def die() -> None:
        raise Halt("crash at fdatasync")

    try:
        looked = loop.create_task(fail(), name="looked")
        looked.add_done_callback(lambda t: seen.append(t.exception()))
        awaited = loop.create_task(fail(), name="awaited")
        waited = loop.create_task(fail(), name="waited")
        discarded = loop.create_task(fail(), name="discarded")
        pending.add(discarded)
        discarded.add_done_callback(pending.discard)  # hears nothing
        orphan = loop.create_task(fail(), name="orphan")
        loop.create_task(awaits(awaited))
        loop.create_task(waits_for(waited))
        if halted:  # at the end of the turn the tasks fail in
            loop.call_soon(loop.call_soon, die)
            with pytest.raises(Halt):
                loop.run_forever()
        else:
            loop.call_soon(loop.call_soon, loop.stop)
            loop.run_forever()
        failing = (looked, awaited, waited, discarded, orphan)
        assert all(t.done() for t in failing) and not seen, "the callbacks ran: nothing to show"
        assert discarded in pending, "set.discard ran before the crash"
        fs.dead = False
        died, excused = unheard(loop, tasks, fs, halted)
        assert not fs.dead, "the disk left dead"
        died_names = sorted(t.get_name() for t, _ in died)
        if halted:
            assert sorted(t.get_name() for t, _, _ in excused) == ["awaited", "looked", "waited"]
            assert died_names == ["discarded", "orphan"]
            assert seen and isinstance(seen[0], TargetError) and discarded not in pending
        else:
            assert not excused and died_names == ["awaited", "discarded", "looked", "orphan", "waited"]
        assert all(isinstance(exc, TargetError) for _, exc in died)
    finally:
        for t in tasks:
            if t.done() and not t.cancelled():
                t.exception()
        loop.close()

"""The deterministic simulation (see ``sim.py``): a fixed budget of seeds in CI.

``DELTAVOL_SIM_SEEDS=N`` runs N seeds (default ``CI_SEEDS``, about two minutes here),
``DELTAVOL_SIM_FIRST`` the first one (in four tests of consecutive seeds, which
parallel workers share); ``DELTAVOL_SIM_SEED=S`` replays one seed exactly
(``pytest tests/sim -k replay``), ``DELTAVOL_SIM_OFF=knob,...`` leaves classes of events
out (``sim.KNOBS``). A failing seed prints what broke, the last events and its replay line.
"""

from __future__ import annotations

import itertools
import os

import pytest

from deltavol.errors import TargetError
from tests.sim.sim import listening, off_from_env, report, run_seed
from tests.sim.simfs import Clock, Halt, SimLoop

CI_SEEDS = 24


def test_a_seed_replays_exactly() -> None:
    first, again = run_seed(7), run_seed(7)
    assert len(first.events) > 20
    assert (first.ok, first.message, first.digest) == (again.ok, again.message, again.digest)


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


def test_a_task_failing_in_the_turn_the_process_dies_was_heard_if_its_callbacks_were_due() -> None:
    """The checker's rule for tasks that fail as a crash stops the loop (see ``listening``):
    the failure of ``opening`` is on its way to its done callback when a callback of the
    same turn dies (``Halt``): it was heard; ``orphan``, failing with no callback, was not."""
    loop = SimLoop(Clock())
    seen: list[BaseException | None] = []

    async def fail() -> None:
        raise TargetError(msg="target: connection refused")

    def die() -> None:
        raise Halt("crash at fdatasync")

    try:
        opening = loop.create_task(fail())
        opening.add_done_callback(lambda t: seen.append(t.exception()))
        orphan = loop.create_task(fail())
        loop.call_soon(die)  # runs in the turn both tasks fail, after them
        with pytest.raises(Halt):
            loop.run_forever()
        assert opening.done() and orphan.done() and not seen, "the callback ran: nothing to show"
        due = listening(loop)
        assert id(opening) in due and id(orphan) not in due
        for t in (opening, orphan):
            t.exception()  # (retrieved: no "never retrieved" when they go)
    finally:
        loop.close()

"""The deterministic simulation (see ``sim.py``): a fixed budget of seeds in CI.

``DELTAVOL_SIM_SEEDS=N`` runs N seeds (default ``CI_SEEDS``, about two minutes here),
``DELTAVOL_SIM_FIRST`` the first one; ``DELTAVOL_SIM_SEED=S`` replays one seed exactly
(``pytest tests/sim -k replay``), ``DELTAVOL_SIM_OFF=knob,...`` leaves classes of events
out (``sim.KNOBS``). A failing seed prints what broke, the last events and its replay line.
"""

from __future__ import annotations

import os

import pytest

from tests.sim.sim import off_from_env, report, run_seed

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


@pytest.mark.slow
@pytest.mark.timeout(900)  # a loaded machine: the budget is a count of seeds, not a time
def test_seeds() -> None:
    count = int(os.environ.get("DELTAVOL_SIM_SEEDS", str(CI_SEEDS)))
    first = int(os.environ.get("DELTAVOL_SIM_FIRST", "1"))
    off = off_from_env()
    failed = []
    for seed in range(first, first + count):
        r = run_seed(seed, off=off)
        if not r.ok:
            failed.append(report(r, off, tail=12))
    assert not failed, f"{len(failed)} of {count} seeds failed:\n" + "\n".join(failed)

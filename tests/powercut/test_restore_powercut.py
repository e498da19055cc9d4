"""Power cuts during restores: the source, on a cutfs layer that loses what was not synced,
must end exactly at the point in time once the restore resumed by itself after power-on
(a chunk leaves the restore's file only once the source write that restored it is durable).

DELTAVOL_POWERCUT_TRIALS sets the number of cuts (24 in the update test, a quarter here)."""

from __future__ import annotations

import os
import random
import time

import pytest

from deltavol.cli.api_client import ApiTarget, call
from tests.interop.peers import qemu_io
from tests.powercut.rig import Rig
from tests.powercut.test_powercut import PATHS, image
from tests.sessions.common import differing_chunks, wait_for

pytestmark = [pytest.mark.crash, pytest.mark.slow]

G = 64 * 1024
SIZE = 32 * 1024 * 1024
TRIALS = max(2, int(os.environ.get("DELTAVOL_POWERCUT_TRIALS", "24")) // 4)


@pytest.mark.timeout(120 + 60 * TRIALS)
def test_power_cuts_during_restores(rig: Rig) -> None:
    srv = rig.server
    srv.cli("volume", "create", "src", "--size", str(SIZE))
    srv.cli("volume", "create", "dst", "--size", str(SIZE))
    PATHS.clear()  # (another rig's paths)
    rng = random.Random(2024)
    srv.cli("session", "create", "s", "--source", "src", "--target", "dst")
    writes = [f"write -P {1 + c % 200} {c * G} {G}" for c in range(SIZE // G)]
    qemu_io(srv.uri("src"), *writes)
    srv.cli("session", "update", "s", "--full", "--wait")
    rig.a.sync()
    at_pit = image(rig, "src")
    assert at_pit == image(rig, "dst")
    interrupted = 0
    api = ApiTarget(srv.root)
    for trial in range(TRIALS):
        chunks = sorted(rng.sample(range(SIZE // G), 400))
        qemu_io(srv.uri("src"), *(f"write -P {0xF0 + trial % 8} {c * G} {G}" for c in chunks))
        call(api, "POST", "/v1/sessions/s/restore")  # (no CLI: its exit alone can outlast a restore)
        # a random moment of the restore, not an ordering; every other cut comes as soon as
        # the restore is accepted, since a fast machine restores 400 chunks within the window
        time.sleep(0.0 if trial % 2 == 0 else rng.uniform(0.0, 0.05))
        rig.power_cut(tear_seed=rng.randrange(1 << 30) if trial % 2 else None)
        resumed = srv.log_path.read_text().count("resuming interrupted restore")
        rig.power_on()
        st = wait_for(srv, lambda s: s["state"] == "idle", "restored", timeout=120)
        assert st["consistent"] and st["tracked_bytes"] == 0, (trial, st)
        assert differing_chunks(image(rig, "src"), at_pit, G) == [], trial
        interrupted += srv.log_path.read_text().count("resuming interrupted restore") > resumed
    print(f"\nrestore power cuts: {TRIALS}, {interrupted} during a restore")
    assert interrupted, "no cut landed during a restore: the test proved nothing"

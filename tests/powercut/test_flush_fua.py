"""NBD FLUSH and FUA really make writes durable: under a power cut (the cutfs layer drops
every write not synced), acknowledged writes followed by a completed FLUSH, and writes
acknowledged with FUA, are on the volume byte for byte; plain writes never flushed are
lost -- which shows the layer bites, and that the first two hold because of a sync."""

from __future__ import annotations

import pytest

from tests.crash.test_kill9 import pattern
from tests.powercut.rig import Rig, SourceModel, run_writer

pytestmark = [pytest.mark.crash, pytest.mark.slow]

G = 64 * 1024
SIZE = 64 * G


def written(rig: Rig, seed: int, chunks: str, **opts: object) -> list[tuple[int, int]]:
    """Run a writer to its end (the server up all along); its log."""
    w = run_writer(rig.server.uri("v"), seed, 12, G, chunks, **opts)
    out, err = w.communicate(timeout=60)
    assert w.returncode == 0, err
    return out


@pytest.mark.parametrize("tear", [False, True], ids=["cut", "torn"])
def test_flushed_and_fua_writes_survive_a_power_cut_and_plain_ones_are_lost(rig: Rig, tear: bool) -> None:
    srv = rig.server
    srv.cli("volume", "create", "v", "--size", str(SIZE))
    rig.a.sync()  # the volume's creation written back long ago (test_powercut checks it alone)
    model = SourceModel(bytes(SIZE), G)
    # one kind of sync per cut: a FUA write's fdatasync also covers every earlier write
    for trial, kind in enumerate(["flush", "fua", "flush", "fua"]):
        seed = 10 * trial + (5 if tear else 1)
        if kind == "flush":
            model.apply(written(rig, seed, "0-32", flush_every=4, final_flush=True))
        else:
            model.apply(written(rig, seed, "0-32", fua_percent=100))
        plain = model.apply(written(rig, seed + 2, "32-64"))
        before = bytes(model.durable)
        rig.power_cut(tear_seed=seed if tear else None)
        rig.power_on()
        image = srv.image("v")
        assert model.violations(image) == [], f"seed {seed}: a write acknowledged with {kind} was lost"
        last = dict(plain)  # chunk -> its last plain write
        lost = [c for c, t in last.items() if image[c * G : (c + 1) * G] != pattern(t, G)]
        assert lost, f"seed {seed}: every unflushed write survived: the layer did not cut"
        if not tear:  # nothing synced them: every one is gone, the chunk as it was
            assert lost == list(last), (lost, last)
            assert all(image[c * G : (c + 1) * G] == before[c * G : (c + 1) * G] for c in last)
        model.settle(image)

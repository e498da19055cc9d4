"""Creating a volume: once its row is committed, its image survives a power cut."""

from __future__ import annotations

from pathlib import Path
from random import Random

from deltavol.store import fs
from deltavol.store.db import Database
from deltavol.volumes import Volumes
from tests.sim.simfs import Clock, SimFS

IMAGES = Path("/sim/volumes")


def test_a_created_volume_survives_a_power_cut(tmp_path: Path) -> None:
    for seed in range(20):
        disk = SimFS(Random(seed), Clock())
        old = fs.use(disk)
        try:
            db = Database(str(tmp_path / f"{seed}.db"))  # SQLite is durable at commit
            Volumes(db, IMAGES).create("v", 1 << 20)
            disk.power_loss()
            assert disk.exists(IMAGES / "v.img"), f"seed {seed}: the row says v exists, its image is gone"
            assert len(disk.read_bytes(IMAGES / "v.img")) == 1 << 20
            db.close()
        finally:
            fs.use(old)

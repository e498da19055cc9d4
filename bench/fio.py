"""fio with its NBD engine: one job, JSON out, the three numbers a table needs."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class FioResult:
    iops: float
    bw: float  # bytes/s
    p99_us: float  # completion latency, 99th percentile

    def figure(self, unit: str) -> float:
        return {"MiB/s": self.bw / 2**20, "IOPS": self.iops, "p99 µs": self.p99_us}[unit]


def fio(
    uri: str,
    rw: str,
    bs: str,
    iodepth: int,
    runtime: float,
    numjobs: int = 1,
    ios: int = 0,
    cold: bool = False,
    extra: tuple[str, ...] = (),
) -> FioResult:
    """``runtime`` seconds after a 1 s ramp; with ``ios``, each job's first ``ios`` requests
    instead, no ramp (``runtime`` only bounds it): what the first writes after a mark cost.
    ``cold``: no ramp, which would fill the page cache unmeasured, and a sequential job goes
    once over the export instead of round it for ``runtime``."""
    cmd = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={iodepth}", f"--numjobs={numjobs}", "--group_reporting", f"--runtime={runtime}",
        "--output-format=json", "--randrepeat=0",
    ]  # fmt: skip
    if ios:
        cmd += [f"--number_ios={ios}"]
    elif not cold:
        cmd += ["--time_based", "--ramp_time=1"]
    elif rw.startswith("rand"):
        cmd += ["--time_based"]
    cmd += extra
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fio {rw} {bs} on {uri}: {out.stderr.strip() or out.stdout[-500:]}")
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    if job["error"]:
        raise RuntimeError(f"fio {rw} {bs} on {uri}: error {job['error']}")
    p99 = side["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
    return FioResult(iops=side["iops"], bw=side["bw_bytes"], p99_us=p99)

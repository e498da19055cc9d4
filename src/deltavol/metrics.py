"""What ``GET /metrics`` shows, and the views the dashboard draws: computed when asked.

Nothing here runs on the data path. The NBD counters are plain lists of ints in each
export (``backend/export.py``), the sync counters plain dicts in ``store/group_commit.py``;
a session's numbers come from its public attributes and ``status()``, the durable ones from
``store/facts.py``. The collector reads them all at scrape time (a prometheus-client custom
collector), so a scrape costs what a ``session status`` of every session costs, and a
request costs two clock reads and a few additions.

Names follow Prometheus' conventions: ``deltavol_`` prefix, base units (``_bytes``,
``_seconds``), ``_total`` on counters. Per session the label is ``session``; per export
``export`` (the volume's name) and ``op`` (read, write, zero, trim, flush, cache,
block_status).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from deltavol.backend.export import BUCKETS, OPS
from deltavol.sessions.states import State
from deltavol.store import group_commit

if TYPE_CHECKING:
    from deltavol.service import Service

CONTENT_TYPE = CONTENT_TYPE_LATEST
STATES = tuple(state.value for state in State)  # restoring too (sessions/restore.py)
# group-commit file classes as the metrics name them
FILE_KINDS = {"TrackingFile": "tracking", "SaveArea": "save_area"}
LAG_EVERY = 0.25  # seconds between two event-loop lag probes
LAG_WINDOW = 10.0  # the lag shown is the worst of this many seconds


def iso_to_unix(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        when = dt.datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def unix_to_iso(when: float | None) -> str | None:
    if when is None:
        return None
    return dt.datetime.fromtimestamp(when, dt.UTC).isoformat(timespec="milliseconds")


def rpo_seconds(point_in_time: str | None, now: float | None = None) -> float | None:
    """The age of the target's point in time: what a loss of the source now would cost."""
    at = iso_to_unix(point_in_time)
    if at is None:
        return None
    return round(max(0.0, (time.time() if now is None else now) - at), 3)


class LoopLag:
    """How late the event loop runs a timer: the worst delay of the last ``LAG_WINDOW``
    seconds (a blocking call on the loop delays every client's request as much)."""

    def __init__(self) -> None:
        self._samples: list[tuple[float, float]] = []  # (when, lag)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._probe(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_EVERY)
            now = loop.time()
            self._samples.append((now, max(0.0, now - before - LAG_EVERY)))
            while self._samples and now - self._samples[0][0] > LAG_WINDOW:
                self._samples.pop(0)

    @property
    def seconds(self) -> float:
        return max((lag for _, lag in self._samples), default=0.0)


class Collector:
    """The prometheus-client collector of one server's service."""

    def __init__(self, service: Service, lag: LoopLag) -> None:
        self.service = service
        self.lag = lag
        self._sent_high: dict[tuple[str, str], float] = {}  # counters never go back in one run

    def describe(self) -> list[Metric]:
        return []  # not registered ahead: collect() runs at scrape time only

    def collect(self) -> Iterator[Metric]:
        yield from self._sessions()
        yield from self._exports()
        yield from self._server()

    def _sessions(self) -> Iterator[Metric]:
        lbl = ["session"]
        tracked = GaugeMetricFamily(
            "deltavol_tracked_bytes", "Bytes written since the last mark.", labels=lbl
        )
        remaining = GaugeMetricFamily(
            "deltavol_transfer_remaining_bytes", "Bytes the current update still has to copy.", labels=lbl
        )
        total = GaugeMetricFamily("deltavol_update_total_bytes", "Bytes of the current update.", labels=lbl)
        rate = GaugeMetricFamily(
            "deltavol_update_rate_bytes_per_second", "Copy rate of the running update.", labels=lbl
        )
        sent = CounterMetricFamily("deltavol_sent_bytes", "Bytes sent to the target.", labels=lbl)
        cofw = CounterMetricFamily(
            "deltavol_cofw_saved_bytes", "Bytes saved by copy-on-first-write.", labels=lbl
        )
        updates = CounterMetricFamily(
            "deltavol_updates", "Updates ended, by kind and result.", labels=["session", "kind", "result"]
        )
        fulls = CounterMetricFamily(
            "deltavol_full_copies", "Full copies started, by reason.", labels=["session", "reason"]
        )
        success = GaugeMetricFamily(
            "deltavol_last_success_timestamp_seconds", "When the last update finished.", labels=lbl
        )
        failure = GaugeMetricFamily(
            "deltavol_last_failure_timestamp_seconds", "When the last update failed.", labels=lbl
        )
        rpo = GaugeMetricFamily(
            "deltavol_rpo_seconds", "Age of the target's point in time (absent: none yet).", labels=lbl
        )
        consistent = GaugeMetricFamily(
            "deltavol_consistent", "1 when the target is a consistent image.", labels=lbl
        )
        state = GaugeMetricFamily(
            "deltavol_session_state", "1 for the session's state.", labels=["session", "state"]
        )
        recopy = GaugeMetricFamily(
            "deltavol_recopy_bytes", "Bytes copied again after a start (hot set).", labels=lbl
        )
        now = time.time()
        facts = self.service.facts
        for s in self.service.sessions.all():
            st = s.status()
            name = st["name"]
            u = st["update"]
            tracked.add_metric([name], st["tracked_bytes"])
            running = u is not None and st["state"] != "idle" and s.transfer is not None
            left = (u["bytes_total"] - u["bytes_done"]) if running and u else 0
            remaining.add_metric([name], max(0, left))
            total.add_metric([name], u["bytes_total"] if running and u else 0)
            rate.add_metric([name], (u.get("rate") or 0) if u else 0)
            b_sent, b_cofw = facts.sent_bytes(name, u)
            sent.add_metric([name], self._monotonic(name, "sent", b_sent))
            cofw.add_metric([name], self._monotonic(name, "cofw", b_cofw))
            f = facts.of(name)
            for key, value in sorted(f.items()):
                parts = key.split(":")
                if parts[0] == "updates" and len(parts) == 3:
                    updates.add_metric([name, parts[1], parts[2]], value)
                elif parts[0] == "full" and len(parts) == 2:
                    fulls.add_metric([name, parts[1]], value)
            if "last_success_at" in f:
                success.add_metric([name], f["last_success_at"])
            if "last_failure_at" in f:
                failure.add_metric([name], f["last_failure_at"])
            age = rpo_seconds(st["point_in_time"], now)
            if age is not None:
                rpo.add_metric([name], age)
            consistent.add_metric([name], 1 if st["consistent"] else 0)
            for one in STATES:
                state.add_metric([name, one], 1 if st["state"] == one else 0)
            recopy.add_metric([name], st.get("recopy_bytes") or 0)
        yield from (tracked, remaining, total, rate, sent, cofw, updates, fulls, success, failure, rpo)
        yield from (consistent, state, recopy)

    def _monotonic(self, name: str, what: str, value: float) -> float:
        key = (name, what)
        value = max(value, self._sent_high.get(key, 0.0))
        self._sent_high[key] = value
        return value

    def _exports(self) -> Iterator[Metric]:
        lbl = ["export", "op"]
        requests = CounterMetricFamily("deltavol_nbd_requests", "NBD requests served.", labels=lbl)
        nbytes = CounterMetricFamily("deltavol_nbd_bytes", "Bytes of NBD requests served.", labels=lbl)
        errors = CounterMetricFamily("deltavol_nbd_errors", "NBD requests that failed.", labels=lbl)
        latency = HistogramMetricFamily(
            "deltavol_nbd_request_duration_seconds", "Time to serve an NBD request.", labels=lbl
        )
        conns = GaugeMetricFamily("deltavol_connections", "NBD connections open.", labels=["export"])
        size = GaugeMetricFamily("deltavol_volume_size_bytes", "Size of the volume.", labels=["export"])
        bounds = [*(repr(b) for b in BUCKETS), "+Inf"]
        for vol in self.service.volumes.all():
            conns.add_metric([vol.name], vol.connections)
            size.add_metric([vol.name], vol.size)
            stats = vol.export.stats
            if stats is None:
                continue
            for i, op in enumerate(OPS):
                requests.add_metric([vol.name, op], stats.requests[i])
                nbytes.add_metric([vol.name, op], stats.bytes[i])
                errors.add_metric([vol.name, op], stats.errors[i])
                cum, buckets = 0, []
                for bound, n in zip(bounds, stats.buckets[i], strict=True):
                    cum += n
                    buckets.append((bound, cum))
                latency.add_metric([vol.name, op], buckets, stats.seconds[i])
        yield from (requests, nbytes, errors, latency, conns, size)

    def _server(self) -> Iterator[Metric]:
        save = GaugeMetricFamily("deltavol_save_area_bytes", "Bytes held in save areas, all sessions.")
        save.add_metric([], sum(s.save.used for s in self.service.sessions.all() if s.save is not None))
        rounds = CounterMetricFamily(
            "deltavol_sync_rounds", "Group-commit rounds of fdatasync, by file kind.", labels=["file"]
        )
        syncs = CounterMetricFamily("deltavol_fsyncs", "Files synced by group commit.", labels=["file"])
        for kind, n in sorted(group_commit.ROUNDS.items()):
            rounds.add_metric([FILE_KINDS.get(kind, kind.lower())], n)
        for kind, n in sorted(group_commit.SYNCS.items()):
            syncs.add_metric([FILE_KINDS.get(kind, kind.lower())], n)
        lag = GaugeMetricFamily(
            "deltavol_event_loop_lag_seconds", f"Worst event-loop delay of the last {LAG_WINDOW:.0f}s."
        )
        lag.add_metric([], self.lag.seconds)
        events = CounterMetricFamily("deltavol_events", "Events published.")
        events.add_metric([], self.service.events.last_id)
        yield from (save, rounds, syncs, lag, events)


def registry(service: Service, lag: LoopLag) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(service, lag))
    return reg


def exposition(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)


def bitmap_grid(bits: bytes | memoryview, nbits: int, cells: int) -> tuple[list[float], int]:
    """A bitmap of ``nbits`` chunks as at most ``cells`` fractions (0..1 of each cell's chunks
    set), and how many chunks a cell covers. Whole bytes per cell when the bitmap is large,
    counted with ``bytes.translate`` (C speed: a 1 TiB volume at 64 KiB is 2 MiB of bits)."""
    if nbits <= 0 or cells <= 0:
        return [], 0
    if nbits <= cells * 8:
        per = -(-nbits // cells)
        out = []
        for start in range(0, nbits, per):
            end = min(nbits, start + per)
            n = sum(1 for c in range(start, end) if bits[c >> 3] >> (c & 7) & 1)
            out.append(n / (end - start))
        return out, per
    nbytes = (nbits + 7) // 8
    per_bytes = -(-nbytes // cells)
    counts = bytes(bits).translate(_POPCOUNT)
    out = []
    for start in range(0, nbytes, per_bytes):
        end = min(nbytes, start + per_bytes)
        chunks = min(nbits, end * 8) - start * 8
        out.append(sum(counts[start:end]) / chunks)
    return out, per_bytes * 8


_POPCOUNT = bytes(bin(i).count("1") for i in range(256))


def session_extras(service: Service, status: dict[str, Any]) -> dict[str, Any]:
    """What the session JSON gains from outside the session: the durable facts and the RPO."""
    f = service.facts.of(status["name"])
    return {
        **status,
        "last_success_at": unix_to_iso(f.get("last_success_at")),
        "last_failure_at": unix_to_iso(f.get("last_failure_at")),
        "rpo_seconds": rpo_seconds(status.get("point_in_time")),
    }

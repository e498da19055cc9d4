"""``python -m bench``: run the figures, print the table, write bench/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from bench.figures import SECTIONS, GiB, Row, Settings
from bench.tls import tls_figures

SECTIONS.setdefault("tls", tls_figures)

HERE = Path(__file__).parent


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    qemu = subprocess.run(["qemu-nbd", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return (
        f"{os.cpu_count()} x {cpu}, {mem:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {qemu}"
    )


def source_commit() -> str:
    """The commit the figures come from, and whether src/ or bench/ differed from it."""
    git = ["git", "-C", str(HERE.parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        return "an unknown commit (not a git checkout)"
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "src", "bench"], capture_output=True, text=True
    )
    changed = [line for line in dirty.stdout.splitlines() if not line.endswith("bench/RESULTS.md")]
    return f"commit {head.stdout.strip()}" + (
        " with uncommitted changes to src/ or bench/" if changed else ""
    )


def fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def cells(row: Row) -> list[str]:
    aim = f"{row.aim[0]} {row.aim[1]:g}{'x' if row.peer is not None else ''}" if row.aim else "report"
    met = {True: "yes", False: "NO", None: ""}[row.met]
    ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
    return [row.figure, row.unit, fmt(row.deltavol), row.peer_name, fmt(row.peer), ratio, aim, met]


HEADERS = ["figure", "unit", "deltavol", "peer", "peer figure", "ratio", "aim", "met"]


def markdown(
    rows: list[Row], settings: Settings, elapsed: float, commit: str, load: tuple[float, float]
) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Run {datetime.date.today().isoformat()} by `make bench` ({elapsed:.0f} s) from {commit},",
        f"on {machine()}; load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end "
        "(other work on the machine slows the one-loop server more than threaded peers).",
        f"fio runs {settings.runtime:g} s each (after 1 s ramp) on a {settings.fio_size // GiB} GiB raw file "
        "over unix sockets; deltavol and its peers serve the same file, one after the other.",
        "Page-cache figures: the better of two runs each, in the order deltavol, qemu-nbd, nbdkit, "
        "nbdkit, qemu-nbd, deltavol. Cold figures: the file's pages dropped before every run of "
        "every server, no ramp.",
        "Tracking figures: one volume with and without sessions in alternation, each run after "
        "`sync`, the better of two each; their first-writes figures time each job's first "
        "8 writes per 4 MiB region of the file, with no ramp. Copy-on-first-write: the better "
        "of two runs each, deltavol and QEMU's copy-before-write (qemu-storage-daemon) in ABBA order.",
        "Copies: the better of two each, deltavol and nbdcopy in ABBA order, on the same files.",
        "Ratios are deltavol / peer in the figure's unit (for seconds and latency lower is better).",
        "",
    ]
    group = None
    for row in rows:
        if row.group != group:
            group = row.group
            lines += ["", f"## {group}", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        lines.append("| " + " | ".join(cells(row)) + " |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--only", multiple=True, type=click.Choice(list(SECTIONS)), help="Run only these sections.")
@click.option("--runtime", default=4.0, show_default=True, help="Seconds per fio run.")
@click.option("--copy-size", default=4, show_default=True, help="GiB of the full-copy volume.")
@click.option("--quick", is_flag=True, help="Short runs on small files (a smoke test, not figures).")
@click.option("--out", type=click.Path(path_type=Path), default=HERE / "RESULTS.md", show_default=True)
def main(only: tuple[str, ...], runtime: float, copy_size: int, quick: bool, out: Path) -> None:
    """Benchmark deltavol side by side with qemu-nbd, nbdkit, qemu-storage-daemon and nbdcopy."""
    missing = [
        t for t in ("fio", "qemu-nbd", "nbdkit", "qemu-storage-daemon", "nbdcopy") if shutil.which(t) is None
    ]
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)} (run `make setup`)")
    work = HERE / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    settings = Settings(work, runtime, GiB, copy_size * GiB)
    if quick:
        settings = Settings(work, 1.0, GiB // 8, GiB // 4)
    console = Console()
    table = Table(*HEADERS, title="deltavol benchmarks")
    rows: list[Row] = []
    start, load = datetime.datetime.now(), os.getloadavg()[0]
    commit = source_commit()  # before the run: what was measured
    console.log(f"figures of {commit}")
    try:
        for name in only or SECTIONS:
            console.log(f"section {name}")
            for row in SECTIONS[name](settings):
                rows.append(row)
                table.add_row(*cells(row))
                console.log(" | ".join(cells(row)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    console.print(table)
    if not quick:
        elapsed = (datetime.datetime.now() - start).total_seconds()
        out.write_text(markdown(rows, settings, elapsed, commit, (load, os.getloadavg()[0])))
        console.print(f"written {out}")


if __name__ == "__main__":
    main()

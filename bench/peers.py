"""The servers a benchmark runs side by side on the same files: deltavol, qemu-nbd, nbdkit's
file plugin, and qemu-storage-daemon with QEMU's copy-before-write filter."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deltavol.cli.api_client import ApiTarget, acall, call, events

DELTAVOL = Path(sys.executable).with_name("deltavol")


def nbd_unix(export: str, sock: Path) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(200):
        if path.exists():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        time.sleep(0.025)
    raise RuntimeError(f"{what} did not start")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Deltavol:
    """A running ``deltavol serve`` on its own data dir, driven through its control API."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.root = root
        self.sock = root / "nbd.sock"
        self.api = ApiTarget(root)
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "api.sock").unlink(missing_ok=True)
        log = open(self.root.with_name(self.root.name + ".log"), "ab")  # noqa: SIM115
        env = {**os.environ, "DELTAVOL_DATA_DIR": str(self.root)}
        cmd = [str(DELTAVOL), "serve", "--nbd-socket", str(self.sock), *self.extra]
        self.proc = subprocess.Popen(cmd, env=env, stderr=log)
        _wait_for(self.root / "api.sock", self.proc, "deltavol serve")

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def uri(self, volume: str) -> str:
        return nbd_unix(volume, self.sock)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return call(self.api, method, path, body)

    def volume(self, name: str, size: int | None = None, path: Path | None = None) -> Path:
        """Create (sparse) or import a volume; returns its file."""
        body = {"name": name, "size": size} if path is None else {"name": name, "path": str(path)}
        return Path(self.call("POST", "/v1/volumes", body)["path"])

    def session(self, name: str, source: str, target: str) -> None:
        self.call("POST", "/v1/sessions", {"name": name, "source": source, "target": target})

    def update(self, name: str, full: bool = False, max_rate: str | None = None) -> int:
        info = self.call("POST", f"/v1/sessions/{name}/update", {"full": full, "max_rate": max_rate})
        return info["update"]["id"]

    def wait(self, name: str) -> dict[str, Any]:
        """Poll (10 ms) until the session stops copying; the update must have ended idle."""
        while True:
            info = self.call("GET", f"/v1/sessions/{name}")
            if info["state"] != "copying":
                if info["state"] != "idle":
                    raise RuntimeError(f"session {name}: {info['state']}: {info['last_error']}")
                return info
            time.sleep(0.01)

    def timed_run(self, name: str, start: str, ends: tuple[str, str], body: Any = None) -> float:
        """Seconds from ``POST start`` until the server publishes the end of what it started
        (``ends``: done, failed), as ``session update --wait`` follows an update: over the
        event stream, subscribed before the clock starts. No polling interval and no
        process start count. A failure raises."""

        async def go() -> float:
            began = 0.0

            async def post() -> None:
                nonlocal began
                began = time.perf_counter()
                await acall(self.api, "POST", start, body)

            async for ev in events(self.api, opened=post):
                if ev.data.get("name") != name or ev.kind not in ends:
                    continue
                took = time.perf_counter() - began
                if ev.kind == ends[1]:
                    raise RuntimeError(f"session {name}: {ev.kind}: {ev.data.get('error')}")
                return took
            raise RuntimeError("the server closed the event stream")

        return asyncio.run(go())

    def timed_update(self, name: str, full: bool = False) -> float:
        """An update of ``name`` from its request to its end (``timed_run``); it must end idle."""
        took = self.timed_run(
            name, f"/v1/sessions/{name}/update", ("update.finished", "update.failed"), {"full": full}
        )
        self.wait(name)  # (at once: it has finished) idle, or it raises
        return took

    def tracking_syncs(self) -> int:
        """Tracking files synced by group-commit rounds so far (``deltavol_fsyncs``)."""
        import aiohttp

        async def get() -> str:
            connector = aiohttp.UnixConnector(path=self.api.unix_socket)
            async with (
                aiohttp.ClientSession(connector=connector) as http,
                http.get("http://deltavol/metrics") as resp,
            ):
                return await resp.text()

        for line in asyncio.run(get()).splitlines():
            if line.startswith('deltavol_fsyncs_total{file="tracking"}'):
                return int(float(line.split()[-1]))
        return 0

    def rss(self) -> tuple[int, int]:
        """(current, peak) resident set size of the server, in bytes."""
        assert self.proc is not None
        return rss_of(self.proc.pid)


@contextmanager
def deltavol(root: Path, *extra: str) -> Iterator[Deltavol]:
    server = Deltavol(root, *extra)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def serve(cmd: list[str], sock: Path, what: str) -> Iterator[subprocess.Popen[bytes]]:
    """A peer server started by ``cmd``, ready once its unix socket ``sock`` exists."""
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        _wait_for(sock, proc, what)
        yield proc
    finally:
        _stop(proc)


@contextmanager
def qemu_nbd(image: Path, sock: Path, export: str = "bench") -> Iterator[str]:
    """qemu-nbd as fast as it goes on a raw file: writeback cache, thread pool, many clients."""
    cmd = [
        "qemu-nbd", "-f", "raw", "-x", export, "-k", str(sock), "--persistent", "--shared=16",
        "--cache=writeback", "--aio=threads", str(image),
    ]  # fmt: skip
    with serve(cmd, sock, "qemu-nbd"):
        yield nbd_unix(export, sock)


def nbdkit_file_cmd(image: Path, sock: Path, export: str = "bench") -> list[str]:
    """nbdkit's file plugin on a raw file, as it comes: page cache, its default 16 threads."""
    return ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock), "-e", export, "file", str(image)]


@contextmanager
def nbdkit_file(image: Path, sock: Path, export: str = "bench") -> Iterator[str]:
    with serve(nbdkit_file_cmd(image, sock, export), sock, "nbdkit"):
        yield nbd_unix(export, sock)


@contextmanager
def qemu_storage_daemon(
    image: Path, sock: Path, fleece: Path | None = None, export: str = "bench"
) -> Iterator[str]:
    """qemu-storage-daemon exporting a raw file over NBD; with ``fleece``, through QEMU's
    copy-before-write filter whose target is that (raw) file: every cluster's old contents
    go there before its first write, as in a push backup's fleecing. Writeback cache and
    a thread pool on both files, as qemu-nbd runs here."""

    def raw(name: str, path: Path) -> list[str]:
        return [
            "--blockdev", f"driver=file,node-name={name}-file,filename={path},aio=threads,cache.direct=off",
            "--blockdev", f"driver=raw,node-name={name},file={name}-file",
        ]  # fmt: skip

    cmd = ["qemu-storage-daemon", *raw("src", image)]
    node = "src"
    if fleece is not None:
        cmd += raw("fleece", fleece)
        cmd += ["--blockdev", "driver=copy-before-write,node-name=cbw,file=src,target=fleece"]
        node = "cbw"
    cmd += [
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", f"type=nbd,id=export,node-name={node},name={export},writable=on",
    ]  # fmt: skip
    with serve(cmd, sock, "qemu-storage-daemon"):
        yield nbd_unix(export, sock)


def rss_of(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

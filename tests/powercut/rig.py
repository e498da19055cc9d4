"""Power cuts of the real server: the cutfs layer (cutfs.c) under the data dir and under a
remote qemu-nbd target's image, a server that sees a new boot at every power-on, and a
byte model of what the source must hold after a cut.

A power cut (``Rig.power_cut``): SIGSTOP the server and qemu-nbd (nothing more reaches
the layers from them), freeze both layers at that instant (all that was not synced is
lost; optionally a seeded half of the unsynced sectors inside the files' durable sizes
is written first, as a kernel's writeback may have), SIGKILL everything, unmount.
``Rig.power_on`` remounts the layers (the durable state only), restarts qemu-nbd and the
server on the same data dir. The server runs in its own mount namespace with a
per-power-on /proc/sys/kernel/random/boot_id bound over the real one: deltavol trusts
unsynced tracking bits after a crash of the same boot (the page cache survives a kill),
so a power cut it could not tell from a kill would be no power cut.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.crash.test_kill9 import pattern
from tests.harness import DELTAVOL, SYSTEM_PYTHON, Server, require

CUTFS_C = Path(__file__).with_name("cutfs.c")
WRITER = Path(__file__).with_name("writer.py")
SECTOR = 512


def build_cutfs(out_dir: Path) -> Path:
    """Compile cutfs.c (a second with cc); a missing compiler or libfuse3-dev skips the
    tests, or fails them under CI=true."""
    require("cc", "pkg-config", "fusermount3", "unshare", "qemu-nbd")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True)
    if flags.returncode or not Path("/dev/fuse").exists():
        message = "cutfs needs libfuse3-dev and /dev/fuse (run `make setup`)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    binary = out_dir / "cutfs"
    cc = ["cc", "-O2", "-Wall", "-Wno-format-truncation", "-o", str(binary), str(CUTFS_C)]
    done = subprocess.run([*cc, *flags.stdout.split()], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return binary


class Layer:
    """A cutfs mount: ``mnt`` serves what ``backing`` holds durably plus what was not synced."""

    def __init__(self, binary: Path, backing: Path, mnt: Path) -> None:
        self.binary, self.backing, self.mnt = binary, backing, mnt
        self.proc: subprocess.Popen[bytes] | None = None
        backing.mkdir(exist_ok=True)
        mnt.mkdir(exist_ok=True)
        self.log = open(backing.with_name(backing.name + ".log"), "ab")  # noqa: SIM115

    def mount(self) -> None:
        self.proc = subprocess.Popen([self.binary, self.backing, self.mnt], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mnt):
            assert self.proc.poll() is None, f"cutfs exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "cutfs did not mount"
            time.sleep(0.01)

    def control(self, command: str) -> None:
        fd = os.open(self.mnt / ".cutfs", os.O_WRONLY)
        try:
            os.write(fd, command.encode())
        finally:
            os.close(fd)

    def cut(self, tear_seed: int | None = None) -> None:
        """Freeze the durable state now; every later operation but a read fails with EIO."""
        self.control("cut" if tear_seed is None else f"tear {tear_seed}")

    def sync(self) -> None:
        """Everything durable: the writeback a quiet minute would have done."""
        self.control("sync")

    def written(self) -> dict[str, int]:
        """Bytes written (or fallocated) per file since the mount, by path in the mount."""
        out = self.backing.with_name(self.backing.name + ".count")
        self.control(f"count {out}")
        counts = {}
        for line in out.read_text().splitlines():
            path, n = line.rsplit(" ", 1)
            counts[path.lstrip("/")] = int(n)
        return counts

    def unmount(self, clean: bool = False) -> None:
        """After a cut the daemon is killed (nothing of its memory may survive); ``clean``
        lets it end by the unmount."""
        if self.proc is None:
            return
        if not clean:
            self.proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class PowerServer(Server):
    """A server that believes the machine booted anew at each start."""

    def start(self) -> None:
        boot = self.root.parent.parent / f"{self.root.parent.name}.boot-{uuid.uuid4()}"
        boot.write_text(str(uuid.uuid4()) + "\n")
        script = 'mount --bind "$0" /proc/sys/kernel/random/boot_id && exec "$@"'
        self.exe = ("unshare", "-m", "sh", "-c", script, str(boot), DELTAVOL)
        super().start()


class Target:
    """qemu-nbd serving an image on a layer, at a socket outside it."""

    def __init__(self, image: Path, sock: Path, log: Path) -> None:
        self.image, self.sock = image, sock
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = open(log, "ab")  # noqa: SIM115

    def create(self, size: int) -> None:
        """The image, made durable the way a careful program makes a file."""
        with open(self.image, "wb") as f:
            f.truncate(size)
            os.fsync(f.fileno())
        fd = os.open(self.image.parent, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)

    def start(self) -> None:
        self.sock.unlink(missing_ok=True)
        cmd = ["qemu-nbd", "-f", "raw", "-x", "t", "-k", str(self.sock), "--persistent", "--shared=8"]
        self.proc = subprocess.Popen([*cmd, str(self.image)], stderr=self.log)
        deadline = time.monotonic() + 30  # a loaded machine starts a server slowly
        while time.monotonic() < deadline:
            if self.sock.exists():
                return
            assert self.proc.poll() is None, f"qemu-nbd exited with {self.proc.returncode}"
            time.sleep(0.01)
        raise AssertionError("qemu-nbd did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///t?socket={self.sock}"


class Rig:
    """Layer ``a`` holds the data dir (source and local target volumes), layer ``b`` the
    remote target's image."""

    def __init__(self, binary: Path, tmp: Path, *serve_args: str) -> None:
        self.tmp = tmp
        self.a = Layer(binary, tmp / "a.backing", tmp / "a")
        self.b = Layer(binary, tmp / "b.backing", tmp / "b")
        self.a.mount()
        self.b.mount()
        self.server = PowerServer(self.a.mnt / "data", *serve_args, log_path=tmp / "server.log")
        self.target = Target(self.b.mnt / "t.img", tmp / "t.sock", tmp / "qemu-nbd.log")
        self.cuts = 0

    def power_cut(self, tear_seed: int | None = None) -> None:
        procs = [p for p in (self.server.proc, self.target.proc) if p is not None and p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        self.a.cut(tear_seed)
        self.b.cut(None if tear_seed is None else tear_seed + 1)
        for p in procs:
            p.kill()
            p.wait()
        self.target.proc = None
        self.a.unmount()
        self.b.unmount()
        self.cuts += 1

    def power_on(self) -> None:
        self.a.mount()
        self.b.mount()
        self.target.start()
        self.server.start()

    def close(self) -> None:
        try:
            if self.server.proc is not None and self.server.proc.poll() is None:
                self.server.stop()
        finally:
            self.target.stop()
            self.a.unmount(clean=True)
            self.b.unmount(clean=True)
            for log in (self.server.log, self.target.log, self.a.log, self.b.log):
                log.close()


def run_writer(
    uri: str, seed: int, count: int, gran: int, chunks: str, **opts: object
) -> subprocess.Popen[str]:
    """writer.py (see there); opts: delay, flush_every, fua_percent, final_flush."""
    args = [str(opts.get("delay", 0.0)), str(opts.get("flush_every", 0)), str(opts.get("fua_percent", 0))]
    if opts.get("final_flush"):
        args.append("final-flush")
    return subprocess.Popen(
        [SYSTEM_PYTHON, str(WRITER), uri, str(seed), str(count), str(gran), chunks, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class SourceModel:
    """What a volume must hold after a power cut, from writers' logs (writer.py).

    ``durable`` is what the volume must hold where nothing newer was sent; ``pending[c]``
    the tags sent to chunk c since its durable contents (acknowledged or not). After a
    cut every 512-byte sector of chunk c holds its durable bytes or one of those writes
    (a torn write leaves some sectors of each).
    """

    def __init__(self, image: bytes, gran: int) -> None:
        self.gran = gran
        self.durable = bytearray(image)
        self.pending: dict[int, list[int]] = {}
        self.unsynced: list[tuple[int, int]] = []  # acknowledged, not yet covered by a FLUSH
        self.sent: dict[int, int] = {}  # tag -> its place in the order writes were sent
        self.durable_tag: dict[int, int] = {}  # chunk -> tag of its durable contents
        self.durable_by: dict[int, str] = {}  # chunk -> what made them durable (FUA, FLUSH, mark)

    def _make_durable(self, chunk: int, tag: int, by: str) -> None:
        """``tag`` is durable on ``chunk``, unless a write sent later already is (a FLUSH
        after an older write's ack comes after a newer FUA write)."""
        newest = self.durable_tag.get(chunk)
        if newest is not None and self.sent[newest] > self.sent[tag]:
            return
        self.durable_tag[chunk] = tag
        self.durable_by[chunk] = by
        g = self.gran
        self.durable[chunk * g : (chunk + 1) * g] = pattern(tag, g)
        tags = self.pending.get(chunk, [])
        if tag in tags:
            self.pending[chunk] = tags[tags.index(tag) + 1 :]

    def apply(self, log: str) -> list[tuple[int, int]]:
        """One writer's log, in order; returns its acknowledged writes."""
        acked: list[tuple[int, int]] = []
        covered: list[tuple[int, int]] = []
        for line in log.splitlines():
            kind, *args = line.split()
            if kind == "send":
                self.pending.setdefault(int(args[0]), []).append(int(args[1]))
                self.sent[int(args[1])] = len(self.sent)
            elif kind in ("ack", "fua"):
                write = (int(args[0]), int(args[1]))
                acked.append(write)
                if kind == "fua":
                    self._make_durable(*write, "FUA")
                else:
                    self.unsynced.append(write)
            elif kind == "flush":
                covered = list(self.unsynced)
            elif kind == "flushed":
                for write in covered:
                    self._make_durable(*write, "FLUSH")
                self.unsynced = [w for w in self.unsynced if w not in covered]
        return acked

    def flush_all(self, by: str = "mark") -> None:
        """Every acknowledged write durable (a mark flushes the source first)."""
        for write in self.unsynced:
            self._make_durable(*write, by)
        self.unsynced = []

    def image(self) -> bytes:
        """The volume's bytes when no write is pending (all acknowledged and flushed)."""
        assert not any(self.pending.values()) and not self.unsynced
        return bytes(self.durable)

    def violations(self, image: bytes) -> list[str]:
        """Chunks of ``image`` that hold something no write allows (lost durable data)."""
        g, bad = self.gran, []
        for c in range(len(self.durable) // g):
            got = image[c * g : (c + 1) * g]
            want = self.durable[c * g : (c + 1) * g]
            if got == want:
                continue
            newer = {pattern(t, SECTOR) for t in self.pending.get(c, [])}
            for s in range(0, g, SECTOR):
                sector = got[s : s + SECTOR]
                if sector != want[s : s + SECTOR] and sector not in newer:
                    head = int.from_bytes(got[s : s + 8], "little")
                    bad.append(
                        f"chunk {c} sector {s // SECTOR}: tag {head}, durable tag "
                        f"{int.from_bytes(want[s : s + 8], 'little')} (by {self.durable_by.get(c, '-')}), "
                        f"pending {self.pending.get(c, [])}"
                    )
                    break
        return bad

    def settle(self, image: bytes) -> None:
        """After a cut and its checks: what is there is now the durable state."""
        self.durable = bytearray(image)
        self.pending = {}
        self.unsynced = []
        self.durable_tag = {}
        self.durable_by = {}

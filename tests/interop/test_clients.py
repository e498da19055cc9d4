"""Real NBD clients against ``deltavol serve``: qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh, fio.

Every test checks bytes (patterns, hashes), not only exit codes.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.harness import Server, require
from tests.interop.peers import dump_sha, nbdinfo_json, nbdsh, qemu_io, run, sha

pytestmark = pytest.mark.interop

MiB = 1 << 20


@pytest.fixture
def vol(server: Server) -> str:
    server.cli("volume", "create", "v", "--size", "16MiB")
    return server.uri("v")


# --- qemu-io ------------------------------------------------------------------------------
# (offset, length) pairs: aligned, unaligned, straddling chunk and page edges, the last byte
SPANS = [(0, 512), (1000, 3), (2047, 2), (4095, 3), (65535, 65538), (MiB + 7, 300_000), (16 * MiB - 1, 1)]


def test_qemu_io_patterns_at_many_offsets(server: Server, vol: str) -> None:
    writes = [f"write -P {0x11 + i} {off} {n}" for i, (off, n) in enumerate(SPANS)]
    qemu_io(vol, *writes)
    reads = [f"read -P {0x11 + i} {off} {n}" for i, (off, n) in enumerate(SPANS)]
    qemu_io(vol, *reads)
    image = server.image("v")
    for i, (off, n) in enumerate(SPANS):
        assert image[off : off + n] == bytes([0x11 + i]) * n
    assert image[8192:65535] == bytes(65535 - 8192)  # untouched between the spans


def test_qemu_io_aio_writes_and_zero_and_discard(server: Server, vol: str) -> None:
    qemu_io(vol, "aio_write -P 0xa1 0 1M", "aio_write -P 0xa2 1M 1M", "aio_flush")
    qemu_io(vol, "write -z 512K 64K", "discard 1M 128K")
    qemu_io(
        vol, "read -P 0xa1 0 512K", "read -P 0 512K 64K", "read -P 0xa1 576K 448K",
        "read -P 0 1M 128K", "read -P 0xa2 1152K 896K", read_only=True,
    )  # fmt: skip


def test_out_of_range_fails_and_changes_nothing(server: Server, vol: str) -> None:
    qemu_io(vol, "write -P 0x55 0 16M")
    before = server.image("v")
    text = qemu_io(vol, "write -P 0x66 16M 512", "read 16M-512 1024", ok=False)
    assert "failed" in text
    assert server.image("v") == before


# --- qemu-img ---------------------------------------------------------------------------------
def test_qemu_img_convert_in_and_out(server: Server, vol: str, tmp_path: Path) -> None:
    require("qemu-img")
    src = tmp_path / "in.img"
    data = bytearray(random.Random(1).randbytes(16 * MiB))
    data[4 * MiB : 8 * MiB] = bytes(4 * MiB)  # a zero stretch qemu-img may send as zeroes
    src.write_bytes(data)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), vol)
    assert server.image("v") == bytes(data)
    out = tmp_path / "out.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", vol, str(out))
    assert sha(out) == sha(src)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), vol)


def test_qemu_img_map_shows_the_data(server: Server, vol: str) -> None:
    require("qemu-img")
    qemu_io(vol, "write -P 1 2M 1M")
    extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", vol).stdout)
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    assert data == [(2 * MiB, MiB)]


# --- nbdinfo / nbdcopy --------------------------------------------------------------------
def test_nbdinfo_list_and_export_info(server: Server) -> None:
    server.cli("volume", "create", "a", "--size", "1MiB")
    server.cli("volume", "create", "b", "--size", "3MiB")
    listing = nbdinfo_json(server.uri("a"), "--list")
    sizes = {e["export-name"]: e["export-size"] for e in listing["exports"]}
    assert sizes == {"a": MiB, "b": 3 * MiB}
    (info,) = nbdinfo_json(server.uri("b"))["exports"]
    assert info["export-size"] == 3 * MiB
    assert info["can_multi_conn"] and info["can_flush"] and info["can_trim"] and info["can_zero"]
    assert info["block_size_minimum"] == 1 and info["block_size_maximum"] >= 32 * MiB
    assert "base:allocation" in info["contexts"]


def test_nbdinfo_map_on_a_sparse_volume(server: Server, vol: str) -> None:
    require("nbdinfo")
    qemu_io(vol, "write -P 7 1M 64K", "write -P 8 8M 128K")
    entries = json.loads(run("nbdinfo", "--map", "--json", vol).stdout)
    data = [(e["offset"], e["length"]) for e in entries if e["type"] == 0]
    holes = sum(e["length"] for e in entries if e["type"] != 0)
    assert data == [(MiB, 64 * 1024), (8 * MiB, 128 * 1024)]
    assert holes == 16 * MiB - 192 * 1024


@pytest.mark.parametrize("options", [[], ["--connections=4", "--requests=16"]])
def test_nbdcopy_in_and_out(server: Server, vol: str, tmp_path: Path, options: list[str]) -> None:
    require("nbdcopy")
    src = tmp_path / "src.img"
    src.write_bytes(random.Random(2).randbytes(16 * MiB))
    run("nbdcopy", *options, str(src), vol)
    assert dump_sha(vol, tmp_path) == sha(src)
    assert server.image("v") == src.read_bytes()


# --- nbdsh: protocol edge cases through libnbd --------------------------------------------
def test_nbdsh_structured_replies_block_status_trim_zero_fua(vol: str) -> None:
    nbdsh(
        vol,
        """
assert h.get_structured_replies_negotiated()
h.pwrite(b"\\xab" * 65536, 0, nbd.CMD_FLAG_FUA)
h.pwrite(b"\\xcd" * 65536, 1 << 20)
seen = []
h.block_status(2 << 20, 0, lambda ctx, off, ents, err: seen.append((ctx, list(ents))))
ctx, ents = seen[0]
assert ctx == "base:allocation", ctx
assert ents[0:2] == [65536, 0], ents  # data
assert ents[3] & 1, ents  # then a hole
h.trim(65536, 0)
assert h.pread(65536, 0) == bytes(65536)
h.pwrite(b"\\xef" * 65536, 2 << 20)
h.zero(65536, 2 << 20, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 2 << 20) == bytes(65536)
h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(65536, 0) == bytes(65536)
h.flush()
h.cache(1 << 20, 65536)
assert h.pread(65536, 1 << 20) == b"\\xcd" * 65536
""",
        "--base-allocation",
    )


def test_nbdsh_out_of_range_and_oversized_requests(server: Server, vol: str) -> None:
    nbdsh(
        vol,
        """
size = h.get_size()
h.set_strict_mode(0)  # let bad requests reach the server instead of being refused by libnbd
h.pwrite(b"\\x5a" * 4096, size - 4096)
for op in (lambda: h.pread(8192, size - 4096), lambda: h.pwrite(b"x" * 8192, size - 4096),
           lambda: h.pwrite(b"x" * (1 << 20), size - 4096),  # refused before its payload comes
           lambda: h.zero(8192, size - 4096), lambda: h.trim(8192, size - 4096)):
    try:
        op()
    except nbd.Error as e:
        assert e.errno in ("EINVAL", "ENOSPC"), e  # libnbd names the errno
    else:
        raise AssertionError("out-of-range request succeeded")
assert h.pread(4096, size - 4096) == b"\\x5a" * 4096
try:
    h.pread(64 << 20, 0)
except nbd.Error as e:
    assert e.errno in ("EINVAL", "EOVERFLOW", "ENOMEM"), e
else:
    raise AssertionError("a 64 MiB read succeeded")
assert len(h.pread(32 << 20 if size >= 32 << 20 else size, 0)) > 0
""",
    )
    assert server.image("v")[-4096:] == b"\x5a" * 4096


def test_nbdsh_many_connections_see_each_others_writes(server: Server, vol: str) -> None:
    nbdsh(
        vol,
        f"""
others = [nbd.NBD() for _ in range(4)]
for o in others:
    o.connect_uri({vol!r})
for i, o in enumerate(others):
    o.pwrite(bytes([i + 1]) * 4096, i * 4096)
    o.flush()
assert h.pread(4 * 4096, 0) == b"".join(bytes([i + 1]) * 4096 for i in range(4))
for o in others:
    o.shutdown()
""",
    )


# --- fio ------------------------------------------------------------------------------------
def test_fio_jobs_with_verify(server: Server) -> None:
    require("fio")
    server.cli("volume", "create", "f", "--size", "64MiB")
    common = [
        "fio", "--ioengine=nbd", f"--uri={server.uri('f')}", "--numjobs=4", "--size=16M",
        "--offset_increment=16M", "--iodepth=16", "--bsrange=4k-64k", "--verify=crc32c",
        "--group_reporting", "--output-format=json", "--randseed=42", "--verify_state_save=0",
    ]  # fmt: skip
    out = run(*common, "--name=w", "--rw=randwrite", "--do_verify=1")
    report = json.loads(out.stdout[out.stdout.index("{") :])
    assert all(job["error"] == 0 for job in report["jobs"])
    assert report["jobs"][0]["write"]["io_bytes"] >= 4 * 16 * MiB
    out = run(*common, "--name=w", "--rw=randwrite", "--verify_only")
    assert all(job["error"] == 0 for job in json.loads(out.stdout[out.stdout.index("{") :])["jobs"])
    assert os.path.getsize(json.loads(server.cli("volume", "info", "f", "--json"))["path"]) == 64 * MiB


def test_nbdsh_overlapping_writes_in_flight_land_in_the_order_sent(server: Server, vol: str) -> None:
    """Writes sent without waiting for replies (small ones, done at once or in the lane,
    behind 1 MiB ones, always in the lane), each overlapping the one before, a FLUSH in
    their midst: the bytes are those of the last write sent over each byte."""
    nbdsh(
        vol,
        """
import random
rng = random.Random(5)
image = bytearray(4 << 20)
for rnd in range(6):
    for i in range(48):
        length = (1 << 20) if i % 8 == 0 else rng.choice((512, 4096, 4096 + 512, 65536 + 7))
        offset = rng.randrange(0, 1 << 20, 512) + (rnd % 3) * (1 << 20)
        data = bytes([(rnd * 48 + i) % 255 + 1]) * length
        h.aio_pwrite(data, offset)
        image[offset:offset + length] = data
        if i == 24:
            h.aio_flush()
    while h.aio_in_flight() > 0:
        h.poll(-1)
assert h.pread(4 << 20, 0) == bytes(image), "a write landed out of order"
""",
    )

"""Writes with FLUSH and FUA over NBD, logging what the server acknowledged (run with
Debian's python3 + libnbd, as tests/crash/writer.py).

Writes ``count`` whole chunks at seeded random chunk numbers of CHUNKS (ranges "a-b,c-d",
b excluded); each write's contents come from its tag. Every line is flushed before the
next request goes out, so whoever cuts the power knows what the server owed:

    send C TAG     the write is about to be sent
    ack C TAG      its reply came (a plain write: durable only after a later FLUSH)
    fua C TAG      its reply came and it was sent with FUA: durable now
    flush N        a FLUSH is sent after the N-th acknowledged write
    flushed N      its reply came: the first N acknowledged writes are durable

usage: writer.py URI SEED COUNT GRANULARITY CHUNKS DELAY FLUSH_EVERY FUA_PERCENT [final-flush]
(FLUSH_EVERY 0: no FLUSH but the final one, if asked)
"""

import random
import sys
import time
from pathlib import Path

import nbd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.crash.writer import pattern


def chunk_list(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, hi = map(int, part.split("-"))
        out.extend(range(lo, hi))
    return out


def main() -> None:
    uri, seed, count, gran = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    chunks = chunk_list(sys.argv[5])
    delay, flush_every, fua_percent = float(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
    final_flush = sys.argv[9:] == ["final-flush"]
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.can_flush() and h.can_fua(), "the export must offer FLUSH and FUA"
    acked = 0

    def flush() -> None:
        print(f"flush {acked}", flush=True)
        h.flush()
        print(f"flushed {acked}", flush=True)

    for i in range(count):
        chunk = rng.choice(chunks)
        tag = seed * 1_000_000 + i + 1
        fua = rng.randrange(100) < fua_percent
        print(f"send {chunk} {tag}", flush=True)
        h.pwrite(pattern(tag, gran), chunk * gran, nbd.CMD_FLAG_FUA if fua else 0)
        acked += 1
        print(f"{'fua' if fua else 'ack'} {chunk} {tag}", flush=True)
        if flush_every and acked % flush_every == 0:
            flush()
        if delay:
            time.sleep(delay)
    if final_flush:
        flush()
    h.shutdown()


if __name__ == "__main__":
    main()

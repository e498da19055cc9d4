"""A pattern writer that records what was acknowledged (run with Debian's python3 + libnbd).

Writes ``count`` whole chunks at random (seeded) chunk numbers; each write's contents are
derived from its tag, and the tag is printed (flushed) only after the server acknowledged
it — so whoever kills the server knows exactly which writes it owes.

usage: writer.py URI SEED COUNT GRANULARITY NCHUNKS [DELAY]
"""

import random
import sys
import time

import nbd


def pattern(tag: int, length: int) -> bytes:
    head = tag.to_bytes(8, "little")
    return (head * (length // 8 + 1))[:length]


def main() -> None:
    uri, seed, count, gran, nchunks = sys.argv[1], *map(int, sys.argv[2:6])
    delay = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    for i in range(count):
        chunk = rng.randrange(nchunks)
        tag = seed * 1_000_000 + i + 1
        print(f"send {chunk} {tag}", flush=True)
        h.pwrite(pattern(tag, gran), chunk * gran)
        print(f"ack {chunk} {tag}", flush=True)
        if delay:
            time.sleep(delay)
    h.shutdown()


if __name__ == "__main__":
    main()

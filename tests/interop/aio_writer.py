"""Queues COUNT writes at once, then reports each as it completes (run with Debian's
python3 + libnbd).

Write i goes to chunk i with contents derived from its tag i + 1. Lines, flushed as they
happen: ``send CHUNK TAG T`` as each is queued, ``sent`` once all are, then ``ack CHUNK
TAG T`` when the server acknowledged one, or ``err CHUNK TAG ERRNO T`` if it failed (an
error reply, or the connection gone). T is CLOCK_MONOTONIC.

usage: aio_writer.py URI COUNT GRANULARITY
"""

import sys
import time

import nbd


def pattern(tag: int, length: int) -> bytes:
    head = tag.to_bytes(8, "little")
    return (head * (length // 8 + 1))[:length]


def main() -> None:
    uri, count, gran = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    h = nbd.NBD()
    h.connect_uri(uri)
    pending: dict[int, tuple[int, int, nbd.Buffer]] = {}  # cookie -> (chunk, tag, buffer kept alive)

    def log(*fields: object) -> None:
        print(*fields, f"{time.monotonic():.6f}", flush=True)

    def reap() -> None:
        for cookie in list(pending):
            chunk, tag, _ = pending[cookie]
            try:
                if not h.aio_command_completed(cookie):
                    continue
                log("ack", chunk, tag)
            except nbd.Error as exc:
                log("err", chunk, tag, exc.errno or "0")
            del pending[cookie]

    try:
        for i in range(count):
            buf = nbd.Buffer.from_bytearray(bytearray(pattern(i + 1, gran)))
            log("send", i, i + 1)
            pending[h.aio_pwrite(buf, i * gran)] = (i, i + 1, buf)
        print("sent", flush=True)
        while pending:
            h.poll(-1)
            reap()
    except nbd.Error:
        reap()  # the connection is gone: what is still pending fails now
        for chunk, tag, _ in pending.values():
            log("err", chunk, tag, "0")


if __name__ == "__main__":
    main()

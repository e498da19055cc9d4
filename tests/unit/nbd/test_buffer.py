"""ReceiveBuffer: what is fed comes out in order, whatever the piece sizes; memory stays
bounded while a stream goes through it. PayloadPool: a buffer is handed out again only
once nothing else refers to it, and the pool keeps no more than its limit."""

from __future__ import annotations

import struct
import threading

from hypothesis import given
from hypothesis import strategies as st

from deltavol.nbd.buffer import COMPACT_AT, POOL_SIZES, PayloadPool, ReceiveBuffer

U32 = struct.Struct(">I")


@given(
    data=st.binary(min_size=0, max_size=2000),
    feeds=st.lists(st.integers(1, 300), max_size=40),
    takes=st.lists(st.integers(0, 300), max_size=40),
)
def test_bytes_come_out_in_order_whatever_the_pieces(data: bytes, feeds: list[int], takes: list[int]) -> None:
    rx = ReceiveBuffer()
    out = bytearray()
    pos = 0
    for i, size in enumerate(feeds):
        rx.feed(data[pos : pos + size])
        pos += size
        want = takes[i] if i < len(takes) else 0
        got = rx.take(want)
        if want > len(rx) + (len(got) if got is not None else 0):
            assert got is None
        if got is not None:
            assert len(got) == want
            out += got
    rx.feed(data[pos:])
    rest = rx.take(len(rx))
    assert rest is not None
    assert bytes(out + rest) == data
    assert len(rx) == 0


def test_peek_does_not_consume_and_needs_the_whole_layout() -> None:
    rx = ReceiveBuffer()
    rx.feed(b"\x00\x00\x01")
    assert rx.peek(U32) is None
    rx.feed(b"\x02\xff")
    assert rx.peek(U32) == (0x102,)
    assert len(rx) == 5
    rx.skip(4)
    assert rx.take(1) == b"\xff" and len(rx) == 0


def test_take_into_copies_into_the_target_or_consumes_nothing() -> None:
    rx = ReceiveBuffer()
    rx.feed(b"abcdef")
    target = bytearray(8)
    assert rx.take_into(target, 2, 7) is False and len(rx) == 6
    assert rx.take_into(target, 2, 4) is True
    assert target == bytearray(b"\0\0abcd\0\0") and rx.take(2) == b"ef"


def test_skip_never_goes_past_what_is_buffered() -> None:
    rx = ReceiveBuffer()
    rx.feed(b"abc")
    rx.skip(10)
    assert len(rx) == 0
    rx.feed(b"xy")
    assert rx.take(2) == b"xy"


def test_consumed_bytes_are_dropped_when_never_fully_drained() -> None:
    rx = ReceiveBuffer()
    piece = bytes(range(256)) * 16  # 4 KiB
    rx.feed(b"!")  # one byte always left over: the buffer is never empty between feeds
    for _ in range(4 * COMPACT_AT // len(piece)):
        rx.feed(piece)
        assert rx.take(len(piece)) is not None
    assert rx.held <= COMPACT_AT + 2 * len(piece)
    assert rx.take(1) == b"\xff"


def test_take_after_a_header_consumes_both_or_nothing() -> None:
    rx = ReceiveBuffer()
    rx.feed(b"HDRpay")
    assert rx.take(4, skip=3) is None and len(rx) == 6
    assert rx.take(3, skip=3) == b"pay" and len(rx) == 0
    rx.feed(b"HDR")
    assert rx.take(0, skip=3) == b"" and len(rx) == 0


def test_a_payload_buffer_comes_back_only_once_nothing_holds_it() -> None:
    pool = PayloadPool(8 << 20)
    assert len(pool.get(1 << 20)) == 1 << 20 and pool.held == 0  # a size seen once: not kept
    first = pool.get(1 << 20)
    second = pool.get(1 << 20)
    assert second is not first  # still held
    first_id = id(first)
    view = memoryview(first)[100:]  # a transport's view, a job's buffer export: held still
    del first
    third = pool.get(1 << 20)
    assert id(third) != first_id
    view.release()
    del view, second, third
    again = pool.get(1 << 20)
    assert id(again) == first_id  # nothing refers to it now: reused, not allocated
    assert len(again) == 1 << 20 and pool.held == 3 << 20
    assert len(pool.get(4096)) == 4096  # exact sizes only


def test_a_buffer_a_worker_thread_writes_from_is_not_handed_out() -> None:
    pool = PayloadPool(8 << 20)
    pool.get(1 << 20)  # the size is asked for before: kept from now on
    buf = pool.get(1 << 20)
    started, release = threading.Event(), threading.Event()

    def pwrite(data: memoryview) -> None:  # as a lane's job: holds the buffer until done
        started.set()
        release.wait(5)

    worker = threading.Thread(target=pwrite, args=(memoryview(buf),))
    worker.start()
    started.wait(5)
    buf_id = id(buf)
    del buf
    assert id(pool.get(1 << 20)) != buf_id
    release.set()
    worker.join(5)
    assert id(pool.get(1 << 20)) == buf_id


def test_the_pool_keeps_at_most_its_limit_letting_free_buffers_go_first() -> None:
    pool = PayloadPool(4 << 20)
    pool.get(1 << 20)
    held = [pool.get(1 << 20) for _ in range(4)]
    assert pool.held == 4 << 20
    extra = pool.get(1 << 20)  # full, nothing free: a buffer the pool does not keep
    assert len(extra) == 1 << 20 and pool.held == 4 << 20
    del extra
    assert all(pool.get(1 << 20) is not b for b in held) and pool.held == 4 << 20
    del held[:3]  # three free buffers of 1 MiB
    pool.get(2 << 20)
    big = pool.get(2 << 20)  # two of them go to make room
    assert len(big) == 2 << 20 and pool.held == 4 << 20


def test_a_full_pool_lets_the_sizes_asked_for_least_recently_go_first() -> None:
    pool = PayloadPool(4 << 20)
    pool.get(1 << 20)
    old, recent = pool.get(1 << 20), pool.get(1 << 20)  # 1 MiB: asked for first
    pool.get(512 << 10)
    small = [pool.get(512 << 10) for _ in range(2)]  # 512 KiB: more recently
    del old, recent, small
    kept = id(pool.get(512 << 10))  # a free one reused, nothing made
    assert pool.held == 3 << 20
    pool.get(2 << 20)
    pool.get(2 << 20)  # full: a 1 MiB one goes (asked for least recently), not a 512 KiB one
    assert pool.held == 4 << 20
    assert id(pool.get(512 << 10)) == kept
    for size in range(100_000, 100_050):  # ever new sizes, each asked for twice: each fits
        pool.get(size)  # by letting free ones go
        assert len(pool.get(size)) == size and pool.held <= 4 << 20
    assert pool.held > 3 << 20


def test_sizes_asked_for_once_are_not_kept_nor_remembered_for_ever() -> None:
    pool = PayloadPool(4 << 20)
    for size in range(65536, 65536 + 10 * POOL_SIZES):  # each once: none kept
        assert len(pool.get(size)) == size
    assert pool.held == 0 and len(pool._sizes) <= POOL_SIZES
    pool.get(65536 + 10 * POOL_SIZES - 1)  # the last one, again: kept now
    assert pool.held == 65536 + 10 * POOL_SIZES - 1

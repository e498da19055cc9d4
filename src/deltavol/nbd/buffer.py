"""The receive buffer both sides parse from.

Bytes are appended at the end and consumed from a read position, so taking a header
costs no memmove of what follows (a 32 MiB WRITE arrives in hundreds of pieces, and a
structured READ reply in many chunks). Consumed bytes are dropped when everything was
consumed, or once ``COMPACT_AT`` of them sit at the front, whichever comes first.
"""

from __future__ import annotations

import struct
from typing import Any

COMPACT_AT = 1 << 20


class ReceiveBuffer:
    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def __len__(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buf) - self._pos

    @property
    def held(self) -> int:
        """Bytes in memory: not yet consumed, and consumed but not yet dropped."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        pos = self._pos
        if pos and (pos == len(self._buf) or pos >= COMPACT_AT):
            del self._buf[:pos]
            self._pos = 0
        self._buf += data

    def clear(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def peek(self, layout: struct.Struct) -> tuple[Any, ...] | None:
        """``layout`` unpacked at the read position without consuming it, or None when
        fewer bytes than it needs are buffered."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < layout.size:
            return None
        return layout.unpack_from(buf, pos)

    def skip(self, n: int) -> None:
        """Consume ``n`` bytes (at most what is buffered)."""
        self._pos += min(n, len(self._buf) - self._pos)

    def take(self, n: int, skip: int = 0) -> bytes | None:
        """The ``n`` bytes after the next ``skip`` (a header already peeked at), all
        consumed; None (nothing consumed) if fewer than ``skip + n`` are buffered."""
        start = self._pos + skip
        if len(self._buf) - start < n:
            return None
        with memoryview(self._buf) as view:  # one copy, not two (a slice, then bytes())
            chunk = bytes(view[start : start + n])
        self._pos = start + n
        return chunk

    def take_into(self, target: bytearray, at: int, n: int) -> bool:
        """Copy the next ``n`` bytes into ``target[at:at + n]`` and consume them; False
        (nothing consumed) if fewer are buffered."""
        if len(self._buf) - self._pos < n:
            return False
        with memoryview(self._buf) as view:
            target[at : at + n] = view[self._pos : self._pos + n]
        self._pos += n
        return True

"""``--max-rate``: a token bucket the copy engine draws from before each request."""

from __future__ import annotations

import asyncio
import time


class Throttle:
    def __init__(self, rate: int | None, burst: float = 0.25) -> None:
        self.rate = rate  # bytes per second; None = unlimited
        self._burst = burst
        self._tokens = 0.0
        self._last = time.monotonic()

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        cap = max(self.rate * self._burst, n)
        self._tokens = min(cap, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)

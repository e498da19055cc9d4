"""Whether the update under way has begun writing its target: a restore may take it back
until it has.

Design notes
------------
* An incremental update that starts from an idle, consistent session leaves its target at
  the session's point in time until its first write there: its copy's, or a
  copy-before-write's. Until then the update can be cancelled with nothing lost, and the
  target is still that point in time (``restore.py`` uses this).
* Every connection the session opens to its target is watched (``TargetWrites.watch``): a
  write or a zero says so (``begin``) before it is issued, so a write in flight counts as
  written, whether it lands or not.
* ``claim`` checks and shuts in one step of the loop (no await): either a write has begun,
  or none ever will until ``release`` or the next update (``started``). A write refused
  that way raises ``TargetClaimed``: the update is being stopped then, not failed (its
  copy task ends without a failure; a copy-before-write gives the mark up without
  touching the target or its connection, which is the restore's).
* What a restart cannot know it does not assume: after one, ``untouched`` is False until
  the next update starts.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from deltavol.copy.targets import CopyTarget
from deltavol.errors import TargetClaimed

T = TypeVar("T")


class TargetWrites:
    def __init__(self) -> None:
        self.untouched = False  # the update under way has not begun writing its target
        self.shut = False  # a restore claimed the update: no write may begin

    def started(self, untouched: bool) -> None:
        """An update starts (before its mark): ``untouched`` if its target is the point in
        time now (an idle, consistent session; never a full update)."""
        self.untouched, self.shut = untouched, False

    def begin(self, description: str) -> None:
        if self.shut:
            raise TargetClaimed(target=description)
        self.untouched = False

    def claim(self) -> bool:
        """True if no write to the target has begun; none begins from now on."""
        if not self.untouched:
            return False
        self.shut = True
        return True

    def release(self) -> None:
        """The claim is given up (the restore did not start): the update may write again."""
        self.shut = False

    def watch(self, target: CopyTarget) -> CopyTarget:
        """Make every method of ``target`` that writes (``WRITES``: data, zeroes, and a local
        volume's copies in the kernel) call ``begin`` before it is issued. Done on the
        connection itself, not on a wrapper: whoever holds it (the copier, which checks that
        the connection it wrote on is still the one kept) holds the same object.

        Fails closed: a target with a public coroutine method that is in neither
        ``WRITES`` nor ``READS`` is refused (``TypeError``, a bug), so that a new way of
        writing a target cannot escape the watch unseen."""
        unknown = sorted(
            name
            for name in dir(target)
            if not name.startswith("_")
            and name not in WRITES
            and name not in READS
            and inspect.iscoroutinefunction(inspect.getattr_static(target, name, None))
        )
        if unknown:
            raise TypeError(
                f"target {target.description}: {type(target).__name__} has coroutine methods "
                f"{', '.join(unknown)} that target_writes does not know: list each in WRITES "
                "(it writes the target) or READS (it never does)"
            )
        for name in WRITES:
            method = getattr(target, name, None)
            if method is not None:
                setattr(target, name, self._watched(target, method))
        return target

    def _watched(
        self,
        target: CopyTarget,
        method: Callable[..., Awaitable[T]],
    ) -> Callable[..., Awaitable[T]]:
        async def watched(*args: Any, **kwargs: Any) -> T:
            self.begin(target.description)
            return await method(*args, **kwargs)

        return watched


WRITES = ("pwrite", "zero", "trim", "copy_from", "copy_spans", "zero_spans")  # every way a target is written
# what a target may also have, none of which writes it (``watch`` refuses any other):
# ``written`` and ``drain`` only start the writeback of, or wait for, writes made by the above
READS = ("pread", "flush", "close", "open", "extents", "cache", "block_status", "written", "drain")

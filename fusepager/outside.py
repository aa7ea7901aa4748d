"""Copies of an object's bytes held outside the EMM protocol: Linux's page cache of `data`.

The engine decides who may write a byte range by the protocol: one kernel with write access,
or any number of readers.  Linux is a holder of copies too (pages of `data` it read through
the mount, pages a program has mmapped and may be dirtying), but it is no kernel: it is never
asked for its pages, it gives them back only when it is told to drop them (FUSE's inode
invalidation, which writes dirty pages back first), and it writes a dirty page back whole,
with every byte as it was when Linux read the page.  So a kernel may be granted write access
to a range only once Linux holds no copy of it: otherwise Linux's older copy, written back
later, would undo what the kernel wrote and was told was done.

`OutsideCopies` is what the engine (`Pager.outside`) asks: may a range be held outside, and
make the outside let it go.  `PageCacheCopies` is the mount's answer for one `data` file: it
notes every range Linux reads (or writes) through its cache, and forgets a range once an
invalidation of the inode that started after the note has completed (an invalidation drops
the whole inode: pages read later are noted again).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

log = logging.getLogger("fusepager.outside")


class OutsideCopies(Protocol):
    """Another holder of copies of an object's bytes, outside the protocol (for the mount:
    Linux's page cache).  The engine grants no kernel write access over a range while
    `may_hold` says copies of it may be out there; it has them released first."""

    def may_hold(self, offset: int, length: int) -> bool:
        """Whether a copy of any byte of [offset, offset+length) may be held outside."""
        ...

    async def release(self, offset: int, length: int) -> None:
        """Until no copy of the range is held outside: changed ones written back (through the
        mount's own write path), all dropped."""
        ...


class Runs:
    """A set of bytes as sorted, disjoint, non-adjacent [start, end) runs: adding and asking
    cost a binary search (a program touching a large mapping page by page makes many runs)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self):
        return iter(zip(self._starts, self._ends))

    def __repr__(self) -> str:
        return f"Runs({list(self)})"

    def add(self, start: int, end: int) -> None:
        first = bisect.bisect_left(self._ends, start)  # the first run ending at or after start
        past = bisect.bisect_right(self._starts, end)  # the runs from first to here touch it
        if first < past:
            start = min(start, self._starts[first])
            end = max(end, self._ends[past - 1])
        self._starts[first:past] = [start]
        self._ends[first:past] = [end]

    def overlaps(self, start: int, end: int | None) -> bool:
        """Whether any byte of [start, end) is in the set (end None: to the end)."""
        index = bisect.bisect_right(self._ends, start)  # the first run ending after start
        return index < len(self._starts) and (end is None or self._starts[index] < end)


class PageCacheCopies:
    """The ranges of one `data` file Linux may hold in its page cache, and their release.

    `note` is called when Linux gets the bytes of a range through a cached handle: a read, or a
    write that puts the written bytes in cached pages.  It must be called when the store is
    read (or written) for it, in the engine's line for the range (inside `read_through` and
    `write_through`): then a grant decided while the engine holds the range sees every copy
    made before it, and no copy can be made while it holds it.

    `drop` invalidates the inode in Linux (a blocking FUSE notification, run in a thread: it
    waits for the dirty pages' write-backs, which this loop serves).  One drop runs at a time.
    A drop that completes forgets the ranges noted before it started: Linux had every page of
    them in its cache by then (a FUSE read comes from a page already in the cache, locked until
    the read is answered; a written page is there before the write is sent), so the drop found
    and dropped them.  Ranges noted after it started are kept for the next drop."""

    def __init__(self, drop: Callable[[], Awaitable[None]], spawn: Callable[..., None]) -> None:
        self._drop = drop
        self._spawn = spawn
        self._started = 0  # drops started so far; a note made now is stamped with it
        self._noted: dict[int, Runs] = {}  # stamp -> the ranges noted with it
        self._under_way: trio.Event | None = None  # set when the drop under way ends
        # Changes to the object (by kernels, or by writes that went around the cache) and how
        # many of them a completed drop has caught up with: Linux's pages are current when
        # the two are equal (`current`).
        self._changes = 0
        self._caught_up = 0
        self._catching_up = False
        self.drops = 0  # drops completed (for tests and the curious)

    def __repr__(self) -> str:
        return f"<page cache copies {self._noted} drops={self.drops}>"

    # -- what Linux holds --------------------------------------------------------------------

    def note(self, offset: int, length: int) -> None:
        """Linux may hold a copy of [offset, offset+length) from now on."""
        if length <= 0:
            return
        runs = self._noted.get(self._started)
        if runs is None:
            runs = self._noted[self._started] = Runs()
        runs.add(offset, offset + length)

    def may_hold(self, offset: int = 0, length: int | None = None) -> bool:
        """Whether Linux may hold a copy of any byte of the range (of anything, by default)."""
        if not self._noted:
            return False
        end = None if length is None else offset + length
        return any(runs.overlaps(offset, end) for runs in self._noted.values())

    @property
    def current(self) -> bool:
        """Whether Linux's pages, if any, are as the object is: every change made to it has been
        followed by a completed drop (or there was nothing to drop).  The mount keeps Linux's
        cache at an open only then."""
        return self._caught_up == self._changes

    @property
    def dropping(self) -> bool:
        """Whether a drop is under way: Linux waits for this loop to serve its write-backs."""
        return self._under_way is not None

    async def quiet(self) -> None:
        """Until no drop is under way.  The mount must keep serving Linux until then: a drop
        left waiting for a write-back nobody serves never ends, and neither do the daemon's
        thread and the program whose pages it writes back."""
        while self._under_way is not None:
            await self._under_way.wait()

    # -- making Linux let go -----------------------------------------------------------------

    async def release(self, offset: int, length: int) -> None:
        """Until Linux holds no copy of the range noted before this call: its dirty pages
        written back (they arrive as writes of `data`, in the engine's line: the caller must not
        hold its place in line over the range meanwhile) and every page dropped."""
        while self.may_hold(offset, length):
            await self._drop_once()

    def changed(self) -> None:
        """The object's bytes changed behind Linux's cache (a kernel returned pages or was given
        write access, or a write went around the cache): whatever Linux holds is dropped, in
        the background, so a program that has `data` mmapped sees the change at its next
        touch.  With nothing held, nothing is started."""
        self._changes += 1
        if not self._noted:
            self._caught_up = self._changes  # nothing held: nothing can be out of date
            return
        if not self._catching_up:
            self._catching_up = True
            self._spawn(self._catch_up)

    async def _catch_up(self) -> None:
        try:
            while not self.current:
                if not self._noted:
                    self._caught_up = self._changes
                    break
                await self._drop_once()
        finally:
            self._catching_up = False

    async def _drop_once(self) -> None:
        """One drop that starts now, or, if one is under way, the end of that one (which may
        not cover what the caller needs: callers loop on what they need)."""
        if self._under_way is not None:
            await self._under_way.wait()
            return
        ended = self._under_way = trio.Event()
        self._started += 1
        stamp, changes = self._started, self._changes
        try:
            await self._drop()
            # Only what was noted before this drop started is gone; later notes stay.
            self._noted = {noted: runs for noted, runs in self._noted.items() if noted >= stamp}
            self._caught_up = max(self._caught_up, changes)
            self.drops += 1
        finally:
            self._under_way = None
            ended.set()

"""Resident pages and the kernel's bounded physical memory (GNU Mach's vm_page.h, vm_resident.c).

A page frame belongs to one VM object at one offset.  While the manager has not answered a
request for it, it is `absent` (busy, no data yet); faults that want it wait on it.  A manager
may lock it against some accesses (`page_lock`), mark it `precious`, or fail it (`error`).
The kernel's memory is a fixed number of frames; `ResidentMemory` hands them out and keeps them
in least-recently-used order for the pageout code to choose from.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import TYPE_CHECKING

import trio

from .interface import VM_PROT_NONE

if TYPE_CHECKING:
    from .vm_object import VMObject


class Page:
    __slots__ = (
        "object",
        "offset",
        "data",
        "absent",
        "error",
        "dirty",
        "precious",
        "page_lock",
        "unlock_request",
        "ahead",
        "_waiters",
    )

    def __init__(self, object: VMObject, offset: int, absent: bool = False) -> None:
        self.object = object
        self.offset = offset
        self.data: bytearray | None = None
        self.absent = absent
        self.error: int | None = None
        self.dirty = False
        self.precious = False
        self.page_lock = VM_PROT_NONE
        self.unlock_request = VM_PROT_NONE
        # A read-ahead mark: the first page of a cluster read ahead holds the offset of the next
        # cluster to read ahead, which a read that reaches the page asks for (vm_fault).
        self.ahead: int | None = None
        self._waiters: trio.Event | None = None

    def __repr__(self) -> str:
        flags = "".join(
            flag
            for flag, on in (("A", self.absent), ("D", self.dirty), ("P", self.precious), ("E", self.error is not None))
            if on
        )
        return f"<page {self.offset:#x} of {self.object!r} {flags} lock={self.page_lock}>"

    async def wait(self) -> None:
        """Sleep until the page changes state (PAGE_ASSERT_WAIT)."""
        if self._waiters is None:
            self._waiters = trio.Event()
        await self._waiters.wait()

    def wakeup(self) -> None:
        """Wake every fault waiting on this page (PAGE_WAKEUP_DONE)."""
        if self._waiters is not None:
            self._waiters.set()
            self._waiters = None

    def fill(self, data: bytes | bytearray | memoryview, lock_value: int, precious: bool) -> None:
        self.fill_quietly(data, lock_value, precious)
        self.object.kernel.resident.changed()

    def fill_quietly(self, data: bytes | bytearray | memoryview, lock_value: int, precious: bool) -> None:
        """`fill` without telling the memory waiters: a caller filling many pages at once calls
        `ResidentMemory.changed()` once when it is done."""
        self.data = bytearray(data)
        self.absent = False
        self.dirty = False
        self.precious = precious
        self.page_lock = lock_value
        self.unlock_request = VM_PROT_NONE
        waiters = self._waiters
        if waiters is not None:
            self._waiters = None
            waiters.set()


class ResidentMemory:
    """The kernel's page frames: at most `limit` pages resident at once, in LRU order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lru: OrderedDict[Page, None] = OrderedDict()
        self.peak = 0  # the most pages ever resident at once
        self._waiting = trio.lowlevel.ParkingLot()
        # The pageout daemon's marks: it wakes below `low_water` free frames and evicts until
        # `high_water` are free.
        self.low_water = max(1, limit // 32)
        self.high_water = max(2, limit // 16) if limit > 2 else 1
        self._pageout = trio.lowlevel.ParkingLot()

    @property
    def count(self) -> int:
        return len(self._lru)

    @property
    def free(self) -> int:
        return self.limit - len(self._lru)

    def insert(self, page: Page) -> None:
        if len(self._lru) >= self.limit:
            raise AssertionError("page inserted beyond the memory limit; pageout must make room first")
        self._lru[page] = None
        if len(self._lru) > self.peak:
            self.peak = len(self._lru)
        if self.limit - len(self._lru) < self.low_water and self._pageout:
            self._pageout.unpark()

    def insert_many(self, pages: list[Page]) -> None:
        """`insert` for several pages at once (in this order, the last most recently used)."""
        lru = self._lru
        if len(lru) + len(pages) > self.limit:
            raise AssertionError("page inserted beyond the memory limit; pageout must make room first")
        lru.update(dict.fromkeys(pages))
        self.peak = max(self.peak, len(lru))
        if self.limit - len(lru) < self.low_water and self._pageout:
            self._pageout.unpark()

    def remove(self, page: Page) -> None:
        if page in self._lru:
            del self._lru[page]
            self.changed()

    def changed(self) -> None:
        """A frame was freed or became reclaimable: faults waiting for memory retry."""
        if self._waiting:
            self._waiting.unpark_all()

    async def wait_for_change(self) -> None:
        await self._waiting.park()

    async def wait_for_pageout(self) -> None:
        """Until free frames fall below the low-water mark."""
        while self.free >= self.low_water:
            await self._pageout.park()

    def any_absent(self) -> bool:
        return any(page.absent for page in self._lru)

    def touch(self, page: Page) -> None:
        if page in self._lru:
            self._lru.move_to_end(page)

    def touch_all(self, pages: list[Page]) -> None:
        """`touch` each page in turn."""
        lru = self._lru
        move_to_end = lru.move_to_end
        for page in pages:
            if page in lru:
                move_to_end(page)

    def oldest(self, n: int) -> list[Page]:
        """Up to `n` pages, least recently used first."""
        return list(itertools.islice(self._lru, n))

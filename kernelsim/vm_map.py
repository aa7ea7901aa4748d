"""Task address maps (GNU Mach's vm/vm_map.c).

A map is a sorted list of entries; each entry maps [start, end) to a VM object from `offset`,
with a current and a maximum protection and an inheritance.  Operations on a range first clip
the entries at the range's ends, so each entry is either wholly in or wholly out of it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .interface import KernInvalidArgument, KernNoSpace

if TYPE_CHECKING:
    from .kernel import Kernel
    from .vm_object import VMObject

VM_MIN_ADDRESS = 0x10000
VM_MAX_ADDRESS = 1 << 47


@dataclass(slots=True)
class MapEntry:
    start: int
    end: int
    object: VMObject
    offset: int
    protection: int
    max_protection: int
    inheritance: int
    is_shared: bool = False
    """Shared with another task by VM_INHERIT_SHARE (what vm_region reports as shared)."""

    @property
    def size(self) -> int:
        return self.end - self.start

    def object_offset(self, address: int) -> int:
        return self.offset + (address - self.start)


class VMMap:
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.entries: list[MapEntry] = []
        self._starts: list[int] = []

    def __iter__(self):
        return iter(self.entries)

    def lookup(self, address: int) -> MapEntry | None:
        index = bisect.bisect_right(self._starts, address) - 1
        if index >= 0:
            entry = self.entries[index]
            if address < entry.end:
                return entry
        return None

    def next_entry(self, address: int) -> MapEntry | None:
        """The entry holding `address`, else the first one above it (vm_region's search)."""
        index = bisect.bisect_right(self._starts, address) - 1
        if index >= 0 and address < self.entries[index].end:
            return self.entries[index]
        index += 1
        return self.entries[index] if index < len(self.entries) else None

    def find_space(self, size: int, mask: int = 0) -> int:
        """The lowest free range of `size` bytes whose start has no bit of `mask` set."""
        candidate = VM_MIN_ADDRESS
        for entry in [*self.entries, None]:
            candidate = (candidate + mask) & ~mask
            limit = entry.start if entry is not None else VM_MAX_ADDRESS
            if candidate + size <= limit:
                return candidate
            if entry is not None:
                candidate = max(candidate, entry.end)
        raise KernNoSpace(None, size)

    def is_free(self, start: int, end: int) -> bool:
        if start < VM_MIN_ADDRESS or end > VM_MAX_ADDRESS:
            return False
        entry = self.next_entry(start)
        return entry is None or entry.start >= end

    def insert(self, entry: MapEntry) -> None:
        index = bisect.bisect_left(self._starts, entry.start)
        self.entries.insert(index, entry)
        self._starts.insert(index, entry.start)

    def _clip_at(self, address: int) -> None:
        entry = self.lookup(address)
        if entry is None or entry.start == address:
            return
        tail = MapEntry(
            start=address,
            end=entry.end,
            object=entry.object,
            offset=entry.object_offset(address),
            protection=entry.protection,
            max_protection=entry.max_protection,
            inheritance=entry.inheritance,
            is_shared=entry.is_shared,
        )
        entry.end = address
        self.kernel.objects.reference(entry.object)
        self.insert(tail)

    def clip(self, start: int, end: int) -> list[MapEntry]:
        """The entries inside [start, end), split so that none crosses either end."""
        self._check_range(start, end)
        self._clip_at(start)
        self._clip_at(end)
        low = bisect.bisect_left(self._starts, start)
        high = bisect.bisect_left(self._starts, end)
        return self.entries[low:high]

    def remove(self, start: int, end: int) -> list[MapEntry]:
        """Unmap [start, end); returns the removed entries (whose object references the caller
        drops)."""
        inside = self.clip(start, end)
        if inside:
            low = self.entries.index(inside[0])
            del self.entries[low : low + len(inside)]
            del self._starts[low : low + len(inside)]
        return inside

    def _check_range(self, start: int, end: int) -> None:
        if start > end or start < 0 or end > VM_MAX_ADDRESS:
            raise KernInvalidArgument(f"bad address range [{start:#x}, {end:#x})", start=start, end=end)

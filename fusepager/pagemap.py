"""What one kernel holds of one object: a page at a time, in that kernel's page size.

The engine records every grant it makes (data_supply: read, or read and write) and forgets a
page when the kernel gives it back for good (data_return without kernel_copy, a flush, a
terminate).  `write` access means the kernel may have changed the page since the manager last
saw it: that is what a clean must fetch back.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby

from kernelsim.interface import VM_PROT_READ, VM_PROT_WRITE, prot_str


@dataclass(slots=True)
class PageGrant:
    access: int
    precious: bool = False


class Pagemap:
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._pages: dict[int, PageGrant] = {}

    def __len__(self) -> int:
        return len(self._pages)

    def _offsets(self, offset: int, length: int) -> range:
        start = offset - offset % self.page_size
        return range(start, offset + length, self.page_size)

    def held(self, offset: int, length: int) -> list[int]:
        """The held page offsets within [offset, offset+length), in order."""
        offsets = self._offsets(offset, length)
        if len(offsets) <= len(self._pages):
            return [o for o in offsets if o in self._pages]
        end = offset + length
        return sorted(o for o in self._pages if o + self.page_size > offset and o < end)

    def holds(self, offset: int, length: int) -> bool:
        """Whether any page of [offset, offset+length) is held (`held`, without the list)."""
        pages = self._pages
        if not pages:
            return False
        offsets = self._offsets(offset, length)
        if len(offsets) <= len(pages):
            return any(o in pages for o in offsets)
        end = offset + length
        return any(o + self.page_size > offset and o < end for o in pages)

    def any_writable(self, offset: int, length: int) -> bool:
        """Whether any held page of [offset, offset+length) may have been written (`writable`,
        without the list)."""
        pages = self._pages
        if not pages:
            return False
        offsets = self._offsets(offset, length)
        if len(offsets) <= len(pages):
            for o in offsets:
                grant = pages.get(o)
                if grant is not None and grant.access & VM_PROT_WRITE:
                    return True
            return False
        end = offset + length
        return any(o + self.page_size > offset and o < end and grant.access & VM_PROT_WRITE for o, grant in pages.items())

    def grant(self, offset: int, length: int, access: int, precious: bool = False) -> None:
        for page in self._offsets(offset, length):
            self._pages[page] = PageGrant(access | VM_PROT_READ, precious)

    def set_access(self, offset: int, length: int, access: int) -> None:
        """Change the access of pages already held (an unlock or a write-protect)."""
        for page in self.held(offset, length):
            self._pages[page].access = access | VM_PROT_READ

    def restrict(self, offset: int, length: int, lock_value: int) -> None:
        """Take `lock_value` accesses away from held pages (a lock request's lock)."""
        for page in self.held(offset, length):
            grant = self._pages[page]
            grant.access = (grant.access & ~lock_value) | VM_PROT_READ

    def end(self) -> int:
        """The end of the highest page held, 0 when none is."""
        return max(self._pages) + self.page_size if self._pages else 0

    def remove(self, offset: int, length: int) -> None:
        for page in self.held(offset, length):
            del self._pages[page]

    def writable(self, offset: int = 0, length: int | None = None) -> list[int]:
        """Held pages the kernel may have written."""
        pages = self._pages if length is None else {o: self._pages[o] for o in self.held(offset, length)}
        return sorted(o for o, grant in pages.items() if grant.access & VM_PROT_WRITE)

    def get(self, offset: int) -> PageGrant | None:
        return self._pages.get(offset - offset % self.page_size)

    def ranges(self) -> list[tuple[int, int, int, bool]]:
        """Runs of adjacent pages with the same access and flags: (offset, length, access, precious)."""
        result = []
        ordered = sorted(self._pages.items())
        page_size = self.page_size

        def key(item: tuple[int, tuple[int, PageGrant]]) -> tuple[int, int, bool]:
            index, (offset, grant) = item
            return offset - index * page_size, grant.access, grant.precious

        for (_, access, precious), run in groupby(enumerate(ordered), key=key):
            pages = [offset for _, (offset, _) in run]
            result.append((pages[0], len(pages) * page_size, access, precious))
        return result

    def render(self) -> str:
        """The `pages` file: OFFSET LENGTH ACCESS FLAGS, one line per run."""
        lines = []
        for offset, length, access, precious in self.ranges():
            flags = ",".join(flag for flag, on in (("dirty", access & VM_PROT_WRITE), ("precious", precious)) if on)
            lines.append(f"{offset:#x} {length} {prot_str(access)} {flags or '-'}\n")
        return "".join(lines)

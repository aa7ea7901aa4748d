"""Where a COPY_CALL copy keeps its own pages.

When a kernel copies part of an object whose strategy is MEMORY_OBJECT_COPY_CALL, it sends
memory_object_copy with a new memory object, and the manager promises that the copy keeps the
range's contents as of the copy.  The engine keeps that promise lazily: before any change to the
original in the range, it saves the old pages in the copy's `CopyStore` (a snapshot); the copy
object is served from there, and from the original for pages never changed since.  Pages the
copy's own kernel returns are kept there too.

Offsets in a CopyStore are relative to the start of the copied range, in whole pages of the
copy's kernel.
"""

from __future__ import annotations


class CopyStore:
    """A copy's own pages.  `held` is the set of page offsets it has."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.held: set[int] = set()

    async def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    async def write(self, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        """The copy ended: forget it all."""


class MemoryCopyStore(CopyStore):
    """A CopyStore in memory: what the engine uses when the author offers nothing better."""

    def __init__(self, page_size: int) -> None:
        super().__init__(page_size)
        self._pages: dict[int, bytes] = {}

    async def read(self, offset: int, length: int) -> bytes:
        return b"".join(self._pages.get(o, bytes(self.page_size)) for o in range(offset, offset + length, self.page_size))

    async def write(self, offset: int, data: bytes) -> None:
        for index in range(0, len(data), self.page_size):
            self._pages[offset + index] = bytes(data[index : index + self.page_size])
            self.held.add(offset + index)

    def discard(self) -> None:
        self._pages.clear()
        self.held.clear()

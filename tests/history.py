"""A history checker for concurrent writers of one byte range (pure: no I/O, no clock).

Each write is recorded with its writer, its byte range, its data (a value unique to the write),
when it began (before it was issued) and when it was acknowledged (once the writer was told it
was done: msync returned, write(2) returned, a kernel's console answered ok).  After every write
has been acknowledged, what the range holds must be, unit by unit, the value of a write that
may have come last in an order consistent with real time: a write acknowledged before another
began comes before it, so the earlier one's value may not be what remains.  Writes that
overlapped in time may land in either order.

Units are `cell` bytes (a write covers whole cells, and its data is one value repeated per
cell): with a cell of 4 bytes and a distinct 32-bit number per write, every cell names the
write that left it, so a check is exact where a byte-wide check would see values collide.
(A cell never crosses a page: page write-backs do not tear it.)
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

CELL = 4


@dataclass(frozen=True)
class Write:
    writer: str
    offset: int  # of its first byte, in the object
    data: bytes
    began: float  # before it was issued
    acked: float  # once its writer was told it was done

    @property
    def end(self) -> int:
        return self.offset + len(self.data)

    def __str__(self) -> str:
        return f"{self.writer} {self.offset:#x}+{len(self.data)} began {self.began:.6f} acked {self.acked:.6f}"


class HistoryError(AssertionError):
    """What the range holds cannot be the result of the recorded writes."""


def cell_value(write_id: int) -> bytes:
    """The 4-byte value write number `write_id` (from 1) puts in each of its cells."""
    if not 0 < write_id < 1 << 32:
        raise ValueError(f"write id {write_id} is not in 1 .. 2**32-1")
    return struct.pack("<I", write_id)


def check(writes: Iterable[Write], holds: bytes, *, offset: int = 0, cell: int = CELL, initial: bytes | None = None) -> None:
    """Check that `holds`, the bytes of [offset, offset+len(holds)) read after every write was
    acknowledged, is what the writes may have left; `initial` is what the range held before
    them (zeros by default).  Raises HistoryError naming the first cell that is wrong."""
    if offset % cell or len(holds) % cell:
        raise ValueError(f"the range {offset:#x}+{len(holds)} is not made of whole {cell}-byte cells")
    initial = bytes(len(holds)) if initial is None else initial
    if len(initial) != len(holds):
        raise ValueError(f"initial has {len(initial)} bytes for a range of {len(holds)}")
    end = offset + len(holds)
    covering: dict[int, list[Write]] = {}
    for write in writes:
        if write.offset % cell or len(write.data) % cell:
            raise ValueError(f"write {write} does not cover whole {cell}-byte cells")
        if write.acked < write.began:
            raise ValueError(f"write {write} was acknowledged before it began")
        for start in range(max(write.offset, offset), min(write.end, end), cell):
            covering.setdefault(start, []).append(write)
    for start in range(offset, end, cell):
        there = holds[start - offset : start - offset + cell]
        candidates = covering.get(start)
        if not candidates:
            if there != initial[start - offset : start - offset + cell]:
                raise HistoryError(f"cell {start:#x} holds {there.hex()}, but no write covers it and it held {initial[start - offset : start - offset + cell].hex()}")
            continue
        # A write may be last iff no write of the cell began after it was acknowledged.
        latest_begin = max(write.began for write in candidates)
        possible = [write for write in candidates if write.acked >= latest_begin]
        if any(_value(write, start, cell) == there for write in possible):
            continue
        raise HistoryError(_explain(start, there, candidates, possible, cell))


def _value(write: Write, start: int, cell: int) -> bytes:
    return write.data[start - write.offset : start - write.offset + cell]


def _explain(start: int, there: bytes, candidates: list[Write], possible: list[Write], cell: int) -> str:
    lines = [f"cell {start:#x} holds {there.hex()}, the value of none of the writes that may have come last:"]
    lines += [f"  may be last: {write} (value {_value(write, start, cell).hex()})" for write in possible]
    left = [write for write in candidates if _value(write, start, cell) == there]
    for write in left:
        later = [other for other in candidates if other.began > write.acked]
        lines.append(f"  it is the value of {write}, undone: acknowledged before {later[0] if later else '?'} began")
    if not left:
        lines.append("  and no write of this cell had that value (a torn or foreign value)")
    return "\n".join(lines)

"""Returned data the store could not take (a full disk), kept in memory until it can.

A kernel that returns dirty pages has let them go: if `write_pages` fails, these bytes exist
nowhere else.  The pager keeps them here, shows them over whatever the store has on every read,
drops what a later successful write replaces, and tries to store them again at `sync`.

Byte ranges, not pages: kernels with different page sizes and the mount's byte-wise writes
overlap them freely.  Each run remembers the page size of the kernel that returned it, so a
retry can hand `write_pages` whole pages again (`Unstored.pages`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class _Run:
    start: int
    data: bytes
    page_size: int

    @property
    def end(self) -> int:
        return self.start + len(self.data)


class Unstored:
    """Disjoint byte runs, sorted by offset; a later `keep` replaces what it overlaps."""

    def __init__(self) -> None:
        self._runs: list[_Run] = []

    def __bool__(self) -> bool:
        return bool(self._runs)

    def __len__(self) -> int:
        """How many bytes are kept."""
        return sum(len(run.data) for run in self._runs)

    def keep(self, offset: int, data: bytes, page_size: int) -> None:
        if not data:
            return
        self.discard(offset, len(data))
        self._runs.append(_Run(offset, bytes(data), page_size))
        self._runs.sort(key=lambda run: run.start)

    def discard(self, offset: int, length: int) -> None:
        """Forget [offset, offset+length): the store now has newer bytes there."""
        end = offset + length
        if not self._runs or length <= 0:
            return
        runs = []
        for run in self._runs:
            if run.end <= offset or end <= run.start:
                runs.append(run)
                continue
            if run.start < offset:
                runs.append(_Run(run.start, run.data[: offset - run.start], run.page_size))
            if end < run.end:
                runs.append(_Run(end, run.data[end - run.start :], run.page_size))
        self._runs = runs

    def overlaps(self, offset: int, length: int) -> bool:
        end = offset + length
        return any(run.start < end and offset < run.end for run in self._runs)

    def overlay(self, offset: int, length: int, data: bytes | None) -> bytes | None:
        """What a read of [offset, offset+length) must give: the store's `data` (None: a hole,
        which stays one unless kept bytes fall in it) with the kept bytes over it."""
        if not self._runs:
            return data
        end = offset + length
        runs = [run for run in self._runs if run.start < end and offset < run.end]
        if not runs:
            return data
        result = bytearray(data if data is not None else bytes(length))
        for run in runs:
            low, high = max(offset, run.start), min(end, run.end)
            result[low - offset : high - offset] = run.data[low - run.start : high - run.start]
        return bytes(result)

    def pages(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        """The ranges to store again, each run rounded out to whole pages of its kernel, merged
        where they meet: (offset, length) for those that overlap [offset, offset+length)."""
        end = None if length is None else offset + length
        rounded = sorted(
            (run.start - run.start % run.page_size, -(-run.end // run.page_size) * run.page_size)
            for run in self._runs
            if end is None or (run.start < end and offset < run.end)
        )
        merged: list[tuple[int, int]] = []
        for low, high in rounded:
            if merged and low <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            else:
                merged.append((low, high))
        for low, high in merged:
            yield low, high - low

    def end(self) -> int:
        """Where the last kept byte ends (0: nothing kept)."""
        return max((run.end for run in self._runs), default=0)

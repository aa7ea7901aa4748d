"""Keeping I/O on overlapping byte ranges in the order the messages came.

The engine takes messages off an object port in seqno order but does their I/O concurrently, so
a slow read does not hold up the rest.  Where two operations touch the same bytes, the later one
must still see the earlier one's effect: a data_request after a data_return of the same page
must read what was returned.  Each operation reserves its range when its message is taken (in
seqno order) and, before its I/O, waits for the earlier reservations it conflicts with.  Reads
conflict only with writes; writes conflict with everything.
"""

from __future__ import annotations

from types import TracebackType

import trio


class Reservation:
    __slots__ = ("offset", "end", "exclusive", "_done", "_before", "_sequencer")

    def __init__(self, sequencer: RangeSequencer, offset: int, length: int, exclusive: bool, before: list[Reservation]) -> None:
        self._sequencer = sequencer
        self.offset = offset
        self.end = offset + length
        self.exclusive = exclusive
        self._before = before
        self._done = trio.Event()

    async def __aenter__(self) -> Reservation:
        for earlier in self._before:
            await earlier._done.wait()
        self._before = []
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def release(self) -> None:
        if not self._done.is_set():
            self._done.set()
            self._sequencer._active.remove(self)


class RangeSequencer:
    def __init__(self) -> None:
        self._active: list[Reservation] = []

    def reserve(self, offset: int, length: int, *, exclusive: bool) -> Reservation:
        """Take a place in line for [offset, offset+length); use it as `async with`."""
        end = offset + length
        before = [
            other
            for other in self._active
            if other.offset < end and offset < other.end and (exclusive or other.exclusive)
        ]
        reservation = Reservation(self, offset, length, exclusive, before)
        self._active.append(reservation)
        return reservation

    def waits(self, offset: int, length: int, *, exclusive: bool) -> bool:
        """Whether a reservation of [offset, offset+length) made now would wait for another:
        False means work that needs it can be done at once, with no place in line."""
        end = offset + length
        for other in self._active:
            if other.offset < end and offset < other.end and (exclusive or other.exclusive):
                return True
        return False

    def __len__(self) -> int:
        return len(self._active)

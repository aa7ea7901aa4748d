"""The message log and the counters the mount shows as `trace` and `stats`.

`Trace` is an endless log kept in size-capped segments (`trace_segments`): the current one
grows, and when it would pass its cap it is rotated, like logrotate's copytruncate seen from
the reader: the file shrinks to nothing and grows again, while its old lines live on as the
newest older segment (`trace.1`).  A segment is a real file of whole lines whose size and bytes
agree; a mount's store keeps them on disk (STORE/trace/), a pager without a store in memory.
`Stats` counts messages by kind and direction, bytes each way, faults served and how long
serving them took.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable

from kernelsim.messages import Message

from .trace_segments import FileSegments, MemorySegments

TRACE_SEGMENT = 16 * 1024 * 1024
"""Bytes a trace segment holds at most before it is rotated (a mount's --trace-size)."""
TRACE_KEEP = 4
"""Older segments a mount's store keeps (trace.1 ... trace.4; a mount's --trace-keep)."""
MEMORY_SEGMENT = 4 * 1024 * 1024
MEMORY_KEEP = 1
"""A trace without a store keeps its current segment and the one before, in memory."""
LINE_SEARCH = 64 * 1024
"""Bytes read at a time when looking for the start of a line."""
PENDING_MAX = 16
"""Message lines waiting to be formatted (`Trace.message`) at most; then they are formatted."""


class Trace:
    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        segment_size: int | None = None,
        keep: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """A trace in `directory` (files `trace`, `trace.1`, ...), or in memory without one."""
        if directory is None:
            self.segment_size = MEMORY_SEGMENT if segment_size is None else segment_size
            self._segments: MemorySegments | FileSegments = MemorySegments(MEMORY_KEEP if keep is None else keep)
        else:
            self.segment_size = TRACE_SEGMENT if segment_size is None else segment_size
            self._segments = FileSegments(directory, TRACE_KEEP if keep is None else keep)
        if self.segment_size < 1:
            raise ValueError(f"a trace segment must hold at least a byte, not {self.segment_size}")
        self.directory = directory
        self._clock = clock
        self.listeners: list[Callable[[str], None]] = []
        self._second = -1
        self._clock_text = ""
        # Message lines in order, their time taken, their text not made yet (`message`).
        self._pending: list[tuple[float, str, str, Message]] = []

    @property
    def generation(self) -> int:
        """The current segment's number; `generation - k` is `trace.k`'s."""
        return self._segments.generation

    @property
    def older(self) -> int:
        """How many older segments are kept (trace.1 ... trace.N)."""
        return self._segments.older

    def line(self, text: str) -> None:
        """Append one line (a message, a refusal, a note)."""
        if self._pending:
            self.flush()
        self._append(self._clock(), text)

    def message(self, source: str, destination: str, message: Message) -> None:
        """Append `source -> destination message.describe()`.  The line takes its place and its
        time now, but its text is made at the next `flush` (at the latest when the log is read,
        another line comes, or PENDING_MAX wait): a sender can send first and describe after.
        Listeners get it at once."""
        if self.listeners:
            self.line(f"{source} -> {destination} {message.describe()}")
            return
        self._pending.append((self._clock(), source, destination, message))
        if len(self._pending) >= PENDING_MAX:
            self.flush()

    def flush(self) -> None:
        """Make the text of the message lines waiting (`message`)."""
        pending, self._pending = self._pending, []
        for now, source, destination, message in pending:
            self._append(now, f"{source} -> {destination} {message.describe()}")

    def sync(self) -> None:
        """Every line so far into its segment's file (it is buffered): what the manager does
        each second, and what a read or a size of the current segment does first."""
        if self._pending:
            self.flush()
        self._segments.flush()

    def _append(self, now: float, text: str) -> None:
        second = int(now)
        if second != self._second:  # localtime and strftime once a second, not once a line
            self._second, self._clock_text = second, time.strftime("%H:%M:%S", time.localtime(now))
        stamp = f"{self._clock_text}.{int(now * 1_000_000) % 1_000_000:06d}"
        data = f"{stamp} {text}\n".encode("utf-8", "backslashreplace")
        segments = self._segments
        if segments.current_size() and segments.current_size() + len(data) > self.segment_size:
            lost = segments.rotate()  # a line never straddles two segments
            if lost:
                why = segments.failure.strerror if segments.failure is not None else "?"
                note = f"{stamp} trace: {lost} lines at the end of the last segment could not be written ({why})\n"
                segments.append(note.encode())
        segments.append(data)
        for listener in self.listeners:
            listener(text)

    def size(self, generation: int | None = None) -> int:
        """The size of a segment (the current one by default); 0 for one no longer kept."""
        self.sync()
        return self._segments.size(self.generation if generation is None else generation)

    def read(self, offset: int, size: int, generation: int | None = None) -> bytes:
        """Bytes [offset, offset+size) of a segment (the current one by default): exactly the
        bytes there, or nothing past its end or for a segment no longer kept."""
        self.sync()
        if offset < 0 or size <= 0:
            return b""
        return self._segments.read(self.generation if generation is None else generation, offset, size)

    def line_end(self, offset: int, generation: int) -> int:
        """Where the line of a segment holding byte `offset` ends (after its newline); `offset`
        itself when a line starts there or the segment has nothing there."""
        if offset == 0 or self.read(offset - 1, 1, generation) in (b"\n", b""):
            return offset
        position = offset
        while True:
            chunk = self.read(position, LINE_SEARCH, generation)
            if not chunk:
                return position
            found = chunk.find(b"\n")
            if found >= 0:
                return position + found + 1
            position += len(chunk)

    def line_start(self, offset: int) -> int | None:
        """Where the current segment's first line at or after `offset` starts; None while no
        line starts there yet."""
        size = self.size()
        if offset == 0:
            return 0 if size else None
        position = offset - 1  # a line starts at `offset` if the byte before ends one
        while position < size:
            chunk = self.read(position, LINE_SEARCH)
            found = chunk.find(b"\n")
            if found >= 0:
                start = position + found + 1
                return start if start < size else None
            position += len(chunk)
        return None

    def close(self) -> None:
        """Write what is buffered and close the current file (a later line opens it again)."""
        self.sync()
        self._segments.close()


class Stats:
    def __init__(self) -> None:
        self.messages_in: Counter[str] = Counter()
        self.messages_out: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.faults_served = 0
        self.latency_total = 0.0
        self.latency_max = 0.0
        self.refused = 0

    def received(self, message: Message) -> None:
        self.messages_in[message.mach_name] += 1
        self.bytes_in += len(getattr(message, "data", b""))

    def sent(self, message: Message) -> None:
        self.messages_out[message.mach_name] += 1
        self.bytes_out += len(getattr(message, "data", b""))

    def served(self, seconds: float) -> None:
        self.faults_served += 1
        self.latency_total += seconds
        self.latency_max = max(self.latency_max, seconds)

    def render(self, extra: dict[str, object] | None = None) -> str:
        """The `stats` file: `key value` lines."""
        lines = [f"{key} {value}" for key, value in (extra or {}).items()]
        mean = self.latency_total / self.faults_served if self.faults_served else 0.0
        lines += [
            f"faults_served {self.faults_served}",
            f"latency_mean_us {mean * 1e6:.0f}",
            f"latency_max_us {self.latency_max * 1e6:.0f}",
            f"latency_total_us {self.latency_total * 1e6:.0f}",
            f"bytes_in {self.bytes_in}",
            f"bytes_out {self.bytes_out}",
            f"refused {self.refused}",
        ]
        lines += [f"in.{name} {count}" for name, count in sorted(self.messages_in.items())]
        lines += [f"out.{name} {count}" for name, count in sorted(self.messages_out.items())]
        return "\n".join(lines) + "\n"

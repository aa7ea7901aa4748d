"""The message log and the counters the mount shows as `trace` and `stats`.

`Trace` keeps the newest lines of an endless log (a bounded window over it): byte offsets into
the log never change, so `tail -f trace` can poll the file's size and read what is new.
`Stats` counts messages by kind and direction, bytes each way, faults served and how long
serving them took.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable

from kernelsim.messages import Message

TRACE_WINDOW = 4 * 1024 * 1024
"""Bytes of the newest trace lines kept; older ones are dropped (the offsets stay)."""
PENDING_MAX = 16
"""Message lines waiting to be formatted (`Trace.message`) at most; then they are formatted."""


class Trace:
    def __init__(self, window: int = TRACE_WINDOW, clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self._clock = clock
        self._lines: deque[bytes] = deque()
        self._kept = 0
        self._start = 0  # log offset of the first kept byte
        self._end = 0  # log offset after the last byte
        self.listeners: list[Callable[[str], None]] = []
        self._second = -1
        self._clock_text = ""
        # Message lines in order, their time taken, their text not made yet (`message`).
        self._pending: list[tuple[float, str, str, Message]] = []

    @property
    def start(self) -> int:
        """The log offset of the first byte kept."""
        if self._pending:
            self.flush()
        return self._start

    @property
    def end(self) -> int:
        """The log offset after the last byte."""
        if self._pending:
            self.flush()
        return self._end

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

    def _append(self, now: float, text: str) -> None:
        second = int(now)
        if second != self._second:  # localtime and strftime once a second, not once a line
            self._second, self._clock_text = second, time.strftime("%H:%M:%S", time.localtime(now))
        stamp = f"{self._clock_text}.{int(now * 1_000_000) % 1_000_000:06d}"
        data = f"{stamp} {text}\n".encode("utf-8", "backslashreplace")
        self._lines.append(data)
        self._kept += len(data)
        self._end += len(data)
        while self._kept > self.window and len(self._lines) > 1:
            dropped = self._lines.popleft()
            self._kept -= len(dropped)
            self._start += len(dropped)
        for listener in self.listeners:
            listener(text)

    def read(self, offset: int, size: int) -> bytes:
        """Log bytes [offset, offset+size) that are still kept (older ones are gone)."""
        if self._pending:
            self.flush()
        offset = max(offset, self._start)
        if offset >= self._end or size <= 0:
            return b""
        out = bytearray()
        position = self._start
        for data in self._lines:
            if position + len(data) > offset:
                out += data[max(0, offset - position) :]
                if len(out) >= size:
                    break
            position += len(data)
        return bytes(out[:size])


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

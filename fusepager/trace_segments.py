"""Where the trace's bytes are kept: size-capped segments, the newest one growing.

A segment is a run of whole trace lines.  When the current segment would grow past its cap,
it is rotated: it becomes the newest older segment, the oldest one kept beyond `keep` is
dropped, and a new empty current segment starts.  Each segment has a number (its
generation), counting up from the process's first; a reader names the segment it reads by it,
so what it reads never changes under it while that segment is kept.

`MemorySegments` keeps them in memory (a pager or manager without a store).  `FileSegments`
keeps them as real files in a directory of the store, the way logrotate leaves logs:

    DIRECTORY/trace        the current segment, appended to
    DIRECTORY/trace.1      the one before it, ... up to DIRECTORY/trace.KEEP

Lines bound for the current file are buffered and written in one write(2) when the buffer
fills, before anyone asks for the file's size or bytes, and when `flush` is called (the
manager does each second): the trace is written per message, and a system call per line
would cost more than the message.  Nothing is fsynced: the trace is a log, not data.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import deque

log = logging.getLogger("fusepager.trace")

BUFFER_BYTES = 64 * 1024
"""Buffered trace bytes written at once."""


class MemorySegments:
    """The segments in memory: `keep` older ones and the current one."""

    failure: OSError | None = None  # memory never fails to take a line

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.generation = 0  # the current segment's number
        self._current = bytearray()
        self._older: deque[bytes] = deque()  # newest first

    @property
    def older(self) -> int:
        """How many older segments are kept."""
        return len(self._older)

    def current_size(self) -> int:
        return len(self._current)

    def append(self, data: bytes) -> None:
        self._current += data

    def rotate(self) -> int:
        """Returns how many lines were lost (none: memory takes them all)."""
        if self.keep:
            self._older.appendleft(bytes(self._current))
            while len(self._older) > self.keep:
                self._older.pop()
        self._current = bytearray()
        self.generation += 1
        return 0

    def size(self, generation: int) -> int:
        segment = self._segment(generation)
        return len(segment) if segment is not None else 0

    def read(self, generation: int, offset: int, size: int) -> bytes:
        segment = self._segment(generation)
        if segment is None or offset >= len(segment):
            return b""
        return bytes(segment[offset : offset + size])

    def _segment(self, generation: int) -> bytes | bytearray | None:
        back = self.generation - generation
        if back == 0:
            return self._current
        if 0 < back <= len(self._older):
            return self._older[back - 1]
        return None

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class FileSegments:
    """The segments as files in `directory` (made if missing): `trace`, `trace.1`, ...

    A store's trace starts a new current segment when it is opened: the previous run's lines
    move to `trace.1`, so the current segment is this run's.

    Lines that cannot be written (a full disk) stay in memory, after the file's end, and are
    read from there (the segment's cap bounds them) until a write works: the trace of a full
    store still tells why the mount answers ENOSPC.  Only if the segment is rotated before
    they could be written are they lost; `rotate` says how many."""

    NAME = "trace"

    def __init__(self, directory: str | os.PathLike[str], keep: int) -> None:
        self.directory = os.fspath(directory)
        self.keep = keep
        self.generation = 0
        if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(errno.ENOTDIR, "it is there but is not a directory", self.directory)
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        self._fd: int | None = None
        self._written = 0  # bytes of the current segment in its file ...
        self._pending = bytearray()  # ... and after them, not written yet
        self._failure: OSError | None = None  # why the last write failed, until one works
        self.older = 0
        while self.older < keep and os.path.isfile(self._path(self.older + 1)):
            self.older += 1
        self._open()
        if self._written:
            self.rotate()  # the last run's lines: trace.1
        self.generation = 0
        self._remove_beyond_keep()

    def _remove_beyond_keep(self) -> None:
        """Segments older than `keep` allows, left by a run that kept more (a smaller
        --trace-keep now): removed, so the cap holds.  Only regular files named trace.N."""
        for entry in os.listdir(self.directory):
            name, dot, number = entry.partition(".")
            if name != self.NAME or not dot or not (number.isascii() and number.isdigit()) or number.startswith("0"):
                continue
            path = os.path.join(self.directory, entry)
            if int(number) > self.keep and os.path.isfile(path) and not os.path.islink(path):
                try:
                    os.unlink(path)
                except OSError as error:
                    log.warning("trace: cannot remove %s: %s", path, error.strerror)

    def _path(self, back: int) -> str:
        name = self.NAME if back == 0 else f"{self.NAME}.{back}"
        return os.path.join(self.directory, name)

    def _open(self) -> None:
        # O_APPEND: every write lands at the end; pread still reads anywhere.
        # O_NOFOLLOW: a symlink planted in the store must not lead the trace elsewhere.
        self._fd = os.open(self._path(0), os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        self._written = os.fstat(self._fd).st_size

    def current_size(self) -> int:
        return self._written + len(self._pending)

    def append(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) >= BUFFER_BYTES and self._failure is None:
            self.flush()

    def flush(self) -> None:
        """Write the lines not written yet.  A failure (a full disk) keeps them in memory and
        says so once in the daemon's log: the trace must never stop the manager."""
        if not self._pending:
            return
        try:
            if self._fd is None:
                self._open()
            assert self._fd is not None
            while self._pending:
                done = os.write(self._fd, self._pending)
                del self._pending[:done]
                self._written += done
        except OSError as error:
            if self._failure is None or self._failure.errno != error.errno:
                log.warning("trace: cannot write to %s: %s (lines are kept in memory until it works)", self._path(0), error.strerror)
            self._failure = error
            return
        self._failure = None

    def rotate(self) -> int:
        """The current file becomes trace.1 (trace.1 becomes trace.2, ...); a new one starts.
        Returns how many lines of it could not be written and are lost."""
        self.flush()
        lost = self._pending.count(b"\n")
        self._pending = bytearray()
        self._close_file()
        try:
            if self.keep == 0:
                os.unlink(self._path(0))
            else:
                for back in range(min(self.older, self.keep - 1), 0, -1):
                    os.replace(self._path(back), self._path(back + 1))
                os.replace(self._path(0), self._path(1))
                self.older = min(self.older + 1, self.keep)
        except OSError as error:
            # The old lines stay where they are; the new segment starts after them.
            log.warning("trace: cannot rotate %s: %s", self._path(0), error.strerror)
        self.generation += 1
        try:
            self._open()
        except OSError as error:
            self._fd, self._written = None, 0
            log.warning("trace: cannot open %s: %s", self._path(0), error.strerror)
        return lost

    @property
    def failure(self) -> OSError | None:
        return self._failure

    def size(self, generation: int) -> int:
        back = self.generation - generation
        if back == 0:
            self.flush()
            return self.current_size()
        if 0 < back <= self.older:
            try:
                info = os.lstat(self._path(back))
            except OSError:
                return 0
            # Only a segment's own file: a link planted in the store must not show its
            # target's size (reads of it fail: O_NOFOLLOW).
            return info.st_size if stat.S_ISREG(info.st_mode) else 0
        return 0

    def read(self, generation: int, offset: int, size: int) -> bytes:
        back = self.generation - generation
        if back == 0:
            self.flush()
            if offset >= self.current_size():
                return b""
            data = b""
            if offset < self._written and self._fd is not None:
                data = os.pread(self._fd, min(size, self._written - offset), offset)
            if len(data) < size and offset + len(data) >= self._written:
                start = offset + len(data) - self._written
                data += bytes(self._pending[start : start + size - len(data)])
            return data
        if not 0 < back <= self.older:
            return b""
        try:
            fd = os.open(self._path(back), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return b""  # deleted from the store behind our back: nothing there
        try:
            if offset >= os.fstat(fd).st_size:
                return b""
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Write what is pending and close the file (a later line opens it again)."""
        self.flush()
        self._close_file()

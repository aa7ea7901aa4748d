"""`fusepager import` and `fusepager sync`: long work through a mount, with a progress bar.

Both are ordinary blocking file I/O on a mount served by another process (the daemon):

- import copies a file into an object's `data` in chunks (write-only opens of `data` get direct
  I/O), skipping the chunks that are all zeros (the object was truncated to the file's size
  first, so they stay holes in the store's sparse file), then writes `sync` to `ctl`.
- sync writes `clean OFF LEN` to `ctl` chunk by chunk over a range (each is a lock request
  that has the kernels return their dirty pages, which the pager stores), then `sync` (or, for
  a range, an fsync of `data`) to make it durable.

The bar (bytes, rate, ETA) goes to stderr when it is a terminal, or always with
FUSEPAGER_PROGRESS=1 (never with FUSEPAGER_PROGRESS=0 or --quiet); a one-line summary goes to
stdout at the end unless --quiet.  Errors are one line on stderr and exit status 1; Ctrl-C
stops, says how far it got, and exits 130.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .control import ControlError, parse_number

MiB = 1 << 20
IMPORT_CHUNK = 1 * MiB
SYNC_CHUNK = 4 * MiB
MAX_CHUNK = 256 * MiB
TRACE_TAIL = 256 * 1024
PROGRESS_ENV = "FUSEPAGER_PROGRESS"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

IMPORT_EPILOG = """\
FILE is copied into the object's data CHUNK bytes at a time (default 1M) through the mount;
chunks that are all zeros are not written: the object is sized first, so they stay holes in the
store's sparse file.  An existing object's bytes are replaced (it is truncated to nothing first:
kernels mapping it give up their pages).  The object must exist unless --create; a missing one
is an error.  At the end 'sync' is written to the object's ctl, so the bytes are durable.

A progress bar (bytes, rate, time left) shows on stderr when it is a terminal (or with
FUSEPAGER_PROGRESS=1; FUSEPAGER_PROGRESS=0 hides it), and a one-line summary on stdout at the
end; --quiet shows neither.  Ctrl-C stops and says how much was copied (exit status 130); an
error (no such file, not an object directory, a full store: ENOSPC) says so and exits 1.

examples:
  fusepager import disk.img /mnt/pager/objects/disk --create
  fusepager import --quiet big.bin /mnt/pager/objects/big
  zcat image.gz | fusepager import - /mnt/pager/objects/image --create
                                  (stdin: the size is unknown, the bar counts bytes)
"""

SYNC_EPILOG = """\
Has the kernels return the pages they changed in the object and the store keep them, with a
progress bar: 'clean OFF LEN' is written to the object's ctl for each CHUNK (default 4M) of the
range (a memory_object_lock_request to each kernel holding it, which returns its dirty pages),
then 'sync' (it also fsyncs the store's file; cheap once everything is clean).  With OFF LEN
only that range is cleaned, then the data file is fsynced.  Without, the range is the whole
object: its size, or further if a kernel holds pages past it.

OFF and LEN are bytes: decimal or 0x hex, with K, M or G suffixes.  The bar, the summary,
--quiet and FUSEPAGER_PROGRESS are as for import.  An error from the mount (ENOSPC when the
store cannot take the pages: they stay in the daemon's memory, nothing is lost) is reported
with the reason the mount gave in its trace, exit status 1.

examples:
  fusepager sync /mnt/pager/objects/big
  fusepager sync /mnt/pager/objects/big 0 64M
  fusepager sync --chunk 16M --quiet /mnt/pager/objects/big
"""


class ToolError(Exception):
    """The command cannot go on; the message says why (one line, for the user)."""


@dataclass(frozen=True)
class ObjectPath:
    """MNT/objects/NAME in a fusepager mount."""

    path: Path

    @property
    def root(self) -> Path:
        return self.path.parent.parent

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def ctl(self) -> Path:
        return self.path / "ctl"

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def find(cls, text: str, *, create: bool = False) -> ObjectPath:
        """Check that `text` names an object directory of a fusepager mount (creating it with
        `create` if it does not exist); ToolError saying what is wrong otherwise."""
        path = Path(os.path.abspath(text))
        usage = f"{text} is not a fusepager object directory: give MNT/objects/NAME in a fusepager mount"
        if path.parent.name != "objects" or path.name in ("", ".", ".."):
            if path.name == "data" and path.parent.parent.name == "objects":
                usage += f" (the object's directory, {path.parent}, not its data file)"
            raise ToolError(usage)
        obj = cls(path)
        try:
            os.getxattr(obj.root, "user.fusepager.pid")
        except OSError as error:
            if error.errno == errno.ENOTCONN:
                raise ToolError(f"the mount at {obj.root} is stale (its daemon is gone): fusepager umount {obj.root}") from None
            if error.errno in (errno.ENOENT, errno.ENOTDIR):
                raise ToolError(f"{text}: no such directory ({obj.root} does not exist)") from None
            raise ToolError(f"{usage} ({obj.root} is not a fusepager mount)") from None
        if not path.exists():
            if not create:
                raise ToolError(f"{text}: no such object in {obj.root} (add --create to create it)")
            since = _trace_size(obj)
            try:
                os.mkdir(path)
            except FileExistsError:
                pass  # created meanwhile: use it
            except OSError as error:
                raise ToolError(f"cannot create the object {text}: {error.strerror}{_mount_reason(obj, since)}") from None
        if not (path.is_dir() and obj.data.is_file() and obj.ctl.is_file()):
            raise ToolError(usage)
        return obj


# -- what the mount said ---------------------------------------------------------------------


def _trace_size(obj: ObjectPath) -> int | None:
    try:
        return os.stat(obj.root / "trace").st_size
    except OSError:
        return None


def _mount_reason(obj: ObjectPath, since: int | None) -> str:
    """The last refusal the mount traced (after offset `since`), as ' (the mount says: ...)',
    or '' when there is none; the mount writes the reason for each errno it answers there."""
    if since is None:
        return ""  # the trace could not be read before: an old line would mislead
    try:
        with open(obj.root / "trace", "rb") as trace:
            size = os.fstat(trace.fileno()).st_size
            start = max(since or 0, size - TRACE_TAIL)
            trace.seek(start)
            text = trace.read(size - start).decode("utf-8", "replace")
    except OSError:
        return ""
    for line in reversed(text.splitlines()):
        _, found, reason = line.partition(" mount refused ")
        if found:
            reason = re.sub(r"^\(E[A-Z]+\): ", "", reason.strip())
            if re.fullmatch(r"\[Errno \d+\] [^:]*", reason):
                return ""  # only the errno again: nothing to add
            return f" (the mount says: {reason})"
    return ""


def _os_error(what: str, error: OSError, obj: ObjectPath, since: int | None, after: str = "") -> ToolError:
    text = f"{what}: {error.strerror or error}"
    if error.errno == errno.ENOSPC:
        text += " (the store's disk is full)"
    return ToolError(text + _mount_reason(obj, since) + after)


# -- progress --------------------------------------------------------------------------------


def progress_wanted(quiet: bool) -> tuple[bool, bool]:
    """(show a bar, force rich to treat stderr as a terminal)."""
    if quiet:
        return False, False
    setting = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if setting in ("1", "yes", "true", "always"):
        return True, True
    if setting in ("0", "no", "false", "never"):
        return False, False
    return sys.stderr.isatty(), False


class Bar:
    """A rich progress bar over bytes on stderr, or nothing when it is not wanted."""

    def __init__(self, description: str, total: int | None, *, enabled: bool, force_terminal: bool = False) -> None:
        self._progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Rate(ProgressColumn):
            """Bytes a second in binary units, as the summary says them."""

            def render(self, task) -> Text:
                speed = task.finished_speed or task.speed
                if speed is None and task.elapsed:
                    speed = task.completed / task.elapsed
                return Text(f"{size_text(int(speed))}/s" if speed else "?", style="progress.data.speed")

        console = Console(stderr=True, force_terminal=True if force_terminal else None)
        timing = TimeRemainingColumn() if total is not None else TimeElapsedColumn()
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            Rate(),
            timing,
            console=console,
        )
        self._task = self._progress.add_task(description, total=total)
        self._progress.start()

    def advance(self, amount: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def describe(self, description: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=description)

    def finish(self, total: int) -> None:
        """Show the bar complete at `total` bytes (what an unknown size turned out to be)."""
        if self._progress is not None:
            self._progress.update(self._task, total=total, completed=total)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def size_text(count: int) -> str:
    """1536 -> '1.5 KiB'; small counts in bytes."""
    if count < 1024:
        return f"{count} bytes"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _rate(count: int, seconds: float) -> str:
    return f"{size_text(int(count / seconds))}/s" if seconds > 0 else "-"


def _chunk(text: str, default: int) -> int:
    if text is None:
        return default
    try:
        value = parse_number(text, "chunk")
    except ControlError as error:
        raise ToolError(str(error)) from None
    if not 0 < value <= MAX_CHUNK:
        raise ToolError(f"chunk {text!r}: between 1 byte and {size_text(MAX_CHUNK)}")
    return value


def _write_ctl(obj: ObjectPath, fd: int, command: str) -> None:
    data = f"{command}\n".encode()
    if os.write(fd, data) != len(data):
        raise OSError(errno.EIO, f"short write of {command!r} to ctl")


# -- import ----------------------------------------------------------------------------------


def _read_full(fd: int, view: memoryview) -> int:
    """Fill `view` from `fd` unless the input ends first; the count read."""
    got = 0
    while got < len(view):
        count = os.readv(fd, [view[got:]])
        if count == 0:
            break
        got += count
    return got


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "write returned nothing")
        view, offset = view[written:], offset + written


def _source(file: str) -> tuple[int, int | None, str]:
    """(fd, size or None when unknown, a name for messages)."""
    if file == "-":
        fd, label = sys.stdin.fileno(), "stdin"
    else:
        label = file
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError as error:
            raise ToolError(f"cannot read {file}: {error.strerror}") from None
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        if file != "-":
            os.close(fd)
        raise ToolError(f"cannot read {file}: Is a directory")
    if stat.S_ISREG(info.st_mode):
        return fd, info.st_size, label
    if stat.S_ISBLK(info.st_mode):
        size = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd, size, label
    return fd, None, label


def import_file(file: str, target: str, *, create: bool = False, chunk: int = IMPORT_CHUNK, quiet: bool = False) -> int:
    """Copy FILE (or stdin, '-') into the object `target` (MNT/objects/NAME); the exit status."""
    obj = ObjectPath.find(target, create=create)
    source, size, label = _source(file)
    since = _trace_size(obj)
    show, force = progress_wanted(quiet)
    copied = holes = 0
    started = time.monotonic()
    data_fd = ctl_fd = -1
    phase = "opening"
    try:
        with Bar(f"import {obj.name}", size, enabled=show, force_terminal=force) as bar:
            try:
                phase = f"opening {obj.data}"
                data_fd = os.open(obj.data, os.O_WRONLY)  # write-only: direct I/O through the mount
                phase = f"truncating {obj.data}"
                if os.fstat(data_fd).st_size:
                    os.ftruncate(data_fd, 0)  # the old bytes go: what is not written is a hole
                if size:
                    os.ftruncate(data_fd, size)
                buffer = bytearray(chunk)
                view = memoryview(buffer)
                zeros = bytes(chunk)
                while True:
                    phase = f"reading {label}"
                    count = _read_full(source, view)
                    if count == 0:
                        break
                    if (buffer == zeros) if count == chunk else (view[:count] == zeros[:count]):
                        holes += count  # stays a hole: the object was sized (or is at the end)
                    else:
                        phase = f"writing {obj.data} at offset {copied}"
                        _pwrite_all(data_fd, view[:count], copied)
                    copied += count
                    bar.advance(count)
                phase = f"truncating {obj.data}"
                if size is None or copied != size:
                    os.ftruncate(data_fd, copied)  # trailing zeros, or a file that changed size
                os.close(data_fd)
                data_fd = -1
                bar.finish(copied)
                bar.describe(f"import {obj.name}: sync")
                phase = f"writing 'sync' to {obj.ctl}"
                ctl_fd = os.open(obj.ctl, os.O_WRONLY)
                _write_ctl(obj, ctl_fd, "sync")
                bar.describe(f"import {obj.name}: synced")
            finally:
                _close_quietly(data_fd, ctl_fd)
    except KeyboardInterrupt:
        if size is not None:
            where = f" of {size_text(size)} ({copied} bytes) from {label} into {obj.path}: its first {copied} bytes are there, the rest reads as zeros"
        else:
            where = f" ({copied} bytes) from {label} into {obj.path}: its data holds them (less zeros at the end)"
        print(f"fusepager import: interrupted after copying {size_text(copied)}{where}; not synced", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as error:
        after = f"; {size_text(copied)} ({copied} bytes) had been copied, not synced" if copied else ""
        raise _os_error(phase, error, obj, since, after) from None
    finally:
        if file != "-":
            os.close(source)
    seconds = time.monotonic() - started
    if not quiet:
        zero_text = f"; {size_text(holes)} of zeros left as holes" if holes else ""
        print(
            f"imported {label} into {obj.path}: {size_text(copied)} ({copied} bytes) in {seconds:.1f} s, "
            f"{_rate(copied, seconds)}{zero_text}; synced"
        )
    return 0


# -- sync ------------------------------------------------------------------------------------


def held_end(obj: ObjectPath) -> int:
    """Where the pages kernels hold of the object end (their `pages` files), 0 if none."""
    end = 0
    try:
        kernels = list((obj.path / "kernels").iterdir())
    except OSError:
        return 0
    for kernel in kernels:
        try:
            lines = (kernel / "pages").read_text().splitlines()
        except OSError:
            continue  # the kernel went meanwhile
        for line in lines:
            words = line.split()
            try:
                end = max(end, int(words[0], 0) + int(words[1], 0))
            except (IndexError, ValueError):
                continue
    return end


def sync_object(target: str, offset: str | None = None, length: str | None = None, *, chunk: int = SYNC_CHUNK, quiet: bool = False) -> int:
    """Clean the object's range chunk by chunk, then make it durable; the exit status."""
    if (offset is None) != (length is None):
        raise ToolError("give both OFF and LEN, or neither (the whole object)")
    obj = ObjectPath.find(target)
    whole = offset is None
    try:
        if whole:
            start = 0
            end = max(os.stat(obj.data).st_size, held_end(obj))
        else:
            start = parse_number(offset, "offset")
            end = start + parse_number(length, "length")
    except ControlError as error:
        raise ToolError(str(error)) from None
    except OSError as error:
        raise ToolError(f"cannot stat {obj.data}: {error.strerror}") from None
    since = _trace_size(obj)
    show, force = progress_wanted(quiet)
    cleaned = 0
    started = time.monotonic()
    phase = f"opening {obj.ctl}"
    ctl_fd = data_fd = -1
    try:
        with Bar(f"sync {obj.name}", end - start, enabled=show, force_terminal=force) as bar:
            try:
                ctl_fd = os.open(obj.ctl, os.O_WRONLY)
                position = start
                while position < end:
                    step = min(end, (position // chunk + 1) * chunk) - position  # chunk-aligned steps
                    phase = f"writing 'clean {position:#x} {step}' to {obj.ctl}"
                    _write_ctl(obj, ctl_fd, f"clean {position:#x} {step}")
                    position += step
                    cleaned += step
                    bar.advance(step)
                if whole:
                    bar.describe(f"sync {obj.name}: sync")
                    phase = f"writing 'sync' to {obj.ctl}"
                    _write_ctl(obj, ctl_fd, "sync")
                    bar.describe(f"sync {obj.name}: synced")
                else:
                    bar.describe(f"sync {obj.name}: fsync")
                    phase = f"fsync of {obj.data}"
                    data_fd = os.open(obj.data, os.O_RDONLY)
                    os.fsync(data_fd)
                    bar.describe(f"sync {obj.name}: fsynced")
            finally:
                _close_quietly(ctl_fd, data_fd)
    except KeyboardInterrupt:
        print(
            f"fusepager sync: interrupted after cleaning {size_text(cleaned)} of {size_text(end - start)} of {obj.path} "
            f"(offsets {start:#x} to {start + cleaned:#x} were returned and stored, not fsynced); nothing is lost: "
            "the kernels keep the rest",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except OSError as error:
        raise _os_error(phase, error, obj, since) from None
    seconds = time.monotonic() - started
    if not quiet:
        what = "stored and synced" if whole else "stored and fsynced"
        print(
            f"synced {obj.path}: {size_text(cleaned)} cleaned ({start:#x} to {end:#x}) in {seconds:.1f} s, "
            f"{_rate(cleaned, seconds)}, {size_text(chunk)} at a time; {what}"
        )
    return 0


# -- the commands (fusepager/cli.py adds the parsers) ------------------------------------------


def run_import(args: argparse.Namespace) -> int:
    try:
        return import_file(args.file, args.object, create=args.create, chunk=_chunk(args.chunk, IMPORT_CHUNK), quiet=args.quiet)
    except ToolError as error:
        print(f"fusepager import: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fusepager import: interrupted before copying anything", file=sys.stderr)
        return EXIT_INTERRUPTED


def run_sync(args: argparse.Namespace) -> int:
    try:
        return sync_object(args.object, args.offset, args.length, chunk=_chunk(args.chunk, SYNC_CHUNK), quiet=args.quiet)
    except ToolError as error:
        print(f"fusepager sync: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fusepager sync: interrupted before cleaning anything", file=sys.stderr)
        return EXIT_INTERRUPTED


def _close_quietly(*fds: int) -> None:
    """Close what was opened (-1: nothing); an error closing matters no more at that point."""
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

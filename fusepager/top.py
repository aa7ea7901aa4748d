"""`fusepager top MNT`: a live view of a mount, per object and kernel.

It reads only what the mount shows, with ordinary file reads (it is a process of its own, never
the one serving the mount): `stats`, and for each object `data`'s size, `locks` and each
kernel's `page_size` and `pages`.  Three parts, each usable alone:

- reading: `parse_pages`, `parse_stats`, `parse_locks` turn the files' text into typed values
  (pure functions), and `read_snapshot` reads a whole mount into a `Snapshot`;
- computing: `page_cells` makes a kernel's map of resident pages (a cell per page, or per group
  of pages for big objects), `rates` the messages per second between two snapshots;
- rendering: `render_frame` (one frame, a plain top-to-bottom group: `--once`) and
  `render_screen` (the live layout), with rich; `run` is the command.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import termios
import time
import tty
from dataclasses import dataclass, field

from rich import box
from rich.console import Console, Group, RenderableType
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .mount import mount_entry, mount_state

MAP_ROWS = 4
"""Rows of cells a kernel's page map takes at most: bigger objects get several pages a cell."""


class TopError(Exception):
    """The mount cannot be shown (not a fusepager mount, stale, gone): the message says why."""


# -- what the mount shows, typed ----------------------------------------------------------------


@dataclass(frozen=True)
class PageRun:
    """A line of a kernel's `pages`: a run of pages with the same access and flags."""

    offset: int
    length: int
    access: str  # "r--", "rw-"
    dirty: bool
    precious: bool

    @property
    def writable(self) -> bool:
        return "w" in self.access


@dataclass(frozen=True)
class LockLine:
    """A line of an object's `locks`: `KIND KERNEL OFFSET LENGTH PROT [key=value...]`."""

    kind: str  # manager | request | unlock
    kernel: str  # "*" for a manager lock
    offset: int
    length: int
    prot: str  # manager: accesses forbidden; request: the lock value; unlock: the access asked
    extra: dict[str, str] = field(default_factory=dict)  # requests: flush, return, waited_ms

    @property
    def waited_ms(self) -> int | None:
        value = self.extra.get("waited_ms")
        return int(value) if value is not None and value.isdigit() else None


@dataclass(frozen=True)
class KernelView:
    label: str
    page_size: int
    runs: tuple[PageRun, ...]


@dataclass(frozen=True)
class ObjectView:
    name: str  # for display (undecodable bytes escaped)
    size: int
    kernels: tuple[KernelView, ...]
    locks: tuple[LockLine, ...]

    @property
    def manager_locks(self) -> list[LockLine]:
        return [lock for lock in self.locks if lock.kind == "manager"]


@dataclass(frozen=True)
class Snapshot:
    """The mount at one moment."""

    mountpoint: str
    taken: float  # time.monotonic() when read
    wall: float  # time.time() when read
    mounted_at: float  # when the mount was made (time.time() scale), from the root's mtime
    stats: dict[str, float]
    objects: tuple[ObjectView, ...]


def _number(text: str) -> int:
    return int(text, 0)


def parse_pages(text: str) -> list[PageRun]:
    """A kernel's `pages` file: `OFFSET LENGTH ACCESS FLAGS` lines (FLAGS: `dirty`, `precious`,
    both comma-separated, or `-`).  ValueError on a line that is not one."""
    runs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        words = line.split()
        try:
            if len(words) < 3 or len(words[2]) != 3:
                raise ValueError
            flags = set(words[3].split(",")) if len(words) > 3 else set()
            runs.append(PageRun(_number(words[0]), _number(words[1]), words[2], "dirty" in flags, "precious" in flags))
        except ValueError:
            raise ValueError(f"pages line {number}: {line!r} is not OFFSET LENGTH ACCESS FLAGS") from None
    return runs


def parse_stats(text: str) -> dict[str, float]:
    """The `stats` file: `key value` lines.  Lines that are not are left out."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) != 2:
            continue
        try:
            value = float(words[1])
        except ValueError:
            continue
        found[words[0]] = int(value) if value.is_integer() else value
    return found


def parse_locks(text: str) -> list[LockLine]:
    """An object's `locks` file (see docs/mount.md).  ValueError on a line that is not one."""
    locks = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        words = line.split()
        try:
            if len(words) < 5 or words[0] not in ("manager", "request", "unlock") or len(words[4]) != 3:
                raise ValueError
            extra = dict(word.split("=", 1) for word in words[5:])
            locks.append(LockLine(words[0], words[1], _number(words[2]), _number(words[3]), words[4], extra))
        except ValueError:
            raise ValueError(f"locks line {number}: {line!r} is not KIND KERNEL OFFSET LENGTH PROT [KEY=VALUE...]") from None
    return locks


# -- reading the mount --------------------------------------------------------------------------


def check_mount(mountpoint: str) -> None:
    """TopError unless `mountpoint` is a live fusepager mount."""
    if not os.path.lexists(mountpoint) and mount_entry(mountpoint) is None:  # a stale one cannot be stat'ed
        raise TopError(f"{mountpoint} does not exist")
    try:
        state = mount_state(mountpoint)
    except OSError as error:
        raise TopError(f"{mountpoint}: {error.strerror}") from None
    if state == "stale":
        raise TopError(
            f"{mountpoint} is a stale mount: the daemon that served it is gone.\n"
            f"Clear it with:  fusepager umount {mountpoint}   (or: fusermount3 -u {mountpoint})"
        )
    if state == "free":
        raise TopError(f"{mountpoint} is not a mount point (mount a store there: fusepager mount STORE {mountpoint})")
    entry = mount_entry(mountpoint)
    if state != "mounted" or entry is None or entry[0] != "fuse.fusepager":
        raise TopError(f"{mountpoint} is not a fusepager mount ({entry[0] if entry else 'unknown'} is mounted there)")


def _read(path: str) -> str | None:
    """A generated file's text; None when it is not there (a kernel or an object that went)."""
    try:
        with open(path, "rb") as file:
            return file.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return None


def display(name: str) -> str:
    """A name from os.listdir for the screen: bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def read_snapshot(mountpoint: str) -> Snapshot:
    """Read the mount's state.  TopError if it is not (or no longer) a live fusepager mount."""
    try:
        return _read_snapshot(mountpoint)
    except (OSError, ValueError, TopError) as error:
        try:
            state = mount_state(mountpoint)
        except OSError:
            state = "stale"
        if state == "stale":
            raise TopError(
                f"{mountpoint} is a stale mount now: the daemon that served it is gone.\n"
                f"Clear it with:  fusepager umount {mountpoint}   (or: fusermount3 -u {mountpoint})"
            ) from None
        if state != "mounted":
            raise TopError(f"{mountpoint} is no longer mounted") from None
        if isinstance(error, TopError):
            raise
        raise TopError(f"reading {mountpoint}: {error}") from None


def _read_snapshot(mountpoint: str) -> Snapshot:
    taken, wall = time.monotonic(), time.time()
    stats_text = _read(os.path.join(mountpoint, "stats"))
    objects_dir = os.path.join(mountpoint, "objects")
    if stats_text is None or not os.path.isdir(objects_dir):
        raise TopError(f"{mountpoint} is not a fusepager mount (no stats or objects/)")
    mounted_at = os.stat(mountpoint).st_mtime
    objects = []
    for name in sorted(os.listdir(objects_dir)):
        base = os.path.join(objects_dir, name)
        try:
            size = os.stat(os.path.join(base, "data")).st_size
            kernel_names = sorted(os.listdir(os.path.join(base, "kernels")))
        except FileNotFoundError:
            continue  # removed meanwhile
        kernels = []
        for label in kernel_names:
            directory = os.path.join(base, "kernels", label)
            page_size, pages = _read(os.path.join(directory, "page_size")), _read(os.path.join(directory, "pages"))
            if page_size is None or pages is None:
                continue  # terminated meanwhile
            kernels.append(KernelView(display(label), int(page_size), tuple(parse_pages(pages))))
        locks = parse_locks(_read(os.path.join(base, "locks")) or "")
        objects.append(ObjectView(display(name), size, tuple(kernels), tuple(locks)))
    return Snapshot(mountpoint, taken, wall, mounted_at, parse_stats(stats_text), tuple(objects))


# -- the page map -------------------------------------------------------------------------------

FREE, READ, PRECIOUS, DIRTY = 0, 1, 2, 3
"""What a cell shows of its pages, the strongest state among them (a manager lock over any of
them shows over that: LOCKED_HELD or LOCKED_FREE)."""
LOCKED_HELD, LOCKED_FREE = 4, 5

CELL_CHARS = {FREE: ".", READ: "r", PRECIOUS: "p", DIRTY: "W", LOCKED_HELD: "L", LOCKED_FREE: "l"}
CELL_STYLES = {
    FREE: "grey50",
    READ: "cyan",
    PRECIOUS: "bold blue",
    DIRTY: "bold red",
    LOCKED_HELD: "bold black on yellow",
    LOCKED_FREE: "yellow",
}
CELL_MEANINGS = {
    FREE: "not held",
    READ: "read-only",
    PRECIOUS: "precious (read-only)",
    DIRTY: "writable/dirty",
    LOCKED_HELD: "locked by ctl lock (held)",
    LOCKED_FREE: "locked (not held)",
}


@dataclass(frozen=True)
class PageMap:
    pages_per_cell: int
    cells: list[int]  # a state per cell


def page_cells(kernel: KernelView, size: int, manager_locks: list[LockLine], max_cells: int) -> PageMap:
    """A kernel's map: the object's pages in that kernel's page size (up to its size, or the last
    page the kernel holds beyond it), a cell each, or `pages_per_cell` pages each so that the map
    fits `max_cells` cells.  Works on runs and cells only, never page by page."""
    page_size = kernel.page_size
    end = max([size] + [run.offset + run.length for run in kernel.runs])
    pages = -(-end // page_size)
    per_cell = max(1, -(-pages // max(1, max_cells)))
    cells = [FREE] * (-(-pages // per_cell))
    span = page_size * per_cell  # bytes a cell covers

    def cover(offset: int, length: int) -> range:
        first = offset // span
        last = min(len(cells), -(-(offset + length) // span))
        return range(min(first, len(cells)), last)

    for run in kernel.runs:
        state = DIRTY if run.writable or run.dirty else PRECIOUS if run.precious else READ
        for cell in cover(run.offset, run.length):
            cells[cell] = max(cells[cell], state)
    for lock in manager_locks:
        if lock.length <= 0:
            continue
        low = lock.offset - lock.offset % page_size  # a lock covers the kernel's whole pages
        for cell in cover(low, lock.offset + lock.length - low):
            cells[cell] = LOCKED_FREE if cells[cell] in (FREE, LOCKED_FREE) else LOCKED_HELD
    return PageMap(per_cell, cells)


def map_rows(page_map: PageMap, per_row: int) -> list[str]:
    """The cells as text, `per_row` characters a row."""
    chars = "".join(CELL_CHARS[state] for state in page_map.cells)
    return [chars[i : i + per_row] for i in range(0, len(chars), per_row)]


def size_text(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" or float(size).is_integer() else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


# -- rates --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    seconds: float  # the interval the rates are over
    since_mount: bool  # no earlier snapshot: averages since the mount was made
    messages: list[tuple[str, int, float]]  # (stats key, total, per second), in. then out.
    faults_per_second: float
    latency_us: float | None  # mean latency of the faults served in the interval, when known


def rates(previous: Snapshot | None, current: Snapshot) -> Rates:
    """Messages per second by kind, and faults served, from the `stats` counters' change since
    `previous` (or since the mount was made, with no previous snapshot)."""
    now = current.stats
    if previous is None:
        seconds = max(current.wall - current.mounted_at, 1e-3)
        before: dict[str, float] = {}
    else:
        seconds = max(current.taken - previous.taken, 1e-3)
        before = previous.stats
    keys = sorted((k for k in now if k.startswith(("in.", "out."))), key=lambda k: (not k.startswith("in."), k))
    messages = [(key, int(now[key]), max(0.0, now[key] - before.get(key, 0)) / seconds) for key in keys]
    faults = max(0.0, now.get("faults_served", 0) - before.get("faults_served", 0))
    return Rates(seconds, previous is None, messages, faults / seconds, interval_latency_us(before, now))


def interval_latency_us(before: dict[str, float], now: dict[str, float]) -> float | None:
    """The mean latency of the faults served between two `stats` readings: from the total times
    they give, or (a daemon without `latency_total_us`) from their means and counts; None when no
    fault was served, or when the means' rounding (to 1 µs) could put the answer off by more than
    10 % (or 1 µs)."""
    n0, n1 = before.get("faults_served", 0), now.get("faults_served", 0)
    served = n1 - n0
    if served <= 0:
        return None
    if "latency_total_us" in before and "latency_total_us" in now:  # exact, from the sums
        return max(0.0, (now["latency_total_us"] - before["latency_total_us"]) / served)
    mean = (now.get("latency_mean_us", 0) * n1 - before.get("latency_mean_us", 0) * n0) / served
    error = 0.5 * (n0 + n1) / served
    if error > max(1.0, 0.1 * abs(mean)):
        return None
    return max(0.0, mean)


# -- rendering ----------------------------------------------------------------------------------


def _legend() -> Text:
    text = Text("cells: ")
    for state in (FREE, READ, PRECIOUS, DIRTY, LOCKED_HELD, LOCKED_FREE):
        if state == LOCKED_HELD:
            text.append("\n       ")
        text.append(CELL_CHARS[state], style=CELL_STYLES[state])
        text.append(f" {CELL_MEANINGS[state]}  ")
    text.rstrip()
    return text


def render_object(obj: ObjectView, per_row: int) -> RenderableType:
    """An object's panel: a page map per kernel, rows of `per_row` cells (fewer when offsets
    take over 8 hex digits)."""
    lines: list[Text] = []
    locks = obj.manager_locks
    end = max([obj.size] + [run.offset + run.length for kernel in obj.kernels for run in kernel.runs])
    digits = max(8, len(f"{max(0, end - 1):x}"))
    per_row = max(8, per_row - -(-(digits - 8) // 8) * 8)
    for kernel in obj.kernels:
        page_map = page_cells(kernel, obj.size, locks, per_row * MAP_ROWS)
        held = sum(run.length for run in kernel.runs) // kernel.page_size
        dirty = sum(run.length for run in kernel.runs if run.writable or run.dirty) // kernel.page_size
        head = Text()
        head.append(kernel.label, style="bold")
        head.append(f"  {size_text(kernel.page_size)} pages, {held} held, {dirty} writable")
        cell_bytes = page_map.pages_per_cell * kernel.page_size
        head.append(f"  (a cell is {page_map.pages_per_cell} pages, {size_text(cell_bytes)})" if page_map.pages_per_cell > 1 else "  (a cell a page)")
        lines.append(head)
        rows = map_rows(page_map, per_row)
        if not rows:
            lines.append(Text(" (no pages)", style="grey50"))
        for index in range(len(rows)):
            line = Text(f" 0x{index * per_row * cell_bytes:0{digits}x} ")
            for state in page_map.cells[index * per_row : (index + 1) * per_row]:
                line.append(CELL_CHARS[state], style=CELL_STYLES[state])
            lines.append(line)
    if not obj.kernels:
        lines.append(Text("no kernel uses it", style="grey50"))
    title = Text()
    title.append(obj.name, style="bold")
    title.append(f"  {size_text(obj.size)}, {_count(len(obj.kernels), 'kernel')}")
    return Panel(Group(*lines), title=title, title_align="left", box=box.ROUNDED, expand=True)


def render_objects(snapshot: Snapshot, per_row: int) -> RenderableType:
    used = [obj for obj in snapshot.objects if obj.kernels or obj.locks]
    idle = [obj.name for obj in snapshot.objects if not (obj.kernels or obj.locks)]
    parts: list[RenderableType] = [render_object(obj, per_row) for obj in used]
    if idle:
        shown = ", ".join(idle[:20]) + (f" and {len(idle) - 20} more" if len(idle) > 20 else "")
        parts.append(Text(f"no kernel: {shown}", style="grey50"))
    if not snapshot.objects:
        parts.append(Text("no objects (mkdir MNT/objects/NAME makes one)", style="grey50"))
    if any(obj.kernels for obj in used):
        parts.append(_legend())
    return Group(*parts)


def render_rates(snapshot: Snapshot, measured: Rates) -> RenderableType:
    stats = snapshot.stats
    over = f"since the mount ({measured.seconds:.1f} s)" if measured.since_mount else f"over the last {measured.seconds:.1f} s"
    table = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False, show_edge=False)
    table.add_column("message")
    table.add_column("total", justify="right")
    table.add_column("/s", justify="right")
    for key, total, per_second in measured.messages:
        table.add_row(key, str(total), f"{per_second:.1f}", style="bold" if per_second > 0 and not measured.since_mount else None)
    if not measured.messages:
        table.add_row("(none yet)", "", "")
    latency = f"latency mean {stats.get('latency_mean_us', 0):.0f} µs, max {stats.get('latency_max_us', 0):.0f} µs"
    if not measured.since_mount:
        latency += ", this interval " + ("-" if measured.latency_us is None else f"{measured.latency_us:.0f} µs")
    summary = Text(
        f"faults served {int(stats.get('faults_served', 0))} ({measured.faults_per_second:.1f}/s)\n{latency}\n"
        f"bytes in {size_text(stats.get('bytes_in', 0))}, out {size_text(stats.get('bytes_out', 0))}; refused {int(stats.get('refused', 0))}"
    )
    return Panel(Group(summary, Text(f"messages per second, {over}:"), table), title="rates", title_align="left", box=box.ROUNDED)


def render_locks(snapshot: Snapshot) -> RenderableType:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=False)
    for column in ("object", "lock", "kernel", "range", "what", "waited"):
        table.add_column(column, justify="right" if column == "waited" else "left")
    kinds = {"manager": "ctl lock", "request": "request", "unlock": "held unlock"}
    for obj in snapshot.objects:
        for lock in obj.locks:
            if lock.kind == "request":
                what = f"lock {lock.prot} return={lock.extra.get('return', '?')}" + (" flush" if lock.extra.get("flush") == "1" else "")
            elif lock.kind == "manager":
                what = "forbids " + lock.prot
            else:
                what = "wants " + lock.prot
            waited = "" if lock.waited_ms is None else f"{lock.waited_ms} ms"
            style = "yellow" if lock.kind == "manager" else "red" if lock.kind == "unlock" else None
            table.add_row(obj.name, kinds[lock.kind], lock.kernel, f"{lock.offset:#x}+{lock.length}", what, waited, style=style)
    content: RenderableType = table if table.row_count else Text("none", style="grey50")
    return Panel(content, title="locks", title_align="left", box=box.ROUNDED)


def _header(snapshot: Snapshot, interval: float | None) -> Text:
    stats = snapshot.stats
    text = Text()
    text.append("fusepager top", style="bold")
    kernels = len({kernel.label for obj in snapshot.objects for kernel in obj.kernels})
    used = sum(1 for obj in snapshot.objects if obj.kernels)
    objects = int(stats.get("objects", len(snapshot.objects)))
    text.append(f"  {snapshot.mountpoint}  {_count(objects, 'object')} ({used} in use), {_count(kernels, 'kernel')}  ")
    text.append(time.strftime("%H:%M:%S", time.localtime(snapshot.wall)))
    if interval is not None:
        text.append(f"  every {interval:g} s, q quits", style="grey50")
    return text


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _per_row(width: int) -> int:
    """Cells a map row holds in a pane `width` columns wide (the borders and an offset of 8
    hex digits take 16)."""
    return max(8, min(64, (width - 16) // 8 * 8))


def render_frame(snapshot: Snapshot, measured: Rates, width: int = 80) -> RenderableType:
    """One frame, top to bottom: what `--once` prints."""
    return Group(_header(snapshot, None), render_objects(snapshot, _per_row(width)), render_rates(snapshot, measured), render_locks(snapshot))


def render_screen(snapshot: Snapshot, measured: Rates, width: int, interval: float) -> RenderableType:
    """The live screen: the header, the maps with the rates beside them, the locks below
    (as many lines as they take, up to 14).  When narrow, the frame `--once` prints (the screen
    shows its top)."""
    if width < 120:
        return render_frame(snapshot, measured, width)
    layout = Layout()
    lock_lines = sum(len(obj.locks) for obj in snapshot.objects)
    layout.split_column(
        Layout(_header(snapshot, interval), size=1),
        Layout(name="upper"),
        Layout(render_locks(snapshot), size=min(14, 4 + lock_lines) if lock_lines else 3),
    )
    rates_width = 60
    layout["upper"].split_row(Layout(render_objects(snapshot, _per_row(width - rates_width))), Layout(render_rates(snapshot, measured), size=rates_width))
    return layout


# -- the command --------------------------------------------------------------------------------


def run(mountpoint: str, *, interval: float = 1.0, once: bool = False, color: bool = True) -> int:
    """`fusepager top`: 0 when quit (q, Ctrl-C) or after `--once`; 1 when the mount cannot be
    shown, with the reason on stderr."""
    try:
        check_mount(mountpoint)
        if once:
            console = Console(color_system="auto" if color else None, highlight=False)
            snapshot = read_snapshot(mountpoint)
            console.print(render_frame(snapshot, rates(None, snapshot), console.width))
            return 0
        return _live(mountpoint, interval, color)
    except TopError as error:
        print(f"fusepager top: {error}", file=sys.stderr)
        return 1


def _live(mountpoint: str, interval: float, color: bool) -> int:
    console = Console(color_system="auto" if color else None, highlight=False)
    # Keys are read only for the screen (into a pipe, `top | less` has the terminal's keys).
    keys = sys.stdin.fileno() if console.is_terminal and sys.stdin.isatty() else None
    saved = termios.tcgetattr(keys) if keys is not None else None
    # SIGTERM ends it as Ctrl-C does: through the `finally`s that give the terminal back.
    signal.signal(signal.SIGTERM, _terminated)
    previous: Snapshot | None = None
    try:
        if keys is not None:
            tty.setcbreak(keys)  # q without Enter; Ctrl-C still interrupts
        if not console.is_terminal:  # a pipe: a plain frame each time, as `top -b` does
            while True:
                snapshot = read_snapshot(mountpoint)
                console.print(render_frame(snapshot, rates(previous, snapshot), console.width), "")
                previous = snapshot
                if _wait_for_quit(keys, interval):
                    return 0
        # The alternate screen, given back (with the terminal's modes) however this ends.
        with Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                snapshot = read_snapshot(mountpoint)
                live.update(render_screen(snapshot, rates(previous, snapshot), console.width, interval), refresh=True)
                previous = snapshot
                if _wait_for_quit(keys, interval):
                    return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if saved is not None:
            termios.tcsetattr(keys, termios.TCSADRAIN, saved)


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _wait_for_quit(keys: int | None, interval: float) -> bool:
    """Wait `interval` seconds, or less if `q` is pressed: whether it was."""
    deadline = time.monotonic() + interval
    while (left := deadline - time.monotonic()) > 0:
        if keys is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([keys], [], [], left)
        if ready:
            key = os.read(keys, 1)
            if key in (b"q", b"Q"):
                return True
            if not key:
                time.sleep(max(0.0, deadline - time.monotonic()))
                return False
    return False


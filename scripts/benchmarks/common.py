"""What every benchmark case shares: results, progress, medians, mounting fusepager, the
page cache, in-memory pager callbacks and the in-process fault rate."""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

import kernelsim
from kernelsim import calls
from kernelsim import messages as m
from kernelsim.interface import MEMORY_OBJECT_COPY_DELAY

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Result:
    case: str
    figure: str
    unit: str
    value: float
    anchor: str
    anchor_value: float
    ratio: float
    target: float | None
    runs: int
    command: str
    details: dict[str, Any] | None = None  # per-run figures and conditions, for the JSON
    anchor_unit: str = ""  # when the anchor is counted in other units than the figure
    lower_is_better: bool = False  # the target is a ceiling for the ratio (memory), not a floor

    @property
    def met(self) -> bool | None:
        """Whether the ratio meets the target (None when there is none)."""
        if self.target is None:
            return None
        return self.ratio <= self.target if self.lower_is_better else self.ratio >= self.target


CONSOLE = Console(stderr=True)
PROGRESS = Progress(
    TextColumn("{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TimeElapsedColumn(),
    console=CONSOLE,
)
"""The bars on stderr while the benchmark runs (bench.py starts and stops the display)."""
_status: TaskID | None = None


def progress(text: str) -> None:
    """What is happening now, for work that has no count (a download, a mount, a fill)."""
    global _status
    if _status is None:
        _status = PROGRESS.add_task(text, total=None)
    else:
        PROGRESS.update(_status, description=text)


def median_of(runs: int, label: str, measure: Callable[[], float]) -> float:
    """The median of `runs` calls of `measure`, with a bar counting them."""
    task = PROGRESS.add_task(label, total=runs)
    values = []
    for _ in range(runs):
        values.append(measure())
        PROGRESS.advance(task)
    PROGRESS.update(task, description=f"{label}: median {statistics.median(values):,.0f}")
    return statistics.median(values)


def _command(case: str, args: argparse.Namespace) -> str:
    return f"scripts/bench --case {case} --runs {args.runs}" + (" --quick" if args.quick else "")



MiB = 1 << 20
MB = 1_000_000
VENV_BIN = Path(sys.executable).parent
PYPI_SIMPLE = "https://pypi.org/simple/{name}/"
PYPI_JSON = "https://pypi.org/pypi/{name}/{version}/json"
MOUNT_TIMEOUT = 30.0
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


class BenchError(Exception):
    """A case cannot be measured; the message says why."""


def _fusepager(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI, as a user runs it: .venv/bin/fusepager ARGV."""
    script = VENV_BIN / "fusepager"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fusepager"]
    return subprocess.run([*command, *argv], capture_output=True, text=True, timeout=timeout)


def _mounted(mountpoint: Path) -> bool:
    from fusepager.mount import mount_entry

    return mount_entry(mountpoint) is not None


def _wait_mounted(mountpoint: Path, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not _mounted(mountpoint):
        if process.poll() is not None:
            raise BenchError(f"{process.args[1]} exited with status {process.returncode} before mounting:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{mountpoint} was not mounted within {MOUNT_TIMEOUT:.0f} s:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(path: Path, characters: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-characters:]
    except OSError:
        return ""


def _lazy_unmount(mountpoint: Path) -> None:
    if _mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def _end_daemon(pid: int, mountpoint: Path) -> None:
    """The fusepager daemon (not our child: it runs in its own session) must be gone; it only
    gets a signal if /proc still shows it serving `mountpoint`."""
    deadline = time.monotonic() + 10
    for signal_number in (None, signal.SIGTERM, signal.SIGKILL):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return  # gone
        if os.fsencode(mountpoint) not in command:
            return  # the pid is someone else's now
        if signal_number is not None:
            os.kill(pid, signal_number)
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        deadline = time.monotonic() + 10


@contextmanager
def daemon_in(work: str | Path):
    """`fusepager mount` of a new store in the directory `work` (its store and mnt), listening
    for kernels: yields (store, mountpoint, the address kernels connect to)."""
    store, mountpoint = Path(work) / "store", Path(work) / "mnt"
    store.mkdir()
    mountpoint.mkdir()
    listening: list[str] = []
    with fusepager_mount(store, mountpoint, listening):
        yield store, mountpoint, listening[0]


@contextmanager
def fusepager_mount(store: Path, mountpoint: Path, listening: list[str] | None = None):
    """`fusepager mount STORE MNT` (in the background), unmounted and its daemon ended on exit,
    whatever happened.  Yields the daemon's pid; `listening`, if given, gets the address
    kernels connect to."""
    pid = None
    try:
        result = _fusepager("mount", str(store), str(mountpoint))
        found = re.search(r"\(pid (\d+)\)", result.stdout)
        pid = int(found[1]) if found else None
        if result.returncode != 0:
            raise BenchError(f"fusepager mount {store} {mountpoint} failed:\n{result.stdout}{result.stderr}")
        address = re.search(r"kernels connect to (\S+)", result.stdout)
        if listening is not None:
            if address is None:
                raise BenchError(f"fusepager mount did not say where kernels connect:\n{result.stdout}")
            listening.append(address[1])
        yield pid
    finally:
        if _mounted(mountpoint):
            _fusepager("umount", str(mountpoint))  # waits for the daemon to finish
        _lazy_unmount(mountpoint)
        if pid is not None:
            _end_daemon(pid, mountpoint)


def drop_caches() -> bool:
    """Write back, then drop Linux's clean page cache (all of it); False where not allowed."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def evict(path: Path) -> None:
    """Drop one file's cached pages (a FUSE file's own pages; its backing file keeps its own)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_throughput(path: Path, size: int) -> float:
    """MB/s of reading the whole file in 1 MiB reads; it must hold exactly `size` bytes."""
    buffer = bytearray(MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        total = 0
        start = time.perf_counter()
        while count := os.readv(fd, [buffer]):
            total += count
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    if total != size:
        raise BenchError(f"read {total} bytes of {path}, expected {size}")
    return total / elapsed / MB


def _fill(path: Path, size: int) -> bytes:
    """Write `size` bytes of random data (no holes) to `path` in 1 MiB writes; fsync makes the
    store record the size in meta.json.  The first MiB, to check reads against."""
    block = random.Random(1).randbytes(MiB)
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in range(0, size, MiB):
            piece = block[: min(MiB, size - offset)]
            if os.pwrite(fd, piece, offset) != len(piece):
                raise BenchError(f"short write to {path} at {offset}")
        os.fsync(fd)
    finally:
        os.close(fd)
    return block


# --- case: ping-pong -------------------------------------------------------------------------


class _BytesObject:
    """In-memory pager callbacks: the benchmarks measure the protocol, not a disk."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    async def read_pages(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    async def write_pages(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    async def report_extent(self) -> int:
        return len(self.data)

    async def unlock_pages(self, offset: int, length: int, access: int) -> None:
        pass

    async def pages_evicted(self, offset: int, length: int) -> None:
        pass


# --- case: fault-rate ------------------------------------------------------------------------


async def ping_pong_rate(round_trips: int) -> float:
    """Round trips per second between two trio tasks over a pair of memory channels."""
    to_server, server_in = trio.open_memory_channel(0)
    to_client, client_in = trio.open_memory_channel(0)

    async def server() -> None:
        async for item in server_in:
            await to_client.send(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        start = time.perf_counter()
        for index in range(round_trips):
            await to_server.send(index)
            await client_in.receive()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return round_trips / elapsed


async def fault_rate(pages: int, page_size: int = 4096) -> float:
    """Single-page faults per second: a task reads one byte of each of `pages` pages."""
    port = kernelsim.port_allocate("bench object")
    page = bytes(page_size)

    async def manager() -> None:
        async for received in port:
            message = received.message
            if isinstance(message, m.MemoryObjectDataRequest):
                calls.memory_object_data_supply(message.control, message.offset, page * (message.length // page_size))
            elif isinstance(message, m.MemoryObjectInit):
                calls.memory_object_ready(message.control, False, MEMORY_OBJECT_COPY_DELAY)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager)
        async with kernelsim.boot("bench", page_size, pages + 1, cluster_pages=1) as kernel:
            task = await kernel.task_create()
            address = await task.vm_map(port.make_send(), pages * page_size)
            await task.read(address, 1)  # init and ready are not part of the rate
            start = time.perf_counter()
            for index in range(1, pages):
                await task.read(address + index * page_size, 1)
            elapsed = time.perf_counter() - start
            assert kernel.stats.data_requests == pages
        nursery.cancel_scope.cancel()
    return (pages - 1) / elapsed

"""Case page-in: a kernel here pages an object in sequentially from a `fusepager mount` daemon,
vs `cat` of the same object's `data` through the mount.

Both go through the same daemon, the same pager and the same store file.  Before every timed
read the backing file is read once (so the disk plays no part: it is in Linux's page cache for
both) and the mount's own cached pages of `data` are evicted (posix_fadvise DONTNEED), so every
byte `cat` gets comes through the daemon, as every byte the kernel gets does (a fresh kernel each
run holds no page).  The two alternate which goes first.

The kernel asks for 256 pages (1 MiB) per memory_object_data_request: the mount's read-ahead,
so its requests are the size of the FUSE reads `cat` causes.  It has room for the whole object,
as Linux's page cache has: the figure is paging in, not pageout (stream-64 measures that).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

import kernelsim
from kernelsim import messages as m
from kernelsim.kernel import Kernel

from .common import (
    PROGRESS,
    BenchError,
    MiB,
    Result,
    _command,
    _fill,
    daemon_in,
    evict,
    progress,
    read_throughput,
)

T = TypeVar("T")
PAGE = 4096
CLUSTER_PAGES = 256  # 1 MiB: fusepager.mount.READAHEAD_KB, the size of the FUSE reads of `cat`


async def with_connected_kernel(
    address: str,
    object_name: str,
    work: Callable[[Kernel, kernelsim.SendRight], Awaitable[T]],
    *,
    kernel_name: str,
    memory_pages: int,
    cluster_pages: int,
) -> T:
    """Boot a kernel in this process, connected to the manager at `address` (a `fusepager mount`
    in another process) as `kernelsim run --connect` is; look `object_name` up by its name
    service and run `work(kernel, port)`.  The kernel then shuts down (it gives the object back)
    and the connection is drained and closed."""
    from kernelsim.transport import Address, Connection

    stream = await Address.parse(address).connect()
    connection = Connection(stream, local_name=kernel_name)
    async with trio.open_nursery() as nursery:
        await nursery.start(connection.run)
        if connection.peer_bootstrap is None:
            raise BenchError(f"the manager at {address} gave no name service")
        reply = kernelsim.port_allocate("lookup reply")
        connection.peer_bootstrap.send(m.NetnameLookUp(name=object_name.encode(), reply=reply.make_send_once()))
        answer = (await reply.receive()).message
        reply.destroy()
        if answer.port is None:
            raise BenchError(f"the manager has no object {object_name!r}")
        async with kernelsim.boot(kernel_name, PAGE, memory_pages, cluster_pages=cluster_pages) as kernel:
            result = await work(kernel, answer.port)
        with trio.move_on_after(30):
            await connection.drain()
        nursery.cancel_scope.cancel()
    return result


async def kernel_page_in(address: str, object_name: str, size: int, first: bytes, kernel_name: str) -> tuple[float, dict]:
    """MB/s of a task reading the whole object in 1 MiB reads, from vm_map (before the object's
    memory_object_init) to the last byte; and the kernel's counters."""

    async def work(kernel: Kernel, port: kernelsim.SendRight) -> tuple[float, dict]:
        task = await kernel.task_create()
        total = 0
        start = time.perf_counter()
        address_in_task = await task.vm_map(port, size)
        for offset in range(0, size, MiB):
            data = await task.read(address_in_task + offset, min(MiB, size - offset))
            if offset == 0 and data != first[: len(data)]:
                raise BenchError("the kernel read something else than was written")
            total += len(data)
        elapsed = time.perf_counter() - start
        if total != size:
            raise BenchError(f"the kernel read {total} bytes, expected {size}")
        stats = kernel.stats
        if stats.evictions or stats.data_returns:
            raise BenchError(f"the kernel paged out ({stats.evictions} evictions) while reading: give it more memory")
        return size / elapsed / 1e6, {"data_requests": stats.data_requests, "pages_requested": stats.pages_requested,
                                      "peak_resident": kernel.resident.peak}

    return await with_connected_kernel(address, object_name, work, kernel_name=kernel_name,
                                       memory_pages=roomy_memory(size), cluster_pages=CLUSTER_PAGES)


def roomy_memory(size: int) -> int:
    """Frames for a kernel that holds all `size` bytes without its pageout daemon waking (it
    wakes below 1/32 of memory free)."""
    pages = -(-size // PAGE)
    return pages + pages // 16 + 2 * CLUSTER_PAGES


def cat_throughput(path: Path, size: int) -> float:
    """MB/s of `cat PATH > /dev/null` (cat reads 128 KiB at a time), timed around the process."""
    start = time.perf_counter()
    result = subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise BenchError(f"cat {path} failed: {result.stderr.decode(errors='replace')}")
    return size / elapsed / 1e6


def prepare(backing: Path, data: Path, size: int) -> None:
    """The same page-cache state before each timed read: the backing file cached, the mount's
    pages of `data` evicted.  And a daemon at rest: no kernel of an earlier run still giving
    the object back (its pages, its terminate) while this one is timed."""
    kernels = data.parent / "kernels"
    deadline = time.monotonic() + 60
    while any(kernels.iterdir()):
        if time.monotonic() > deadline:
            raise BenchError(f"kernels of earlier runs still hold the object: {sorted(p.name for p in kernels.iterdir())}")
        time.sleep(0.01)
    read_throughput(backing, size)
    evict(data)


def make_object(mountpoint: Path, store: Path, name: str, size: int) -> tuple[Path, Path, bytes]:
    """An object of `size` random bytes, written through the mount; (data, backing, first MiB)."""
    progress(f"writing {size // MiB} MiB through the mount")
    (mountpoint / "objects" / name).mkdir()
    data = mountpoint / "objects" / name / "data"
    block = _fill(data, size)
    backing = store / "objects" / name / "data"
    if backing.stat().st_size != size:
        raise BenchError(f"the store holds {backing.stat().st_size} bytes of {name}, expected {size}")
    return data, backing, block


def case_page_in(args: argparse.Namespace) -> list[Result]:
    size = 16 * MiB if args.quick else 256 * MiB
    runs: dict[str, list[float]] = {"kernel": [], "cat": []}
    counters: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fusepager-bench-") as work:
        with daemon_in(work) as (store, mountpoint, address):
            data, backing, block = make_object(mountpoint, store, "big", size)
            # Untimed warm-ups: each path's first pass is its slowest (imports, allocations).
            progress("page-in: warm-up")
            trio.run(kernel_page_in, address, "big", size, block, "warmup")
            cat_throughput(data, size)
            task = PROGRESS.add_task(f"page-in: {size // MiB} MiB, kernel and cat", total=args.runs)
            for run in range(args.runs):
                order = ["kernel", "cat"] if run % 2 == 0 else ["cat", "kernel"]
                for name in order:
                    prepare(backing, data, size)
                    if name == "kernel":
                        rate, stats = trio.run(kernel_page_in, address, "big", size, block, f"pagein{run}")
                        counters.append(stats)
                    else:
                        rate = cat_throughput(data, size)
                    runs[name].append(rate)
                PROGRESS.advance(task)
    kernel, cat = statistics.median(runs["kernel"]), statistics.median(runs["cat"])
    size_text = f"{size // MiB} MiB"
    return [
        Result(
            "page-in",
            f"sequential page-in of {size_text} by a kernel here from a `fusepager mount` daemon (1 MiB task reads, "
            f"cluster {CLUSTER_PAGES} pages = 1 MiB; backing file cached, no page in the kernel before)",
            "MB/s", kernel,
            "`cat data` through the same mount (backing file cached, the mount's pages of `data` evicted first)", cat,
            kernel / cat, 0.5, args.runs, _command("page-in", args),
            details={"bytes": size, "cluster_pages": CLUSTER_PAGES, "kernel_memory_pages": roomy_memory(size),
                     "runs_MB_per_s": {name: [round(v, 1) for v in values] for name, values in runs.items()},
                     "kernel_counters": counters[0] if counters else None},
        )
    ]


ORDER = 3  # where the case comes in a full run (the numbering)
CASES = {"page-in": case_page_in}

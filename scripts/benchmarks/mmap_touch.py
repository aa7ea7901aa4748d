"""Case mmap-touch: a Linux program with `data` mmapped touches one byte per 4 KiB page, vs a
kernel task touching one byte per page of the same object through the daemon.

The Linux side is a process of its own (`python -c TOUCH_PROGRAM`), never a thread of a process
serving the mount.  Its rate is timed inside it, from mmap to the last touch.  The kernel side
is a kernel in this process connected to the `fusepager mount` daemon (as page-in's), its rate
timed from vm_map to the last touch.  The page cache is handled as in page-in: before each run
the backing file is read once (cached for both) and the mount's pages of `data` are evicted, so
every page reaches either side through the daemon.  Linux reads ahead 1 MiB on this mount and
maps the pages around a fault; the kernel's data requests are 256 pages (1 MiB) likewise.
Both sides add up the bytes they touched, and each sum is checked against the backing file's.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

import kernelsim
from kernelsim.kernel import Kernel

from .common import (
    PROGRESS,
    BenchError,
    MiB,
    Result,
    _command,
    daemon_in,
    progress,
)
from .page_in import (
    CLUSTER_PAGES,
    PAGE,
    make_object,
    prepare,
    roomy_memory,
    with_connected_kernel,
)

TOUCH_PROGRAM = """\
import mmap, os, sys, time
path, size, page = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
start = time.perf_counter()
memory = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
total = 0
for offset in range(0, size, page):
    total += memory[offset]
elapsed = time.perf_counter() - start
memory.close()
os.close(fd)
print(size // page / elapsed, total)
"""


def linux_touch_rate(path: Path, size: int) -> tuple[float, int]:
    """Pages per second (and the sum of the bytes touched) of a process that mmaps `path` and
    reads one byte per 4 KiB page."""
    result = subprocess.run([sys.executable, "-c", TOUCH_PROGRAM, str(path), str(size), str(PAGE)],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise BenchError(f"the mmap program failed:\n{result.stderr}")
    rate, total = result.stdout.split()
    return float(rate), int(total)


async def kernel_touch_rate(address: str, object_name: str, size: int, kernel_name: str) -> tuple[float, int]:
    """Pages per second (and the sum of the bytes touched) of a task reading one byte per page
    of the object, served by the daemon at `address`."""

    async def work(kernel: Kernel, port: kernelsim.SendRight) -> tuple[float, int]:
        task = await kernel.task_create()
        total = 0
        start = time.perf_counter()
        address_in_task = await task.vm_map(port, size)
        for offset in range(0, size, PAGE):
            total += (await task.read(address_in_task + offset, 1))[0]
        elapsed = time.perf_counter() - start
        if kernel.stats.evictions:
            raise BenchError(f"the kernel paged out ({kernel.stats.evictions} evictions) while touching: give it more memory")
        return size // PAGE / elapsed, total

    return await with_connected_kernel(address, object_name, work, kernel_name=kernel_name,
                                       memory_pages=roomy_memory(size), cluster_pages=CLUSTER_PAGES)


def touched_sum(path: Path, size: int) -> int:
    """The sum of the first byte of every page of the file, read directly."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ) as memory:
        return sum(memory[offset] for offset in range(0, size, PAGE))


def case_mmap_touch(args: argparse.Namespace) -> list[Result]:
    size = 16 * MiB if args.quick else 256 * MiB
    runs: dict[str, list[float]] = {"kernel": [], "linux": []}
    with tempfile.TemporaryDirectory(prefix="fusepager-bench-") as work:
        with daemon_in(work) as (store, mountpoint, address):
            data, backing, _ = make_object(mountpoint, store, "touched", size)
            expected = touched_sum(backing, size)
            progress("mmap-touch: warm-up")
            trio.run(kernel_touch_rate, address, "touched", size, "warmup")
            linux_touch_rate(data, size)
            task = PROGRESS.add_task(f"mmap-touch: {size // PAGE} pages, kernel and Linux", total=args.runs)
            for run in range(args.runs):
                for name in (["kernel", "linux"] if run % 2 == 0 else ["linux", "kernel"]):
                    prepare(backing, data, size)
                    if name == "kernel":
                        rate, total = trio.run(kernel_touch_rate, address, "touched", size, f"touch{run}")
                    else:
                        rate, total = linux_touch_rate(data, size)
                    if total != expected:
                        raise BenchError(f"{name}: the bytes touched add up to {total}, the backing file's to {expected}")
                    runs[name].append(rate)
                PROGRESS.advance(task)
    kernel, linux = statistics.median(runs["kernel"]), statistics.median(runs["linux"])
    pages = size // PAGE
    return [
        Result(
            "mmap-touch",
            f"page touches/s of a kernel task, one byte per page of a {size // MiB} MiB object ({pages} pages) served by "
            f"a `fusepager mount` daemon (kernel here, cluster {CLUSTER_PAGES} pages = 1 MiB)",
            "pages/s", kernel,
            "a Linux process touching one byte per 4 KiB page of the mount's `data`, mmapped (read-ahead 1 MiB); "
            "both: backing file cached, no page of the object cached before",
            linux, kernel / linux, 0.15, args.runs, _command("mmap-touch", args),
            details={"bytes": size, "pages": pages, "cluster_pages": CLUSTER_PAGES, "kernel_memory_pages": roomy_memory(size),
                     "runs_pages_per_s": {name: [round(v) for v in values] for name, values in runs.items()}},
        )
    ]


ORDER = 5  # where the case comes in a full run (the numbering)
CASES = {"mmap-touch": case_mmap_touch}

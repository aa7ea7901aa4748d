"""Case memory: the resident sets of the manager and of a kernel while the kernel touches
100,000 random pages of a 1 TiB sparse object.

The manager is a real `fusepager mount` daemon; the kernel is a process of its own, `kernelsim
run --connect ADDR --memory N --cluster 1` (fusepager.session.KernelProcess), driven on its
standard input: `map sparse 1T`, then one `read sparse+OFFSET 1` a page, each page of the 1 TiB
object chosen at random (no page twice), then `stat`.  The object is a hole throughout, so
every touch is a data_request answered with data_unavailable (a zero-filled page); the kernel
has far fewer frames than pages touched, so its pageout daemon drops pages all along.  While
the kernel is still running, after the last answer, VmHWM (the peak resident set) and VmRSS
are read from /proc/PID/status of both processes.  Each run has a daemon and a kernel of its
own, so a peak is that run's.  The ceilings: 150 MiB for the manager, the kernel's memory limit
plus 64 MiB for the kernel.  Lower is better: the ratio is the figure over its ceiling and the
target is a ratio of at most 1.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
from pathlib import Path

from .common import (
    PROGRESS,
    BenchError,
    MiB,
    Result,
    _command,
    fusepager_mount,
    progress,
)

PAGE = 4096
OBJECT_SIZE = 1 << 40  # 1 TiB
MANAGER_CEILING_MIB = 150
KERNEL_HEADROOM_MIB = 64


def memory_status(pid: int) -> dict[str, float]:
    """VmHWM and VmRSS of a process, in MiB."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(value.split()[0]) / 1024  # kB
    return found


def touch_pages(store: Path, mountpoint: Path, work: Path, touches: int, memory_pages: int, seed: int, name: str) -> dict:
    """One run: a daemon, a 1 TiB sparse object, a kernel process touching `touches` random
    pages of it; the memory figures of both processes after the last touch."""
    from fusepager.session import KernelProcess, SessionError

    listening: list[str] = []
    with fusepager_mount(store, mountpoint, listening) as daemon:
        if daemon is None:
            raise BenchError("fusepager mount did not say its pid")
        (mountpoint / "objects" / "sparse").mkdir()
        os.truncate(mountpoint / "objects" / "sparse" / "data", OBJECT_SIZE)
        manager_before = memory_status(daemon)
        pages = random.Random(seed).sample(range(OBJECT_SIZE // PAGE), touches)
        try:
            with KernelProcess(listening[0], name, memory_pages=memory_pages, cluster_pages=1, workdir=work) as kernel:
                kernel.command("map sparse 1T")
                # The commands go in from a thread while the answers are read here, so the pipe
                # never holds up the kernel.
                lines = [f"read sparse+{page * PAGE} 1\n" for page in pages]

                def feed() -> None:
                    assert kernel.process.stdin is not None
                    for start in range(0, len(lines), 1000):
                        kernel.process.stdin.write("".join(lines[start : start + 1000]))
                    kernel.process.stdin.flush()

                feeder = threading.Thread(target=feed, daemon=True)
                feeder.start()
                bar = PROGRESS.add_task(f"memory: {name} touching pages", total=touches)
                for index in range(touches):
                    answer = kernel.answer()
                    if not answer.startswith("ok read ") or not answer.endswith(" 1 00"):
                        raise BenchError(f"{lines[index].strip()!r} -> {answer}")
                    if index % 1000 == 999:
                        PROGRESS.advance(bar, 1000)
                PROGRESS.remove_task(bar)
                feeder.join()
                stat = dict(word.split("=", 1) for word in kernel.command("stat").split()[2:])
                kernel_figures = memory_status(kernel.pid)
                manager_figures = memory_status(daemon)
        except SessionError as error:
            raise BenchError(f"the kernel process failed: {error}") from None
    if int(stat["peak"]) > memory_pages:
        raise BenchError(f"the kernel held {stat['peak']} pages, over its limit of {memory_pages}")
    if int(stat["data_requests"]) < touches:
        raise BenchError(f"{touches} touches made only {stat['data_requests']} data requests")
    return {"manager": manager_figures, "manager_before": manager_before, "kernel": kernel_figures,
            "kernel_stat": {key: int(stat[key]) for key in ("peak", "limit", "data_requests", "evictions", "zero_fills")}}


def case_memory(args: argparse.Namespace) -> list[Result]:
    touches = 2_000 if args.quick else 100_000
    memory_pages = 1024 if args.quick else 16384
    limit_mib = memory_pages * PAGE / MiB
    kernel_ceiling = limit_mib + KERNEL_HEADROOM_MIB
    runs = []
    with tempfile.TemporaryDirectory(prefix="fusepager-bench-") as work:
        task = PROGRESS.add_task(f"memory: {touches:,} random pages of 1 TiB", total=args.runs)
        for run in range(args.runs):
            store, mountpoint = Path(work) / f"store{run}", Path(work) / f"mnt{run}"
            store.mkdir()
            mountpoint.mkdir()
            progress(f"memory: run {run + 1}/{args.runs}")
            runs.append(touch_pages(store, mountpoint, Path(work), touches, memory_pages, seed=run, name=f"mem{run}"))
            PROGRESS.advance(task)

    def median(who: str, key: str) -> float:
        return statistics.median(r[who][key] for r in runs)

    command = _command("memory", args)
    details = {
        "touches": touches, "object_bytes": OBJECT_SIZE, "kernel_memory_pages": memory_pages, "kernel_limit_MiB": limit_mib,
        "kernel": "a process of its own: kernelsim run --connect ADDR --memory "
                  f"{memory_pages} --cluster 1, driven on stdin by `map sparse 1T` and `read sparse+OFFSET 1` commands",
        "runs": runs,
    }
    what = f"{touches:,} random pages of a 1 TiB sparse object touched by a kernel process"
    rows = [
        ("manager", "VmHWM", f"manager (`fusepager mount` daemon) peak resident set (VmHWM), {what}; lower is better",
         f"ceiling: {MANAGER_CEILING_MIB} MiB", MANAGER_CEILING_MIB, 1.0),
        ("manager", "VmRSS", "manager resident set (VmRSS) after the touches; lower is better",
         f"ceiling: {MANAGER_CEILING_MIB} MiB", MANAGER_CEILING_MIB, 1.0),
        ("kernel", "VmHWM", (f"kernel process peak resident set (VmHWM), memory limit {memory_pages} pages = {limit_mib:.0f} MiB, "
                             f"{what}; lower is better"), f"ceiling: its limit + {KERNEL_HEADROOM_MIB} MiB", kernel_ceiling, 1.0),
        ("kernel", "VmRSS", "kernel process resident set (VmRSS) after the touches; lower is better",
         f"ceiling: its limit + {KERNEL_HEADROOM_MIB} MiB", kernel_ceiling, 1.0),
    ]
    return [
        Result("memory", figure, "MiB", median(who, key), anchor, ceiling, median(who, key) / ceiling, target, args.runs,
               command, details=details, lower_is_better=True)
        for who, key, figure, anchor, ceiling, target in rows
    ]


ORDER = 7  # where the case comes in a full run (the numbering)
CASES = {"memory": case_memory}

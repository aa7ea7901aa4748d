"""Case fault-rate: in-process single-page faults vs a memory-channel ping-pong.

Two figures against the same anchor: faults served by fusepager's engine over the file store
(the mount's manager without FUSE or a socket: the service rate the target is about), and
faults served by a manager that only answers (what the kernel and the message layer cost)."""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import trio

import kernelsim

from .common import Result, _command, fault_rate, median_of, ping_pong_rate


async def engine_fault_rate(pages: int, root: str) -> float:
    """Single-page faults per second of a task whose object is served by `FileManager` →
    `Pager` → `StoreCallbacks` → `FileStore`, all in this process."""
    from fusepager.manager import FileManager
    from fusepager.store import FileStore

    os.makedirs(root)
    store = FileStore(root)
    manager = FileManager(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        manager.create(b"faults")
        store.open(b"faults").write(0, random.Random(1).randbytes(pages * 4096))
        right = await manager.resolve("faults")
        async with kernelsim.boot("bench", 4096, pages + 1, cluster_pages=1) as kernel:
            task = await kernel.task_create()
            address = await task.vm_map(right, pages * 4096)
            await task.read(address, 1)  # init and ready are not part of the rate
            start = time.perf_counter()
            for index in range(1, pages):
                await task.read(address + index * 4096, 1)
            elapsed = time.perf_counter() - start
            assert kernel.stats.data_requests == pages
        nursery.cancel_scope.cancel()
    manager.close()
    return (pages - 1) / elapsed


def case_fault_rate(args: argparse.Namespace) -> list[Result]:
    pages = 500 if args.quick else 20000
    with tempfile.TemporaryDirectory(prefix="fusepager-bench-") as work:
        runs = iter(range(args.runs))
        engine = median_of(
            args.runs, "fault-rate: faults served by the engine",
            lambda: trio.run(engine_fault_rate, pages, os.path.join(work, f"store{next(runs)}")),
        )  # fmt: skip
    trivial = median_of(args.runs, "fault-rate: faults served by a manager that only answers", lambda: trio.run(fault_rate, pages))
    ping = median_of(args.runs, "fault-rate: memory-channel ping-pong", lambda: trio.run(ping_pong_rate, pages))
    common = dict(case="fault-rate", unit="faults/s", anchor="trio memory-channel ping-pong", anchor_value=ping,
                  anchor_unit="round trips/s", runs=args.runs, command=_command("fault-rate", args))  # fmt: skip
    return [
        Result(figure=f"single-page faults/s served by the engine over the file store ({pages} pages, in-process)",
               value=engine, ratio=engine / ping, target=0.5, **common),  # fmt: skip
        Result(figure=f"single-page faults/s served by a manager that only answers ({pages} pages, in-process)",
               value=trivial, ratio=trivial / ping, target=None, **common),  # fmt: skip
    ]


ORDER = 1  # where the case comes in a full run (the numbering)
CASES = {"fault-rate": case_fault_rate}

"""Case ping-pong: write ownership of one page moving between two kernels."""

from __future__ import annotations

import argparse
import time

import trio

import kernelsim

from .common import Result, _BytesObject, _command, fault_rate, median_of


async def ownership_rate(transfers: int) -> float:
    from fusepager.pager import Pager

    pager = Pager(_BytesObject(1 << 20), name="pingpong")
    async with trio.open_nursery() as nursery:
        await nursery.start(pager.serve)
        async with kernelsim.boot("k1", 4096, 64) as k1, kernelsim.boot("k2", 4096, 64) as k2:
            tasks = [await kernel.task_create() for kernel in (k1, k2)]
            addresses = [await task.vm_map(pager.send_right(), 1 << 20) for task in tasks]
            await tasks[1].write(addresses[1], b"\0")
            start = time.perf_counter()
            for index in range(transfers):
                which = index % 2
                await tasks[which].write(addresses[which] + 8, index.to_bytes(4, "little"))
            elapsed = time.perf_counter() - start
            final = await tasks[0].read(addresses[0] + 8, 4)
            assert int.from_bytes(final, "little") == transfers - 1, "a transfer lost a write"
        nursery.cancel_scope.cancel()
    return transfers / elapsed


def case_ping_pong(args: argparse.Namespace) -> list[Result]:
    transfers = 200 if args.quick else 5000
    rate = median_of(args.runs, "ping-pong: ownership transfers", lambda: trio.run(ownership_rate, transfers))
    faults = median_of(args.runs, "ping-pong: single-page faults", lambda: trio.run(fault_rate, transfers))
    return [
        Result("ping-pong", f"write ownership of one page between two kernels ({transfers} transfers)", "transfers/s",
               rate, "single-page fault rate", faults, rate / faults, None, args.runs, _command("ping-pong", args), anchor_unit="faults/s")
    ]


ORDER = 6  # where the case comes in a full run (the numbering)
CASES = {"ping-pong": case_ping_pong}

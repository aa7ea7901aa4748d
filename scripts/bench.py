"""fusepager benchmarks: each case measured beside the anchor it is judged against, in one run.

Run with `scripts/bench` (which sets up first).  Every figure is the median of --runs runs; the
ratio to the anchor is what matters, since the machine is shared and absolute figures drift.
Results go to bench-results/bench.json and a Markdown table on stdout.

Cases:
  fault-rate   single-page faults per second of a task touching N pages served by an
               in-process manager, vs a trio memory-channel ping-pong (round trips per second)
               between two tasks.  Target ([6/8]): ratio >= 0.5.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

import kernelsim
from kernelsim import calls
from kernelsim import messages as m
from kernelsim.interface import MEMORY_OBJECT_COPY_DELAY

ROOT = Path(__file__).resolve().parent.parent


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


def progress(text: str) -> None:
    print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)


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
            task = kernel.task_create()
            address = task.vm_map(port.make_send(), pages * page_size)
            await task.read(address, 1)  # init and ready are not part of the rate
            start = time.perf_counter()
            for index in range(1, pages):
                await task.read(address + index * page_size, 1)
            elapsed = time.perf_counter() - start
            assert kernel.stats.data_requests == pages
        nursery.cancel_scope.cancel()
    return (pages - 1) / elapsed


def median_of(runs: int, label: str, measure: Callable[[], float]) -> float:
    values = []
    for run in range(runs):
        progress(f"{label}: run {run + 1}/{runs}")
        values.append(measure())
    return statistics.median(values)


def case_fault_rate(args: argparse.Namespace) -> Result:
    pages = 500 if args.quick else 20000
    command = f"scripts/bench --case fault-rate --runs {args.runs}" + (" --quick" if args.quick else "")
    faults = median_of(args.runs, "fault-rate: task faults", lambda: trio.run(fault_rate, pages))
    ping = median_of(args.runs, "fault-rate: memory-channel ping-pong", lambda: trio.run(ping_pong_rate, pages))
    return Result(
        case="fault-rate",
        figure=f"single-page faults/s ({pages} pages, in-process manager)",
        unit="faults/s",
        value=faults,
        anchor="trio memory-channel ping-pong",
        anchor_value=ping,
        ratio=faults / ping,
        target=0.5,
        runs=args.runs,
        command=command,
    )


CASES = {"fault-rate": case_fault_rate}


def markdown(results: list[Result]) -> str:
    lines = [
        "| case | figure | value | anchor | anchor value | ratio | target |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        target = f"≥ {r.target}" if r.target is not None else ""
        lines.append(
            f"| {r.case} | {r.figure} | {r.value:,.0f} {r.unit} | {r.anchor} | {r.anchor_value:,.0f} | "
            f"{r.ratio:.2f} | {target} |"
        )
    lines.append("")
    lines.extend(f"- {r.case}: `{r.command}`" for r in results)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run only this case (repeatable)")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; the median is reported (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results", help="where bench.json goes")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    results = []
    for name in args.case or list(CASES):
        results.append(CASES[name](args))
    progress("")
    print(markdown(results))
    args.output.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "results": [asdict(r) for r in results],
    }
    (args.output / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Case fault-rate: in-process single-page faults vs a memory-channel ping-pong."""

from __future__ import annotations

import argparse

import trio

from .common import Result, fault_rate, median_of, ping_pong_rate


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
        anchor_unit="round trips/s",
        target=0.5,
        runs=args.runs,
        command=command,
    )


ORDER = 1  # where the case comes in a full run (the numbering)
CASES = {"fault-rate": lambda args: [case_fault_rate(args)]}

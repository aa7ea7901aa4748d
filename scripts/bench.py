"""fusepager benchmarks: each case measured beside the anchor it is judged against, in one run.

Run with `scripts/bench` (which sets up first).  Every figure is the median of --runs runs; the
ratio to the anchor is what matters, since the machine is shared and absolute figures drift.
Results go to bench-results/bench.json and a Markdown table on stdout.

Cases:
  fault-rate   single-page faults per second of a task touching N pages served by an
               in-process manager, vs a trio memory-channel ping-pong (round trips per second)
               between two tasks.  Target: ratio >= 0.5.
  mount        an object's `data` through `fusepager mount`, vs scripts/benchmarks/bare_fs.py (a
               bare pyfuse3 file system serving one cached buffer: the ceiling), pyfuse3's
               examples/passthroughfs.py (from pyfuse3's source distribution, downloaded at
               benchmark time into bench-results/cache, never committed) and the raw file:
               sequential 1 MiB reads of 1 GiB (page cache dropped / backing file cached / kept),
               20,000 random 4 KiB reads, a sequential 1 GiB write (O_WRONLY, open to close, no
               fsync).  Targets: reads >= 0.8x bare and >= 2x the example; write >= 1.5x the
               example.
  ping-pong    write ownership of one page moving between two kernels (4 KiB pages), each
               write taking the page from the other: transfers per second, beside the
               single-page fault rate.
  cross-process  single-page faults per second of a kernel in this process served by a
               `fusepager mount` in another (over its Unix socket), vs a trio socket
               ping-pong between two processes carrying the same sizes (a request of 64
               bytes, an answer of one page).  Target for [6/8]: ratio >= 0.6.
  stream-64    a kernel limited to 64 resident pages writes then reads a 64 MiB object through
               the engine and the file store (pageout all the way), vs writing then reading the
               same bytes in a raw file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import shlex
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import benchmarks
import trio
from benchmarks.common import PROGRESS, ROOT, BenchError
from benchmarks.cross_process import _pong_server
from benchmarks.report import chart, markdown


def discover_cases() -> dict:
    """Every module of benchmarks/ with CASES (name -> function returning Results), in ORDER."""
    found = []
    for info in pkgutil.iter_modules(benchmarks.__path__):
        module = importlib.import_module(f"benchmarks.{info.name}")
        if hasattr(module, "CASES"):
            found.append((module.ORDER, info.name, module.CASES))
    cases = {}
    for _, _, module_cases in sorted(found):
        cases.update(module_cases)
    return cases


CASES = discover_cases()


def _interrupted(signal_number: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal_number}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run only this case (repeatable)")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; the median is reported (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results", help="where bench.json, bench.md and bench.png go")
    parser.add_argument(
        "--cache", type=Path, default=ROOT / "bench-results" / "cache", help="where downloaded comparison programs are kept"
    )
    parser.add_argument("--pong-server", metavar="PATH", help=argparse.SUPPRESS)  # cross-process's other process
    args = parser.parse_args(argv)
    if args.pong_server:
        trio.run(_pong_server, args.pong_server)
        return 0
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    signal.signal(signal.SIGTERM, _interrupted)  # so that cases unmount what they mounted
    results = []
    names = args.case or list(CASES)
    with PROGRESS:
        overall = PROGRESS.add_task("cases", total=len(names))
        for name in names:
            PROGRESS.update(overall, description=f"case {name}")
            try:
                results.extend(CASES[name](args))
            except BenchError as error:
                PROGRESS.stop()
                print(f"scripts/bench: {name}: {error}", file=sys.stderr)
                return 1
            PROGRESS.advance(overall)
    command = "scripts/bench " + " ".join(shlex.quote(word) for word in (argv if argv is not None else sys.argv[1:]))
    table = markdown(results)
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "results": [dict(asdict(r), met=r.met) for r in results],
    }
    (args.output / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / "bench.md").write_text(f"{table}\n\nMade by `{command}` on {report['date']}.\n")
    chart(results, args.output / "bench.png", f"{command}\n{report['date']} · {platform.platform()} · {os.cpu_count()} CPUs")
    print(f"\nwrote {args.output / 'bench.json'}, bench.md and bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

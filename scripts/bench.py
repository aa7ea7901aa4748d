"""fusepager benchmarks: each case measured beside the anchor it is judged against, in one run.

Run with `scripts/bench` (which sets up first).  Every figure is the median of --runs runs; the
ratio to the anchor is what matters, since the machine is shared and absolute figures drift.
Results go to bench-results/bench.json and a Markdown table on stdout.

Cases:
  fault-rate   single-page faults per second of a task touching N pages served by an
               in-process manager, vs a trio memory-channel ping-pong (round trips per second)
               between two tasks.  Target: ratio >= 0.5.
  mount-read   sequential read of a 1 GiB object's `data` through the mount, vs the raw backing
               file and vs pyfuse3's examples/passthroughfs.py over the same file (downloaded
               from pyfuse3's source distribution at benchmark time, cached in bench-results/).
               Target: >= 2x the passthrough example.
  ping-pong    write ownership of one page moving between two kernels (4 KiB pages), each
               write taking the page from the other: transfers per second, beside the
               single-page fault rate.
  stream-64    a kernel limited to 64 resident pages writes then reads a 64 MiB object through
               the engine and the file store (pageout all the way), vs writing then reading the
               same bytes in a raw file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
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


def _command(case: str, args: argparse.Namespace) -> str:
    return f"scripts/bench --case {case} --runs {args.runs}" + (" --quick" if args.quick else "")


# --- case: mount-read ------------------------------------------------------------------------

MiB = 1 << 20
VENV_BIN = Path(sys.executable).parent


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300)


def _wait_mounted(mountpoint: Path, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/mounts") as mounts:
            if any(line.split()[1] == str(mountpoint) for line in mounts):
                return
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with status {process.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{mountpoint} was not mounted within {timeout} s")


def _unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def read_throughput(path: Path, uncached: bool = False) -> float:
    """MB/s of reading the whole file in 1 MiB reads.  The backing file is in the page cache
    for every contender (each is read once before it is timed); `uncached` first drops the
    contender's own cached pages (POSIX_FADV_DONTNEED), so every read goes through FUSE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if uncached:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        total = 0
        start = time.perf_counter()
        while chunk := os.read(fd, MiB):
            total += len(chunk)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return total / elapsed / 1e6


def passthrough_example(cache: Path) -> Path:
    """pyfuse3's own examples/passthroughfs.py, from the source distribution of the installed
    pyfuse3 (downloaded once into `cache`; never part of the repository)."""
    import pyfuse3

    version = pyfuse3.__version__
    target = cache / f"passthroughfs-{version}.py"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        progress(f"mount-read: downloading pyfuse3 {version}'s source distribution for passthroughfs.py")
        _run(str(VENV_BIN / "pip"), "download", "--no-deps", "--no-binary", ":all:", f"pyfuse3=={version}", "-d", download)
        (archive,) = Path(download).glob("pyfuse3-*.tar.gz")
        with tarfile.open(archive) as tar:
            member = tar.extractfile(f"pyfuse3-{version}/examples/passthroughfs.py")
            assert member is not None
            target.write_bytes(member.read())
    return target


def case_mount_read(args: argparse.Namespace) -> list[Result]:
    size = 32 * MiB if args.quick else 1024 * MiB
    example = passthrough_example(args.cache)
    with tempfile.TemporaryDirectory(prefix="fusepager-bench-") as work:
        work_path = Path(work)
        store, mnt, mnt2 = work_path / "store", work_path / "mnt", work_path / "mnt2"
        for directory in (store, mnt, mnt2):
            directory.mkdir()
        passthrough = None
        try:
            progress("mount-read: preparing the object")
            _run(str(VENV_BIN / "fusepager"), "mount", str(store), str(mnt))
            (mnt / "objects" / "big").mkdir()
            _run(str(VENV_BIN / "fusepager"), "umount", str(mnt))
            backing = store / "objects" / "big" / "data"
            block = random.Random(1).randbytes(MiB)
            with open(backing, "wb") as data:
                for _ in range(size // MiB):
                    data.write(block)
            _run(str(VENV_BIN / "fusepager"), "mount", str(store), str(mnt))
            passthrough = subprocess.Popen(
                [sys.executable, str(example), str(backing.parent), str(mnt2)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            _wait_mounted(mnt2, passthrough)
            contenders = {"mount": mnt / "objects/big/data", "raw": backing, "passthrough": mnt2 / "data"}
            for path in contenders.values():
                read_throughput(path)  # warm the backing file's cache, check it reads
            figures = {
                name: median_of(args.runs, f"mount-read: {name}", lambda path=path: read_throughput(path))
                for name, path in contenders.items()
            }
            uncached = {
                name: median_of(args.runs, f"mount-read: {name}, uncached", lambda path=path: read_throughput(path, uncached=True))
                for name, path in contenders.items()
                if name != "raw"
            }
        finally:
            _unmount(mnt2)
            if passthrough is not None:
                try:
                    passthrough.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    passthrough.kill()
            subprocess.run([str(VENV_BIN / "fusepager"), "umount", str(mnt)], capture_output=True)
            _unmount(mnt)
    label = f"sequential read of {size // MiB} MiB of data, Linux's cache kept (no kernel writes it)"
    cold = f"sequential read of {size // MiB} MiB of data, every read through FUSE"
    command = _command("mount-read", args)
    return [
        Result("mount-read", label, "MB/s", figures["mount"], "pyfuse3 passthroughfs.py", figures["passthrough"],
               figures["mount"] / figures["passthrough"], 2.0, args.runs, command),
        Result("mount-read", label, "MB/s", figures["mount"], "raw backing file", figures["raw"],
               figures["mount"] / figures["raw"], None, args.runs, command),
        Result("mount-read", cold, "MB/s", uncached["mount"], "pyfuse3 passthroughfs.py, uncached", uncached["passthrough"],
               uncached["mount"] / uncached["passthrough"], 2.0, args.runs, command),
    ]


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


async def ownership_rate(transfers: int) -> float:
    from fusepager.pager import Pager

    pager = Pager(_BytesObject(1 << 20), name="pingpong")
    async with trio.open_nursery() as nursery:
        await nursery.start(pager.serve)
        async with kernelsim.boot("k1", 4096, 64) as k1, kernelsim.boot("k2", 4096, 64) as k2:
            tasks = [kernel.task_create() for kernel in (k1, k2)]
            addresses = [task.vm_map(pager.send_right(), 1 << 20) for task in tasks]
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
               rate, "single-page fault rate", faults, rate / faults, None, args.runs, _command("ping-pong", args))
    ]


# --- case: stream-64 -------------------------------------------------------------------------


async def stream_throughput(size: int, directory: Path) -> float:
    from fusepager.manager import StoreCallbacks
    from fusepager.pager import Pager
    from fusepager.store import FileStore

    store = FileStore(directory)
    stored = store.create(b"stream")
    stored.truncate(size)
    pager = Pager(StoreCallbacks(stored), name="stream", notify_on_evict=True)
    chunk = random.Random(2).randbytes(MiB)
    async with trio.open_nursery() as nursery:
        await nursery.start(pager.serve)
        async with kernelsim.boot("s1", 4096, 64) as kernel:
            task = kernel.task_create()
            address = task.vm_map(pager.send_right(), size)
            start = time.perf_counter()
            for offset in range(0, size, MiB):
                await task.write(address + offset, chunk)
            for offset in range(0, size, MiB):
                assert await task.read(address + offset, MiB) == chunk
            elapsed = time.perf_counter() - start
            assert kernel.resident.peak <= 64
        nursery.cancel_scope.cancel()
    store.remove(b"stream")
    store.close()
    return 2 * size / elapsed / 1e6


def raw_stream_throughput(size: int, directory: Path) -> float:
    chunk = random.Random(2).randbytes(MiB)
    path = directory / "raw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        start = time.perf_counter()
        for offset in range(0, size, MiB):
            os.pwrite(fd, chunk, offset)
        for offset in range(0, size, MiB):
            assert os.pread(fd, MiB, offset) == chunk
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()
    return 2 * size / elapsed / 1e6


def case_stream_64(args: argparse.Namespace) -> list[Result]:
    size = 4 * MiB if args.quick else 64 * MiB
    with tempfile.TemporaryDirectory(prefix="fusepager-bench-") as work:
        engine = median_of(args.runs, "stream-64: kernel with 64 pages", lambda: trio.run(stream_throughput, size, Path(work)))
        raw = median_of(args.runs, "stream-64: raw file", lambda: raw_stream_throughput(size, Path(work)))
    return [
        Result("stream-64", f"write then read {size // MiB} MiB through a kernel limited to 64 pages", "MB/s",
               engine, "the same in a raw file", raw, engine / raw, None, args.runs, _command("stream-64", args))
    ]


CASES = {
    "fault-rate": lambda args: [case_fault_rate(args)],
    "mount-read": case_mount_read,
    "ping-pong": case_ping_pong,
    "stream-64": case_stream_64,
}


def markdown(results: list[Result]) -> str:
    lines = [
        "| case | figure | value | anchor | anchor value | ratio | target |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        target = f"≥ {r.target}" if r.target is not None else ""
        lines.append(
            f"| {r.case} | {r.figure} | {r.value:,.0f} {r.unit} | {r.anchor} | {r.anchor_value:,.0f} {r.unit} | "
            f"{r.ratio:.2f} | {target} |"
        )
    lines.append("")
    commands = dict.fromkeys(f"- {r.case}: `{r.command}`" for r in results)
    lines.extend(commands)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run only this case (repeatable)")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; the median is reported (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results", help="where bench.json goes")
    parser.add_argument(
        "--cache", type=Path, default=ROOT / "bench-results" / "cache", help="where downloaded comparison programs are kept"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    results = []
    for name in args.case or list(CASES):
        results.extend(CASES[name](args))
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

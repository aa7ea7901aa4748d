"""Case stream-64: a kernel limited to 64 pages streams an object through the engine and store."""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import trio

import kernelsim

from .common import MiB, Result, _command, median_of


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
            task = await kernel.task_create()
            address = await task.vm_map(pager.send_right(), size)
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


ORDER = 8  # where the case comes in a full run (the numbering)
CASES = {"stream-64": case_stream_64}

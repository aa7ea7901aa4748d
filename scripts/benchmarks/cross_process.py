"""Case cross-process: a kernel here, its manager a `fusepager mount` in another process."""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

import kernelsim
from kernelsim import messages as m

from .common import (
    ROOT,
    BenchError,
    Result,
    _command,
    daemon_in,
    median_of,
)

PONG_REQUEST = 64


async def _pong_server(path: str) -> None:
    """The other process of the socket ping-pong: answer each 64-byte request with a page."""
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    print("listening", flush=True)
    stream = trio.SocketStream((await listener.accept())[0])
    answer = bytes(4096)
    buffered = 0
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buffered += len(data)
        while buffered >= PONG_REQUEST:
            buffered -= PONG_REQUEST
            await stream.send_all(answer)


async def socket_ping_pong_rate(path: str, round_trips: int) -> float:
    """Round trips per second with `_pong_server` in another process: a request of 64 bytes,
    an answer of 4096, one at a time."""
    stream = await trio.open_unix_socket(path)
    request = bytes(PONG_REQUEST)

    async def round_trip() -> None:
        await stream.send_all(request)
        got = 0
        while got < 4096:
            got += len(await stream.receive_some(65536))

    await round_trip()
    start = time.perf_counter()
    for _ in range(round_trips):
        await round_trip()
    elapsed = time.perf_counter() - start
    await stream.aclose()
    return round_trips / elapsed


def ping_pong_between_processes(round_trips: int, directory: Path) -> float:
    path = str(directory / "pong.sock")
    server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "bench.py"), "--pong-server", path], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        return trio.run(socket_ping_pong_rate, path, round_trips)
    finally:
        server.kill()
        server.wait()
        os.unlink(path)


async def cross_process_fault_rate(address: str, name: str, pages: int) -> float:
    """Single-page faults per second of a kernel here, its object served by the manager at
    `address` (another process): one byte read in each of `pages` pages."""
    from kernelsim.transport import Address, Connection

    stream = await Address.parse(address).connect()
    connection = Connection(stream, local_name="bench")
    async with trio.open_nursery() as nursery:
        await nursery.start(connection.run)
        reply = kernelsim.port_allocate("lookup reply")
        connection.peer_bootstrap.send(m.NetnameLookUp(name=name.encode(), reply=reply.make_send_once()))
        answer = (await reply.receive()).message
        if answer.port is None:
            raise BenchError(f"the manager has no object {name!r}")
        async with kernelsim.boot("bench", 4096, pages + 1, cluster_pages=1) as kernel:
            task = await kernel.task_create()
            address_in_task = await task.vm_map(answer.port, pages * 4096)
            await task.read(address_in_task, 1)  # init and ready are not part of the rate
            start = time.perf_counter()
            for index in range(1, pages):
                await task.read(address_in_task + index * 4096, 1)
            elapsed = time.perf_counter() - start
            assert kernel.stats.data_requests == pages
        with trio.move_on_after(10):
            await connection.drain()
        nursery.cancel_scope.cancel()
    return (pages - 1) / elapsed


def case_cross_process(args: argparse.Namespace) -> list[Result]:
    pages = 500 if args.quick else 10000
    with tempfile.TemporaryDirectory(prefix="fusepager-bench-") as work:
        with daemon_in(work) as (store, mountpoint, address):
            objects = mountpoint / "objects"
            names = []
            for run in range(args.runs):
                # A fresh object each run: no page of it may be cached in a kernel already.
                name = f"faults{run}"
                (objects / name).mkdir()
                with open(objects / name / "data", "wb") as data:
                    data.write(random.Random(run).randbytes(pages * 4096))
                names.append(name)
            runs = iter(names)
            faults = median_of(args.runs, "cross-process: kernel faults served by the mount",
                               lambda: trio.run(cross_process_fault_rate, address, next(runs), pages))
        ping = median_of(args.runs, "cross-process: trio socket ping-pong", lambda: ping_pong_between_processes(pages, Path(work)))
    return [
        Result("cross-process", f"single-page faults/s, kernel and manager in two processes ({pages} pages)", "faults/s",
               faults, "trio socket ping-pong between two processes (64 B out, 4 KiB back)", ping, faults / ping, 0.6,
               args.runs, _command("cross-process", args), anchor_unit="round trips/s")
    ]


ORDER = 2  # where the case comes in a full run (the numbering)
CASES = {"cross-process": case_cross_process}

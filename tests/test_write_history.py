"""Issue 14: every writer at once on the same bytes, checked against real time.

A program with `data` mmapped MAP_SHARED (tests/mmap_program.py), a `write(2)` writer (through
a cached read-write descriptor and a direct write-only one), two kernel processes (4 KiB and
16 KiB pages) and `echo sync > ctl` interleave for ROUNDS rounds on overlapping bytes of a few
pages.  Every write puts a value unique to it and is recorded with when it began and when its
writer was told it was done (msync returned; write(2) returned; the kernel's console said ok).
Afterwards what `data` holds (after a last sync) and what each kernel reads must be, cell by
cell, the value of a write that may have come last in an order consistent with real time
(tests/history.py): a write acknowledged before another began may never be undone by it.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time

import pytest

from fusepager.session import KernelProcess, MountSession
from history import CELL, Write, cell_value, check
from mmap_program import MmapProgram
from mounting import sh

PAGE = 4096
ROUNDS = 240
SIZE = 256 * 1024
REGION = (64 * 1024, 96 * 1024)  # two of k2's 16 KiB pages, eight of Linux's and k1's
HOT = (0, 8, 200, 1024, 2048, PAGE - 8)  # offsets in a page where writes pile up
BARRIER_TIMEOUT = 120.0
SEED = int(os.environ.get("FUSEPAGER_SEED", "20261127"))


def _data_bytes(path, offset: int, length: int) -> bytes:
    return subprocess.run(
        ["dd", f"if={path}", f"bs={length}", f"skip={offset}", "iflag=skip_bytes", "count=1", "status=none"],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip


class History:
    """The writes, numbered from 1 in the order they were issued (threads share it)."""

    def __init__(self) -> None:
        self.writes: list[Write] = []
        self._lock = threading.Lock()
        self._next = 1

    def new_value(self, length_in_cells: int) -> bytes:
        with self._lock:
            value, self._next = cell_value(self._next), self._next + 1
        return value * length_in_cells

    def add(self, write: Write) -> None:
        with self._lock:
            self.writes.append(write)


def _random_range(rng: random.Random) -> tuple[int, int]:
    """A cell-aligned range of 1 to 6 cells at a hot spot of a page of the region (one that
    starts near a page's end crosses into the next page)."""
    pages = (REGION[1] - REGION[0]) // PAGE
    offset = REGION[0] + rng.randrange(pages) * PAGE + rng.choice(HOT)
    cells = rng.randint(1, 6)
    return offset, min(cells * CELL, REGION[1] - offset)


@pytest.mark.parametrize("seed", sorted({20261127, SEED}))
def test_every_writer_at_once_never_undoes_an_acknowledged_write(tmp_path, seed):
    history = History()
    failures: list[BaseException] = []
    barrier = threading.Barrier(5)
    with MountSession(tmp_path / "store", tmp_path / "mnt", []) as session:
        obj = session.mountpoint / "objects" / "shared"
        sh(f"mkdir {obj} && truncate -s {SIZE} {obj}/data")
        with (
            KernelProcess(session.listen_address, "k1", page_size=4096, workdir=tmp_path) as k1,
            KernelProcess(session.listen_address, "k2", page_size=16384, workdir=tmp_path) as k2,
            MmapProgram(obj / "data") as program,
        ):
            k1.command(f"map shared {SIZE}")
            k2.command(f"map shared {SIZE}")
            cached = os.open(obj / "data", os.O_RDWR)  # through Linux's cache
            direct = os.open(obj / "data", os.O_WRONLY)  # direct_io: around it
            try:

                def rounds(name: str, one_round) -> None:
                    rng = random.Random(f"{name}-{seed}")
                    try:
                        for round_ in range(ROUNDS):
                            barrier.wait(BARRIER_TIMEOUT)
                            one_round(rng, round_)
                    except threading.BrokenBarrierError:
                        pass  # another writer failed: its error is the one to report
                    except BaseException as error:
                        failures.append(error)
                        barrier.abort()

                def mmap_round(rng: random.Random, round_: int) -> None:
                    # Dirty two ranges, maybe let the others run a little, then msync: both
                    # are acknowledged when msync returns.
                    stores = []
                    for _ in range(2):
                        offset, length = _random_range(rng)
                        data = history.new_value(length // CELL)
                        began = time.monotonic()
                        program.store(offset, data)
                        stores.append((offset, data, began))
                    if round_ % 3 == 0:
                        program.read(REGION[0] + rng.randrange(REGION[1] - REGION[0] - 8), 8)  # a touch
                    program.sync()
                    acked = time.monotonic()
                    for offset, data, began in stores:
                        history.add(Write("mmap", offset, data, began, acked))

                def write_round(rng: random.Random, round_: int) -> None:
                    offset, length = _random_range(rng)
                    data = history.new_value(length // CELL)
                    began = time.monotonic()
                    assert os.pwrite(direct if round_ % 2 else cached, data, offset) == length
                    history.add(Write("write(2)", offset, data, began, time.monotonic()))

                def kernel_round(kernel: KernelProcess):
                    def one_round(rng: random.Random, round_: int) -> None:
                        offset, length = _random_range(rng)
                        if round_ % 4 == 3:  # a read now and then: its pages go read-only
                            kernel.command(f"read shared+{offset} {length}")
                        data = history.new_value(length // CELL)
                        began = time.monotonic()
                        kernel.command(f"writehex shared+{offset} {data.hex()}")
                        history.add(Write(kernel.name, offset, data, began, time.monotonic()))

                    return one_round

                def sync_round(rng: random.Random, round_: int) -> None:
                    if round_ % 2 == 0:
                        sh(f"echo sync > {obj}/ctl")

                threads = [
                    threading.Thread(target=rounds, args=(name, work), daemon=True)
                    for name, work in [
                        ("mmap", mmap_round),
                        ("write", write_round),
                        ("k1", kernel_round(k1)),
                        ("k2", kernel_round(k2)),
                        ("sync", sync_round),
                    ]
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(ROUNDS * BARRIER_TIMEOUT)
                assert not any(thread.is_alive() for thread in threads), "a writer is still running"
                if failures:
                    raise failures[0]
            finally:
                os.close(cached)
                os.close(direct)
            assert len(history.writes) == 5 * ROUNDS  # mmap 2, write(2) 1, kernels 1 each a round

            start, length = REGION[0], REGION[1] - REGION[0]
            sh(f"echo sync > {obj}/ctl")
            seen = {
                "data": _data_bytes(obj / "data", start, length),
                "k1": bytes.fromhex(k1.command(f"read shared+{start} {length}").split()[-1]),
                "k2": bytes.fromhex(k2.command(f"read shared+{start} {length}").split()[-1]),
                "mmap": program.read(start, length),
            }
            for reader, holds in seen.items():
                try:
                    check(history.writes, holds, offset=start)
                except AssertionError as error:
                    raise AssertionError(f"seed {seed} (FUSEPAGER_SEED={seed} to rerun); as {reader} reads it after {len(history.writes)} writes:\n{error}") from None
            assert len(set(seen.values())) == 1, "the readers disagree"

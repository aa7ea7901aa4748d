#!/usr/bin/env python3
"""A memory manager that keeps every page of its object zlib-compressed, one file per page.

Run it:  .venv/bin/python examples/compressing_pager.py [--dir DIR] [--keep] [--trace]

The object lives in DIR/pages/, one file per 4 KiB block: `00003000.z` holds the block at
offset 0x3000, compressed with zlib.  A block with no file is a hole (all zeros), so
`ls -l DIR/pages` shows at a glance what compresses and what does not.

The pager engine (fusepager.pager.Pager) speaks the protocol; this file only says how to read
and write blocks (a PagerCallbacks subclass: read_pages, write_pages, report_extent).  Two
kernels map the object: k1 with 4 KiB pages and k2 with 16 KiB pages, each with very little
memory, so their pages go back to the manager (memory_object_data_return) and come in again
(memory_object_data_request) all the time.  k1's task writes text (compressible), k2's task
writes random bytes (incompressible), and a third part is never written.  Then both tasks read
the whole object back, and the script checks every byte, and every page file on disk.

It exits 0 when all of that holds, and 1 with a message saying what did not.

To start a manager of your own from this one, change CompressedPages: read_pages and
write_pages are all the storage there is.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import trio

import kernelsim
from fusepager.pager import Pager, PagerCallbacks, PagerError
from kernelsim.interface import KERN_MEMORY_FAILURE

BLOCK = 4096  # the smallest kernel page size: every kernel's pages are whole blocks
ZERO_BLOCK = bytes(BLOCK)

TEXT_PART = (0, 64 * 1024)  # written by k1's task: compresses well
RANDOM_PART = (64 * 1024, 64 * 1024)  # written by k2's task: does not compress at all
HOLE_PART = (128 * 1024, 64 * 1024)  # never written: read_pages finds no file, a hole
OBJECT_SIZE = 192 * 1024


def say(who: str, text: str) -> None:
    print(f"  {who:<8} {text}", flush=True)


class CheckFailed(Exception):
    """What the example checks did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


class CompressedPages(PagerCallbacks):
    """The object's bytes: one zlib-compressed file per 4 KiB block; no file means zeros."""

    def __init__(self, directory: Path, size: int) -> None:
        self.directory = directory
        self.size = size
        self.stored_blocks: set[int] = set()  # offsets of blocks that have been written...
        self.refaulted: set[int] = set()  # ...and those of them read back in since
        self.narrate = True  # print a line for each call
        self.counts = {"reads": 0, "holes": 0, "writes": 0}

    def path(self, offset: int) -> Path:
        return self.directory / f"{offset:08x}.z"

    # A plain `def`, not `async def`: it cannot block, so the engine may answer a fault at once,
    # without starting a task (docs/pager-api.md §2).  Reading a small local file is quick.
    def read_pages(self, offset, length):
        blocks = []
        files = 0
        disk_bytes = 0
        for at in range(offset, offset + length, BLOCK):
            try:
                packed = self.path(at).read_bytes()
            except FileNotFoundError:
                blocks.append(ZERO_BLOCK)  # a hole inside the range: zeros
                continue
            try:
                block = zlib.decompress(packed)
            except zlib.error as error:
                # The engine answers memory_object_data_error; the task's read raises KernMemoryError.
                raise PagerError(f"page file {self.path(at).name} is corrupt: {error}", KERN_MEMORY_FAILURE) from None
            if len(block) != BLOCK:
                raise PagerError(f"page file {self.path(at).name} holds {len(block)} bytes, not {BLOCK}", KERN_MEMORY_FAILURE)
            blocks.append(block)
            files += 1
            disk_bytes += len(packed)
            if at in self.stored_blocks:
                self.refaulted.add(at)
        if files == 0:
            # No data anywhere in the range: the engine sends memory_object_data_unavailable
            # and the kernel fills the pages with zeros itself.
            self.counts["holes"] += 1
            if self.narrate:
                say("zobj", f"<- data_request {offset:#07x}+{length:<5}  no page file: a hole, data_unavailable")
            return None
        self.counts["reads"] += 1
        if self.narrate:
            say("zobj", f"<- data_request {offset:#07x}+{length:<5}  {files} page file(s) read, {disk_bytes} -> {length} bytes")
        return b"".join(blocks)

    async def write_pages(self, offset, data):
        files = 0
        disk_bytes = 0
        for at in range(0, len(data), BLOCK):
            if offset + at >= self.size:
                break  # a kernel's last page can reach past the object's end: drop that part
            block = data[at : at + BLOCK]
            path = self.path(offset + at)
            if block == ZERO_BLOCK:
                path.unlink(missing_ok=True)  # zeros need no file: keep the hole a hole
                self.stored_blocks.discard(offset + at)
                continue
            packed = zlib.compress(block)
            # Write a new file and rename it over the old one: a crash leaves one or the other.
            scratch = path.with_suffix(".tmp")
            scratch.write_bytes(packed)
            os.replace(scratch, path)
            self.stored_blocks.add(offset + at)
            self.refaulted.discard(offset + at)
            files += 1
            disk_bytes += len(packed)
        self.counts["writes"] += 1
        if self.narrate:
            written = f"{files} page file(s) written, {len(data)} -> {disk_bytes} bytes"
            say("zobj", f"<- data_return  {offset:#07x}+{len(data):<5}  {written}")

    async def report_extent(self):
        return self.size


def text_bytes(length: int) -> bytes:
    lines = b"".join(b"line %04d: the quick brown fox jumps over the lazy dog\n" % n for n in range(length // 40))
    return lines[:length]


def on_disk(directory: Path, start: int, length: int) -> tuple[int, int]:
    """(files, bytes on disk) of the page files in [start, start+length)."""
    sizes = [p.stat().st_size for p in directory.glob("*.z") if start <= int(p.stem, 16) < start + length]
    return len(sizes), sum(sizes)


async def run(directory: Path, show_trace: bool) -> None:
    store = CompressedPages(directory, OBJECT_SIZE)
    pager = Pager(store, name="zobj")
    if show_trace:
        pager.trace.listeners.append(lambda line: say("trace", line))

    text = text_bytes(TEXT_PART[1])
    noise = random.Random(8).randbytes(RANDOM_PART[1])
    expected = text + noise + bytes(HOLE_PART[1])

    async with trio.open_nursery() as nursery:
        await nursery.start(pager.serve)
        # Little memory each: 4 frames of 4 KiB for k1, 2 frames of 16 KiB for k2.  Whatever a
        # task touches beyond that makes the kernel page something out.
        async with (
            kernelsim.boot("k1", page_size=4096, memory_pages=4) as k1,
            kernelsim.boot("k2", page_size=16384, memory_pages=2) as k2,
        ):
            t1, t2 = await k1.task_create(name="t1"), await k2.task_create(name="t2")
            a1 = await t1.vm_map(pager.send_right(), OBJECT_SIZE)
            a2 = await t2.vm_map(pager.send_right(), OBJECT_SIZE)
            print(f"k1 (4 KiB pages, 4 frames) and k2 (16 KiB pages, 2 frames) map {OBJECT_SIZE // 1024} KiB of 'zobj'.")
            print("Each line is what the manager got and did (--trace prints every message).")

            print(f"\nk1's task writes {len(text)} bytes of text at 0x0; k1 faults each page in, and its")
            print("pageout sends the older ones home, changed:")
            await t1.write(a1 + TEXT_PART[0], text)
            print(f"\nk2's task writes {len(noise)} random bytes at {RANDOM_PART[0]:#x}, in 16 KiB pages:")
            await t2.write(a2 + RANDOM_PART[0], noise)

            print("\nk1's task, then k2's, read the whole object back; the pages come in again from")
            print("their files, or from the other kernel, which gives them back first:")
            store.narrate = show_trace
            before = dict(store.counts)
            got1 = await t1.read(a1, OBJECT_SIZE)
            got2 = await t2.read(a2, OBJECT_SIZE)
            store.narrate = True
            reads, holes, writes = (store.counts[key] - before[key] for key in ("reads", "holes", "writes"))
            say("zobj", f"{reads} data_requests answered from page files, {holes} holes, {writes} data_returns stored")
            for kernel in (k1, k2):
                s = kernel.stats
                say(kernel.name, f"{s.data_requests} data_requests in all, {s.evictions} evictions, {s.data_returns} data_returns")

            check(got1 == expected, f"k1's task read wrong bytes, first at offset {first_difference(got1, expected):#x}")
            check(got2 == expected, f"k2's task read wrong bytes, first at offset {first_difference(got2, expected):#x}")
            check(k1.stats.evictions > 0 and k2.stats.evictions > 0, "a kernel evicted nothing: the memory limit did not bite")
            check(k1.stats.data_returns > 0 and k2.stats.data_returns > 0, "a kernel sent no data_return")
            written = set(range(0, TEXT_PART[1] + RANDOM_PART[1], BLOCK))
            missing = written - store.refaulted
            check(not missing, f"{len(missing)} written block(s) never came back from their files, e.g. {min(missing or [0]):#x}")
            print(f"both tasks read back every byte as written; each of the {len(written)} blocks written was")
            print("paged out, then read in again from its compressed file")
        while pager.kernels:  # wait for each kernel's memory_object_terminate
            await pager.wait_for_change()
        nursery.cancel_scope.cancel()

    # Every page file, decompressed, is the object as the tasks wrote it; holes have no file.
    stored = bytearray(OBJECT_SIZE)
    for path in directory.glob("*.z"):
        at = int(path.stem, 16)
        stored[at : at + BLOCK] = zlib.decompress(path.read_bytes())
    difference = first_difference(stored, expected)
    check(bytes(stored) == expected, f"the page files differ from what the tasks wrote, first at {difference:#x}")
    hole_files, _ = on_disk(directory, *HOLE_PART)
    check(hole_files == 0, f"{hole_files} page file(s) in the part never written")

    print(f"\nThe page files in {directory}:")
    for name, (start, length) in (("text", TEXT_PART), ("random", RANDOM_PART), ("never written", HOLE_PART)):
        files, size = on_disk(directory, start, length)
        ratio = f"compression ratio {length / size:.3g}x" if size else "no files: a hole"
        print(f"  {name:<13} {start:#07x}+{length}: {files:2} page files, {size:6} bytes on disk, {ratio}")
    files, size = on_disk(directory, 0, OBJECT_SIZE)
    data_bytes = TEXT_PART[1] + RANDOM_PART[1]
    print(f"compression ratio: {data_bytes} bytes of data in {size} bytes of page files = {data_bytes / size:.2f}x")
    for offset in (TEXT_PART[0], RANDOM_PART[0]):
        path = store.path(offset)
        print(f"  {path.name}: {path.stat().st_size} bytes on disk for a {BLOCK}-byte page")
    check(on_disk(directory, *TEXT_PART)[1] * 10 < TEXT_PART[1], "the text did not compress 10x")
    print("OK: every check held")


def leaves(group: BaseExceptionGroup):
    for exception in group.exceptions:
        if isinstance(exception, BaseExceptionGroup):
            yield from leaves(exception)
        else:
            yield exception


def first_difference(a: bytes | bytearray, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="where the page files go (DIR/pages); default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory at the end")
    parser.add_argument("--trace", action="store_true", help="print every message of the protocol as it goes")
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="compressing-pager-"))
    directory = root / "pages"
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.z"):  # page files of an earlier run
        stale.unlink()
    status = 0
    try:
        trio.run(run, directory, args.trace)
    except* CheckFailed as failures:  # raised inside trio's nurseries, so it comes in a group
        for failure in leaves(failures):
            print(f"FAILED: {failure}", file=sys.stderr)
        status = 1
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root)
        else:
            print(f"the page files are in {directory}")
    return status


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A snapshotting memory manager: MEMORY_OBJECT_COPY_CALL, with each snapshot in a file.

Run it:  .venv/bin/python examples/snapshotting_pager.py [--dir DIR] [--keep] [--trace]

The object's bytes live in DIR/object.data.  The manager tells kernels to copy the object
with MEMORY_OBJECT_COPY_CALL: when a task forks (or vm_copy's, or vm_map's with copy=True), the
kernel does not copy a byte itself.  It write-locks its pages of the range and sends
memory_object_copy with a new memory object, the copy, which the manager now serves too.  The
manager promises the copy keeps the range as it was at that moment, whoever writes the
original afterwards.

The pager engine keeps that promise lazily, copy-on-write on the manager's side: just before a
page of the original changes, it saves the old page in the copy's store, a `CopyStore`.  This
file's `copy_store` callback gives each copy a `SnapshotFile`, DIR/snapshots/copy-ID.data, a
sparse file holding only the pages that had to be saved; the copy's pages not in it are still
the original's.  When the copy ends, the engine calls `discard()` and the file goes.

The script: a task writes page 0, then forks a child (the snapshot); the parent writes pages 0
and 1 again; the child still reads the bytes as of the fork, the parent its new ones.  It
prints which pages the snapshot had to save and what its file holds, has the child write a
page of its own (it goes to the snapshot file, never to the original), and checks all of it.
It exits 0 when everything held, and 1 with a message saying what did not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import trio

import kernelsim
from fusepager.copies import CopyStore
from fusepager.pager import Pager, PagerCallbacks, PagerError
from kernelsim.interface import KERN_MEMORY_FAILURE, MEMORY_OBJECT_COPY_CALL

PAGE = 4096
PAGES = 4
OBJECT_SIZE = PAGES * PAGE


def say(who: str, text: str) -> None:
    print(f"  {who:<8} {text}", flush=True)


class CheckFailed(Exception):
    """What the example checks did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def page_text(text: str) -> bytes:
    return text.encode().ljust(PAGE, b".")


class SnapshotFile(CopyStore):
    """A copy's own pages in a sparse file; `held` (from CopyStore) says which pages it has.
    Offsets are relative to the start of the copied range, in pages of the copying kernel."""

    def __init__(self, path: Path, page_size: int) -> None:
        super().__init__(page_size)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    async def read(self, offset, length):
        try:
            return os.pread(self.fd, length, offset).ljust(length, b"\0")
        except OSError as error:
            raise PagerError(f"reading {self.path.name}: {error.strerror}", KERN_MEMORY_FAILURE) from None

    async def write(self, offset, data):
        try:
            os.pwrite(self.fd, data, offset)
        except OSError as error:  # e.g. a full disk: the change that needed the save fails
            raise PagerError(f"writing {self.path.name}: {error.strerror}", KERN_MEMORY_FAILURE) from None
        self.held.update(range(offset, offset + len(data), self.page_size))

    def discard(self):
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


class FileObject(PagerCallbacks):
    """The object's bytes in one file; every copy of it gets a SnapshotFile."""

    def __init__(self, directory: Path, size: int) -> None:
        self.path = directory / "object.data"
        self.snapshot_dir = directory / "snapshots"
        self.snapshot_dir.mkdir(exist_ok=True)
        self.size = size
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.snapshots: dict[int, SnapshotFile] = {}

    def read_pages(self, offset, length):  # a plain def: it cannot block (pager-api.md §2)
        return os.pread(self.fd, length, offset).ljust(length, b"\0")  # never a hole

    async def write_pages(self, offset, data):
        os.pwrite(self.fd, data[: max(0, self.size - offset)], offset)  # not past the end

    async def report_extent(self):
        return self.size

    def copy_store(self, copy_id, length, page_size):
        # A plain method: called when a kernel's memory_object_copy starts copy `copy_id`.
        snapshot = SnapshotFile(self.snapshot_dir / f"copy-{copy_id}.data", page_size)
        self.snapshots[copy_id] = snapshot
        return snapshot


def show_snapshot(snapshot: SnapshotFile) -> None:
    contents = snapshot.path.read_bytes()
    print(f"{snapshot.path.name} ({len(contents)} bytes, {len(snapshot.held)} page(s) saved):")
    for offset in range(0, OBJECT_SIZE, PAGE):
        if offset in snapshot.held:
            say("file", f"{offset:#06x}: {contents[offset : offset + PAGE].rstrip(b'.').decode()!r}")
        else:
            say("file", f"{offset:#06x}: not saved: the snapshot still reads the original's page")


def showable(line: str) -> bool:
    """The trace lines about the copy: memory_object_copy, the copy notes (`obj: copy 1 ...`),
    the copy's own messages (`obj~1`), and the parent's requests for write access that make the
    saves happen."""
    return (
        "memory_object_copy(" in line
        or "memory_object_data_unlock(" in line
        or ("memory_object_data_request(" in line and "desired_access=rw-" in line)
        or line.startswith(("obj: copy", "k1 -> obj~", "obj~"))
    )


async def run(directory: Path, show_trace: bool) -> None:
    store = FileObject(directory, OBJECT_SIZE)
    for page in range(PAGES):
        os.pwrite(store.fd, page_text(f"page {page}, version 1"), page * PAGE)
    pager = Pager(store, name="obj", copy_strategy=MEMORY_OBJECT_COPY_CALL)
    trace: list[str] = []
    pager.trace.listeners.append(trace.append)
    pager.trace.listeners.append(lambda line: (show_trace or showable(line)) and say("trace", line))

    async with trio.open_nursery() as nursery:
        await nursery.start(pager.serve)
        async with kernelsim.boot("k1", page_size=PAGE) as kernel:
            parent = await kernel.task_create(name="parent")
            address = await parent.vm_map(pager.send_right(), OBJECT_SIZE)
            print(f"k1's task 'parent' maps 'obj' ({PAGES} pages, copy strategy call) and writes page 0:")
            before_fork = page_text("page 0, version 2: written by the parent before the fork")
            await parent.write(address, before_fork)

            print("\nThe parent forks: its child inherits a copy of the mapping, the snapshot:")
            child = await kernel.task_create(parent, name="child")
            # The kernel sent memory_object_copy and went on: the engine may not have taken the
            # message yet.  Wait until it has (wait_for_change returns after each message).
            while not pager.copies:
                await pager.wait_for_change()
            (copy,) = pager.copies.values()
            snapshot = store.snapshots[copy.id]
            check(snapshot.held == set(), "the snapshot saved pages before anything changed")
            say("obj", f"snapshot file {snapshot.path.name}: {snapshot.path.stat().st_size} bytes, nothing saved yet")

            print("\nThe parent writes pages 0 and 1 again; before each changes, the snapshot saves it:")
            await parent.write(address, page_text("page 0, version 3: the parent, after the fork"))
            await parent.write(address + PAGE, page_text("page 1, version 3: the parent, after the fork"))

            print("\nWhat each task reads now:")
            as_of_fork = [before_fork] + [page_text(f"page {p}, version 1") for p in range(1, PAGES)]
            for page in range(PAGES):
                theirs = await child.read(address + page * PAGE, PAGE)
                say("child", f"page {page}: {theirs.rstrip(b'.').decode()!r}")
                check(theirs == as_of_fork[page], f"the child reads page {page} as {theirs[:40]!r}, not as of the fork")
            now = [page_text(f"page {p}, version 3: the parent, after the fork") for p in (0, 1)]
            now += as_of_fork[2:]
            for page in range(PAGES):
                ours = await parent.read(address + page * PAGE, PAGE)
                say("parent", f"page {page}: {ours.rstrip(b'.').decode()!r}")
                check(ours == now[page], f"the parent reads page {page} as {ours[:40]!r}")
            print("the snapshot (the child) still reads the bytes as of the fork; the parent, its new ones")

            saves = [line for line in trace if line.startswith(f"obj: copy {copy.id} saved")]
            print(f"\nThe snapshot had to save {len(snapshot.held)} page(s), as the trace said:")
            for line in saves:
                say("trace", line)
            check(snapshot.held == {0, PAGE}, f"the snapshot saved the pages at {sorted(snapshot.held)}, not 0x0 and 0x1000")
            check(len(saves) == 2, f"the trace has {len(saves)} 'saved' notes, not 2")
            show_snapshot(snapshot)
            contents = snapshot.path.read_bytes()
            check(contents[:PAGE] == before_fork, "the snapshot file's page 0 is not the parent's write from before the fork")
            check(contents[PAGE : 2 * PAGE] == as_of_fork[1], "the snapshot file's page 1 is not version 1")

            print("\nThe child writes page 3 of its copy; its change goes to the snapshot file only:")
            mine = page_text("page 3: written by the child into its snapshot")
            await child.write(address + 3 * PAGE, mine)
            seen = await pager.copy_contents(copy.id, 0, OBJECT_SIZE)  # the child's change comes home first
            check(seen[3 * PAGE :] == mine, "copy_contents does not show the child's write")
            check(3 * PAGE in snapshot.held, "the child's write did not reach the snapshot file")
            show_snapshot(snapshot)
            await pager.sync()
            original = os.pread(store.fd, OBJECT_SIZE, 0)
            check(original[3 * PAGE :] == as_of_fork[3], "the child's write reached the original")
            check(original[:PAGE] == now[0], "the parent's write is not in object.data after a sync")
            say("obj", f"object.data page 3: {original[3 * PAGE : 4 * PAGE].rstrip(b'.').decode()!r}")

            print("\nThe child exits: its copy ends, and the snapshot file goes:")
            child.terminate()
            while pager.copies:
                await pager.wait_for_change()
            check(not snapshot.path.exists(), f"{snapshot.path} is still there after the copy ended")
            say("obj", f"{snapshot.path.name} removed; snapshots/ holds {sorted(os.listdir(store.snapshot_dir))}")
        while pager.kernels:  # wait for k1's memory_object_terminate
            await pager.wait_for_change()
        nursery.cancel_scope.cancel()
    os.close(store.fd)
    print("\nOK: every check held")


def leaves(group: BaseExceptionGroup):
    for exception in group.exceptions:
        if isinstance(exception, BaseExceptionGroup):
            yield from leaves(exception)
        else:
            yield exception


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="where object.data and snapshots/ go; default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory at the end")
    parser.add_argument("--trace", action="store_true", help="print every message of the protocol, not only the copy's")
    args = parser.parse_args()

    directory = args.dir or Path(tempfile.mkdtemp(prefix="snapshotting-pager-"))
    directory.mkdir(parents=True, exist_ok=True)
    status = 0
    try:
        trio.run(run, directory, args.trace)
    except* CheckFailed as failures:  # raised inside trio's nurseries, so it comes in a group
        for failure in leaves(failures):
            print(f"FAILED: {failure}", file=sys.stderr)
        status = 1
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(directory)
        else:
            print(f"the object's file is {directory / 'object.data'}")
    return status


if __name__ == "__main__":
    sys.exit(main())

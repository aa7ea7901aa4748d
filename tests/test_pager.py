"""The pager engine against real kernels in the same process."""

from __future__ import annotations

from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
import trio.testing

import kernelsim
from fusepager.pager import Pager, PagerCallbacks, PagerError
from kernelsim.interface import (
    KERN_MEMORY_FAILURE,
    MEMORY_OBJECT_COPY_CALL,
    VM_PROT_EXECUTE,
    VM_PROT_READ,
    VM_PROT_WRITE,
    KernMemoryError,
)

PAGE = 4096


class MemoryObject(PagerCallbacks):
    """Callbacks over a bytearray, recording the calls; holes are pages never written."""

    def __init__(self, size: int = 64 * PAGE) -> None:
        self.data = bytearray(size)
        self.written: set[int] = set()
        self.calls: list[tuple] = []
        self.fail_reads_at: set[int] = set()
        self.read_gate: trio.Event | None = None

    def put(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self.written.update(range(offset // PAGE, (offset + len(data) + PAGE - 1) // PAGE))

    async def read_pages(self, offset, length):
        self.calls.append(("read", offset, length))
        if self.read_gate is not None:
            await self.read_gate.wait()
        if offset in self.fail_reads_at:
            raise PagerError("disk on fire", KERN_MEMORY_FAILURE)
        if not any(page in self.written for page in range(offset // PAGE, (offset + length) // PAGE)):
            return None
        return bytes(self.data[offset : offset + length])

    async def write_pages(self, offset, data):
        self.calls.append(("write", offset, len(data)))
        self.put(offset, data)

    async def report_extent(self):
        return len(self.data)

    async def pages_evicted(self, offset, length):
        self.calls.append(("evicted", offset, length))


@asynccontextmanager
async def served(callbacks, *kernel_specs, **pager_options):
    """A pager serving `callbacks`, and kernels (name, page_size, memory_pages) each with a task
    mapping the whole object; yields (pager, [(kernel, task, address), ...])."""
    pager = Pager(callbacks, name="obj", **pager_options)
    async with trio.open_nursery() as nursery:
        await nursery.start(pager.serve)
        async with AsyncExitStack() as stack:
            booted = []
            for name, page_size, memory in kernel_specs:
                kernel = await stack.enter_async_context(kernelsim.boot(name, page_size, memory))
                task = await kernel.task_create()
                booted.append((kernel, task, await task.vm_map(pager.send_right(), len(callbacks.data))))
            yield pager, booted
        nursery.cancel_scope.cancel()


async def test_reads_are_served_from_the_callbacks_and_holes_are_unavailable():
    store = MemoryObject()
    store.put(PAGE, b"page one")
    async with served(store, ("k1", PAGE, 32)) as (pager, [(kernel, task, address)]):
        assert await task.read(address + PAGE, 8) == b"page one"
        assert await task.read(address + 5 * PAGE, 4) == b"\0\0\0\0"
        assert kernel.stats.zero_fills == 1 and kernel.stats.pages_supplied == 1
        (record,) = pager.kernels.values()
        assert record.host == "k1" and record.ready and record.page_size == PAGE
        # the supplied page is read-only in the pagemap, the zero-filled one writable
        assert record.pagemap.get(PAGE).access == VM_PROT_READ
        assert record.pagemap.get(5 * PAGE).access == VM_PROT_READ | VM_PROT_WRITE
        assert "memory_object_data_unavailable(offset=0x5000 size=4096)" in pager.trace.read(0, 1 << 20).decode()


async def test_a_write_after_a_read_asks_to_unlock_and_the_pagemap_follows():
    store = MemoryObject()
    store.put(0, b"x" * PAGE)
    async with served(store, ("k1", PAGE, 32)) as (pager, [(kernel, task, address)]):
        await task.read(address, 1)
        await task.write(address, b"y")
        assert kernel.stats.unlocks == 1
        (record,) = pager.kernels.values()
        assert record.pagemap.get(0).access == VM_PROT_READ | VM_PROT_WRITE
        assert record.pagemap.render() == "0x0 4096 rw- dirty\n"


async def test_sync_brings_changes_back_and_write_protects():
    store = MemoryObject()
    store.put(0, bytes(4 * PAGE))
    async with served(store, ("k1", PAGE, 32)) as (pager, [(kernel, task, address)]):
        await task.write(address + 10, b"changed")
        await pager.sync()
        assert store.data[10:17] == b"changed"
        (record,) = pager.kernels.values()
        assert record.pagemap.get(0).access == VM_PROT_READ  # kept, but write-protected
        unlocks = kernel.stats.unlocks
        await task.write(address + 20, b"again")  # must ask again: the engine will know
        assert kernel.stats.unlocks == unlocks + 1
        await pager.flush()
        assert store.data[20:25] == b"again"
        assert len(record.pagemap) == 0 and kernel.resident.count == 0


async def test_a_returned_page_is_written_before_it_is_read_again():
    store = MemoryObject()
    store.put(0, bytes(PAGE))
    async with served(store, ("k1", PAGE, 1)) as (pager, [(kernel, task, address)]):
        # one frame: every access evicts the other page, dirty, and reads it back at once
        for round_ in range(20):
            await task.write(address, bytes([round_]) * 8)
            await task.write(address + PAGE, bytes([round_ + 100]) * 8)
            assert await task.read(address, 8) == bytes([round_]) * 8
        assert kernel.stats.data_returns >= 20


async def test_read_errors_reach_the_task_as_data_error():
    store = MemoryObject()
    store.put(0, bytes(8 * PAGE))
    store.fail_reads_at.add(3 * PAGE)
    async with served(store, ("k1", PAGE, 32)) as (pager, [(kernel, task, address)]):
        with pytest.raises(KernMemoryError) as failure:
            await task.read(address + 3 * PAGE, 1)
        assert failure.value.reason == KERN_MEMORY_FAILURE and failure.value.offset == 3 * PAGE
        assert "disk on fire" in pager.trace.read(0, 1 << 20).decode()


async def test_many_requests_are_in_flight_at_once():
    store = MemoryObject()
    store.put(0, bytes(16 * PAGE))
    store.read_gate = trio.Event()
    async with served(store, ("k1", PAGE, 32)) as (pager, [(kernel, task, address)]):
        async with trio.open_nursery() as nursery:
            for page in range(8):
                nursery.start_soon(task.read, address + page * PAGE, 1)
            await trio.testing.wait_all_tasks_blocked()
            # eight reads waiting in the callbacks at once: none blocks the others
            assert len([c for c in store.calls if c[0] == "read"]) == 8
            store.read_gate.set()


async def test_kernels_get_their_own_records_and_labels():
    store = MemoryObject()
    async with served(store, ("k1", PAGE, 32), ("k2", 4 * PAGE, 32), ("k1", PAGE, 32)) as (pager, booted):
        for kernel, task, address in booted:
            await task.read(address, 1)
        labels = sorted(record.label for record in pager.kernels.values())
        assert labels == ["k1", "k1-2", "k2"]
        assert sorted(r.page_size for r in pager.kernels.values()) == [PAGE, PAGE, 4 * PAGE]


async def test_manual_ready_holds_faults_until_ready():
    store = MemoryObject()
    async with served(store, ("k1", PAGE, 32), auto_ready=False) as (pager, [(kernel, task, address)]):
        result = []
        async with trio.open_nursery() as nursery:

            async def reader():
                result.append(await task.read(address, 1))

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            (record,) = pager.kernels.values()
            assert not record.ready and result == []
            pager.ready(record, True, MEMORY_OBJECT_COPY_CALL)
        assert result == [b"\0"]
        assert record.ready_line() == "may_cache=1 copy=call\n"


async def test_terminate_forgets_the_kernel_and_evictions_are_reported():
    store = MemoryObject()
    store.put(0, bytes(2 * PAGE))
    async with served(store, ("k1", PAGE, 32)) as (pager, [(kernel, task, address)]):
        await task.write(address, b"bye")
        task.vm_deallocate(address, len(store.data))
        with trio.fail_after(5):
            while pager.kernels:
                await pager.wait_for_change()
        await trio.testing.wait_all_tasks_blocked()
        assert store.data[:3] == b"bye"
        assert ("evicted", 0, PAGE) in store.calls


async def test_lock_holds_writers_until_lifted():
    store = MemoryObject()
    store.put(0, bytes(PAGE))
    async with served(store, ("k1", PAGE, 32)) as (pager, [(kernel, task, address)]):
        await task.read(address, 1)
        await pager.lock(0, PAGE, VM_PROT_WRITE)
        done = []
        async with trio.open_nursery() as nursery:

            async def writer():
                await task.write(address, b"late")
                done.append(True)

            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            assert done == []
            await pager.lock(0, PAGE, 0)
        assert done == [True]


async def test_offer_page_and_change_attributes_and_destroy():
    store = MemoryObject()
    async with served(store, ("k1", PAGE, 32)) as (pager, [(kernel, task, address)]):
        await task.read(address, 1)
        assert await pager.offer_page(2 * PAGE, b"offered".ljust(PAGE, b"\0")) == 1
        assert await task.read(address + 2 * PAGE, 7) == b"offered"
        assert not any(c == ("read", 2 * PAGE, PAGE) for c in store.calls)
        await pager.change_attributes(True, MEMORY_OBJECT_COPY_CALL)
        (record,) = pager.kernels.values()
        assert (record.may_cache, record.copy_strategy) == (True, MEMORY_OBJECT_COPY_CALL)
        pager.destroy(KERN_MEMORY_FAILURE)
        with pytest.raises(KernMemoryError):
            await task.read(address + 5 * PAGE, 1)


# -- coherence and robustness -------------------------------------------------------------


async def test_a_write_grant_takes_the_range_from_every_other_kernel_first():
    store = MemoryObject()
    store.put(0, bytes(8 * PAGE))
    async with served(store, ("k1", PAGE, 32), ("k2", 4 * PAGE, 32)) as (pager, [(k1, t1, a1), (k2, t2, a2)]):
        await t2.write(a2 + PAGE + 7, b"k2 wrote")  # k2 holds [0, 16K) writable
        await t1.write(a1 + PAGE, b"k1")  # k1's write grant flushes k2's 16 KiB page first
        assert store.data[PAGE + 7 : PAGE + 15] == b"k2 wrote"  # k2's change came back on the way
        assert await t1.read(a1 + PAGE + 7, 8) == b"k2 wrote"
        record2 = next(r for r in pager.kernels.values() if r.host == "k2")
        assert len(record2.pagemap) == 0 and k2.resident.count == 0
        assert await t2.read(a2 + PAGE, 2) == b"k1"  # and k2 reads k1's write: k1 is cleaned


async def test_a_read_grant_cleans_the_writer_which_keeps_a_read_only_copy():
    store = MemoryObject()
    store.put(0, bytes(4 * PAGE))
    async with served(store, ("k1", PAGE, 32), ("k2", PAGE, 32)) as (pager, [(k1, t1, a1), (k2, t2, a2)]):
        await t1.write(a1, b"first")
        assert await t2.read(a2, 5) == b"first"
        record1 = next(r for r in pager.kernels.values() if r.host == "k1")
        assert record1.pagemap.get(0).access == VM_PROT_READ and k1.resident.count == 1
        unlocks = k1.stats.unlocks
        await t1.write(a1, b"again")  # k1 must ask again; k2's copy goes
        assert k1.stats.unlocks == unlocks + 1
        assert await t2.read(a2, 5) == b"again"


async def test_a_manager_lock_adds_to_the_write_lock_of_a_read_only_page():
    store = MemoryObject()
    store.put(0, bytes(PAGE))
    async with served(store, ("k1", PAGE, 32)) as (pager, [(kernel, task, address)]):
        await task.read(address, 1)  # read-only: write-locked in the kernel
        await pager.lock(0, PAGE, VM_PROT_EXECUTE)
        unlocks = kernel.stats.unlocks
        await task.write(address, b"w")  # still has to ask: the lock did not drop the write lock
        assert kernel.stats.unlocks == unlocks + 1
        await pager.sync()
        assert store.data[:1] == b"w"


async def test_a_refused_unlock_fails_the_task_instead_of_leaving_it_waiting():
    class NoWrites(MemoryObject):
        async def unlock_pages(self, offset, length, access):
            raise PagerError("read-only object", KERN_MEMORY_FAILURE)

    store = NoWrites()
    store.put(0, bytes(PAGE))
    async with served(store, ("k1", PAGE, 32)) as (pager, [(kernel, task, address)]):
        await task.read(address, 1)
        with trio.fail_after(5), pytest.raises(KernMemoryError) as failure:
            await task.write(address, b"no")
        assert failure.value.reason == KERN_MEMORY_FAILURE
        assert await task.read(address, 1) == b"\0"  # reading still works


async def test_a_callback_that_breaks_fails_its_request_not_the_pager():
    class Buggy(MemoryObject):
        async def read_pages(self, offset, length):
            if offset == 2 * PAGE:
                raise ValueError("a bug in the author's code")
            if offset == 3 * PAGE:
                return b"short"
            return await super().read_pages(offset, length)

    store = Buggy()
    store.put(0, b"x" * (8 * PAGE))
    async with served(store, ("k1", PAGE, 32)) as (pager, [(kernel, task, address)]):
        for page in (2, 3):
            with pytest.raises(KernMemoryError) as failure:
                await task.read(address + page * PAGE, 1)
            assert failure.value.reason == KERN_MEMORY_FAILURE
        assert await task.read(address + 4 * PAGE, 1) == b"x"  # the pager still serves
        text = pager.trace.read(0, 1 << 20).decode()
        assert "ValueError: a bug in the author's code" in text and "returned 5 bytes for 4096" in text


async def test_offer_page_skips_kernels_that_hold_the_page():
    store = MemoryObject()
    store.put(0, b"held".ljust(PAGE, b"\0"))
    async with served(store, ("k1", PAGE, 32)) as (pager, [(kernel, task, address)]):
        await task.write(address, b"HELD")
        assert await pager.offer_page(0, bytes(PAGE)) == 0
        # the offer first cleaned the writer (a read-only copy may only go out then) and then
        # left it alone: its page and its write are intact
        (record,) = pager.kernels.values()
        assert record.pagemap.get(0).access == VM_PROT_READ
        assert store.data[:4] == b"HELD"
        assert await task.read(address, 4) == b"HELD"


async def test_two_kernels_reading_one_hole_at_once_are_never_both_writers():
    store = MemoryObject()  # page 0 is a hole: answered with data_unavailable, unlocked
    store.read_gate = trio.Event()
    async with served(store, ("k1", PAGE, 32), ("k2", PAGE, 32)) as (pager, [(k1, t1, a1), (k2, t2, a2)]):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(t1.read, a1, 1)
            nursery.start_soon(t2.read, a2, 1)
            await trio.testing.wait_all_tasks_blocked()
            store.read_gate.set()
        writers = [r.label for r in pager.kernels.values() if r.pagemap.writable()]
        assert len(writers) <= 1
        await t1.write(a1, b"k1 wrote")
        await t2.write(a2, b"k2 wrote")
        assert await t1.read(a1, 8) == await t2.read(a2, 8) == b"k2 wrote"


async def test_a_read_unlock_leaves_a_kernel_its_write_access_and_its_changes_are_found():
    store = MemoryObject()
    store.put(0, b"old!".ljust(PAGE, b"\0"))
    async with served(store, ("k1", PAGE, 32), ("k2", PAGE, 32)) as (pager, [(k1, t1, a1), (k2, t2, a2)]):
        await t1.write(a1, b"new!")
        await pager.lock(0, PAGE, VM_PROT_READ)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(t1.read, a1, 4)  # its data_unlock for reading is held
            await trio.testing.wait_all_tasks_blocked()
            await pager.lock(0, PAGE, 0)
        record1 = next(r for r in pager.kernels.values() if r.host == "k1")
        assert record1.pagemap.get(0).access & VM_PROT_WRITE
        assert await t2.read(a2, 4) == b"new!"
        await pager.sync()
        assert store.data[:4] == b"new!"


async def test_a_manager_lock_applies_only_to_its_range():
    store = MemoryObject()
    store.put(0, bytes(8 * PAGE))
    async with served(store, ("k1", PAGE, 32)) as (pager, [(kernel, task, address)]):
        await task.write(address + 5 * PAGE, b"w")
        await pager.lock(0, PAGE, VM_PROT_READ | VM_PROT_WRITE)
        await pager.sync()
        unlocks = kernel.stats.unlocks
        await task.write(address + 5 * PAGE, b"x")  # write-protected by sync: asks once
        assert kernel.stats.unlocks == unlocks + 1
        await task.read(address + 6 * PAGE, 1)
        assert kernel.stats.unlocks == unlocks + 1  # no read lock leaked outside [0, PAGE)

"""Read-ahead in the kernel (kernels with clusters of 16 pages or more ask for the next clusters
ahead of a sequential reader): with pageout under tight memory, locks, copies made while it is
in flight, data_error on a read-ahead cluster, manager death, and concurrent readers and writers."""
from __future__ import annotations
import random
from collections import Counter

import pytest, trio, trio.testing
import kernelsim
from kernelsim import calls
from kernelsim import messages as m
from kernelsim.interface import (MEMORY_OBJECT_COPY_CALL, MEMORY_OBJECT_COPY_DELAY, MEMORY_OBJECT_COPY_NONE,
    VM_PROT_WRITE, VM_PROT_NONE, KernMemoryError)
from managers import TestManager

PAGE = 4096
C = 16

def pattern_manager(pages):
    manager = TestManager(size=pages * PAGE)
    rng = random.Random(5)
    manager.backing[:] = rng.randbytes(pages * PAGE)
    return manager

async def test_sequential_read_all_requests_once():
    pages = 64 * C
    manager = pattern_manager(pages)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run)
        async with kernelsim.boot("k", PAGE, pages + 200, cluster_pages=C) as kernel:
            assert kernel.read_ahead == 2
            task = await kernel.task_create()
            a = await task.vm_map(manager.send_right(), pages * PAGE)
            out = b"".join([await task.read(a + o, C * PAGE) for o in range(0, pages * PAGE, C * PAGE)])
            assert out == bytes(manager.backing)
            reqs = [(r.offset, r.length) for r in manager.messages(m.MemoryObjectDataRequest)]
            assert sorted(reqs) == [(o, C * PAGE) for o in range(0, pages * PAGE, C * PAGE)]
            assert kernel.stats.read_aheads == 64 - 2
            assert kernel.stats.data_requests == 64 and kernel.stats.pages_requested == pages
        nursery.cancel_scope.cancel()

@pytest.mark.parametrize("memory", [40, 48, 64, 100, 300])
@pytest.mark.parametrize("step", [1, 100, PAGE, 3 * PAGE + 7, C * PAGE])
async def test_tight_memory_and_writes(memory, step):
    pages = 20 * C
    manager = pattern_manager(pages)
    expect = bytearray(manager.backing)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run)
        async with kernelsim.boot("k", PAGE, memory, cluster_pages=C) as kernel:
            task = await kernel.task_create()
            a = await task.vm_map(manager.send_right(), pages * PAGE)
            for rnd in range(2):
                for o in range(0, pages * PAGE, step):
                    n = min(step, pages * PAGE - o)
                    got = await task.read(a + o, n)
                    assert got == expect[o:o + n], (rnd, o)
                    assert kernel.resident.count <= memory
                    if (o // step) % 7 == 3:
                        w = bytes([rnd + 1]) * min(10, n)
                        await task.write(a + o, w)
                        expect[o:o + len(w)] = w
            assert kernel.stats.evictions > 0 or memory >= pages
            assert await task.read(a, pages * PAGE) == expect
            task.terminate()
        assert bytes(manager.backing) == bytes(expect)
        nursery.cancel_scope.cancel()

async def test_write_locked_supplies_and_unlocks():
    pages = 8 * C
    manager = pattern_manager(pages)
    manager.lock_value = VM_PROT_WRITE
    def unlock(msg):
        calls.memory_object_lock_request(msg.control, msg.offset, msg.length, lock_value=VM_PROT_NONE)
    manager.on_unlock = unlock
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run)
        async with kernelsim.boot("k", PAGE, 1000, cluster_pages=C) as kernel:
            task = await kernel.task_create()
            a = await task.vm_map(manager.send_right(), pages * PAGE)
            data = await task.read(a, pages * PAGE)
            assert data == bytes(manager.backing)
            assert kernel.stats.read_aheads > 0
            await task.write(a + 5 * C * PAGE + 3, b"hello")
            assert kernel.stats.unlocks == 1
            assert await task.read(a + 5 * C * PAGE, 8) == bytes(manager.backing[5 * C * PAGE:5 * C * PAGE + 3]) + b"hello"
        nursery.cancel_scope.cancel()

@pytest.mark.parametrize("strategy", [MEMORY_OBJECT_COPY_DELAY, MEMORY_OBJECT_COPY_CALL, MEMORY_OBJECT_COPY_NONE])
async def test_copy_while_read_ahead_in_flight(strategy):
    """A copy (vm_map with copy) is made while a cluster and its read-ahead are on their way;
    then the original is written.  Under every strategy the copy reads what the object held
    at copy time, byte for byte, and the original its new bytes."""
    pages = 8 * C
    manager = pattern_manager(pages)
    manager.copy_strategy = strategy
    held = []
    manager_on = {"hold": False}
    def on_request(msg):
        if manager_on["hold"]:
            held.append(msg)
        else:
            calls.memory_object_data_supply(msg.control, msg.offset, manager.pattern(msg.offset, msg.length))
    manager.on_request = on_request
    original = bytes(manager.backing)
    copies = []
    async with trio.open_nursery() as nursery:
        def on_copy(msg):
            # COPY_CALL: the manager serves the new object with the range's bytes as they are
            # now (no kernel has changed them: nothing was written yet).
            copy = TestManager(size=msg.length, port=msg.new_object)
            copy.backing[:] = manager.backing[msg.offset : msg.offset + msg.length]
            copies.append((msg.offset, msg.length, copy))
            nursery.start_soon(copy.run)
        manager.on_copy = on_copy
        # A write to a page the copy made write-locked asks first; the copy is safe by then.
        manager.on_unlock = lambda msg: calls.memory_object_lock_request(msg.control, msg.offset, msg.length, lock_value=VM_PROT_NONE)
        nursery.start_soon(manager.run)
        async with kernelsim.boot("k", PAGE, 2000, cluster_pages=C) as kernel:
            task = await kernel.task_create()
            a = await task.vm_map(manager.send_right(), pages * PAGE)
            await task.read(a, C * PAGE)
            manager_on["hold"] = True
            async with trio.open_nursery() as inner:
                inner.start_soon(task.read, a + C * PAGE, 1)  # sequential: cluster 1 + read-ahead 2, 3
                await trio.testing.wait_all_tasks_blocked()
                assert len(held) == 3, [(h.offset, h.length) for h in held]
                # a copy is made while pages are absent
                copy_task = await kernel.task_create()
                async with trio.open_nursery() as cn:
                    async def make_copy():
                        copy_task.addr = await copy_task.vm_map(manager.send_right(), pages * PAGE, copy=True)
                    cn.start_soon(make_copy)
                    await trio.testing.wait_all_tasks_blocked()
                    manager_on["hold"] = False
                    for h in held:
                        calls.memory_object_data_supply(h.control, h.offset, manager.pattern(h.offset, h.length),
                                                        lock_value=VM_PROT_NONE)
                    held.clear()
            if strategy == MEMORY_OBJECT_COPY_CALL:
                assert [(offset, length) for offset, length, _ in copies] == [(0, pages * PAGE)]  # the manager was asked
                # pages on their way when the COPY_CALL copy was made are write-locked on arrival
                obj = task.map.lookup(a).object
                page = obj.pages[2 * C * PAGE]
                assert page.page_lock & VM_PROT_WRITE
            else:
                assert copies == []
            # the original is written: the copy keeps the old contents
            await task.write(a + 2 * C * PAGE, b"NEW")
            assert await task.read(a + 2 * C * PAGE, 3) == b"NEW"
            assert await copy_task.read(copy_task.addr, pages * PAGE) == original
            if strategy == MEMORY_OBJECT_COPY_CALL:
                # ... and served the copy's pages the kernel did not have from its copy object
                assert copies[0][2].messages(m.MemoryObjectDataRequest)
            assert await task.read(a, pages * PAGE) == original[: 2 * C * PAGE] + b"NEW" + original[2 * C * PAGE + 3 :]
        nursery.cancel_scope.cancel()

async def test_data_error_on_read_ahead_then_asked_again():
    """The manager answers the first request for each cluster from 2 on with data_error.  Those
    requests are read-ahead (the reader is a cluster behind), so the error never reaches the
    reader: the kernel asks for the cluster again when the reader gets there, and every byte
    read is the manager's."""
    pages = 8 * C
    manager = pattern_manager(pages)
    failed = set()
    def on_request(msg):
        if msg.offset >= 2 * C * PAGE and msg.offset not in failed:
            failed.add(msg.offset)
            calls.memory_object_data_error(msg.control, msg.offset, msg.length, 5)
        else:
            calls.memory_object_data_supply(msg.control, msg.offset, manager.pattern(msg.offset, msg.length))
    manager.on_request = on_request
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run)
        async with kernelsim.boot("k", PAGE, 2000, cluster_pages=C) as kernel:
            task = await kernel.task_create()
            a = await task.vm_map(manager.send_right(), pages * PAGE)
            # A KernMemoryError here (an error that reached the reader) fails the test.
            out = [await task.read(a + o, C * PAGE) for o in range(0, pages * PAGE, C * PAGE)]
            assert b"".join(out) == bytes(manager.backing)
            assert failed == {o for o in range(2 * C * PAGE, pages * PAGE, C * PAGE)}
            asked = Counter(r.offset for r in manager.messages(m.MemoryObjectDataRequest))
            assert asked == {o: 2 if o in failed else 1 for o in range(0, pages * PAGE, C * PAGE)}
            assert kernel.stats.data_errors == len(failed) * C
            assert kernel.resident.count == pages  # every page came in, none left in error
        nursery.cancel_scope.cancel()

async def test_manager_death_with_read_ahead_in_flight():
    pages = 8 * C
    manager = pattern_manager(pages)
    hold = {"on": False}
    def on_request(msg):
        if not hold["on"]:
            calls.memory_object_data_supply(msg.control, msg.offset, manager.pattern(msg.offset, msg.length))
    manager.on_request = on_request
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run)
        async with kernelsim.boot("k", PAGE, 2000, cluster_pages=C) as kernel:
            task = await kernel.task_create()
            a = await task.vm_map(manager.send_right(), pages * PAGE)
            await task.read(a, C * PAGE)
            hold["on"] = True
            result = []
            async def reader():
                try:
                    await task.read(a + C * PAGE, 2 * C * PAGE)
                except KernMemoryError as e:
                    result.append(e)
            with trio.fail_after(5):
                async with trio.open_nursery() as inner:
                    inner.start_soon(reader)
                    await trio.testing.wait_all_tasks_blocked()
                    manager.port.destroy()
            assert result and isinstance(result[0], KernMemoryError)
        nursery.cancel_scope.cancel()

async def test_small_clusters_do_not_read_ahead():
    manager = pattern_manager(64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run)
        async with kernelsim.boot("k", PAGE, 200, cluster_pages=4) as kernel:
            assert kernel.read_ahead == 0
            task = await kernel.task_create()
            a = await task.vm_map(manager.send_right(), 64 * PAGE)
            assert await task.read(a, 64 * PAGE) == bytes(manager.backing)
            assert kernel.stats.read_aheads == 0 and kernel.stats.data_requests == 16
        async with kernelsim.boot("k2", PAGE, 200, cluster_pages=4, read_ahead=3) as kernel:
            task = await kernel.task_create()
            a = await task.vm_map(manager.send_right(), 64 * PAGE)
            assert await task.read(a, 64 * PAGE) == bytes(manager.backing)
            assert kernel.stats.read_aheads == 14 and kernel.stats.data_requests == 16
        nursery.cancel_scope.cancel()

async def test_concurrent_readers_and_writers():
    pages = 16 * C
    manager = pattern_manager(pages)
    expect = bytearray(manager.backing)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run)
        async with kernelsim.boot("k", PAGE, 120, cluster_pages=C) as kernel:
            task = await kernel.task_create()
            a = await task.vm_map(manager.send_right(), pages * PAGE)
            async def writer(i):
                for o in range(i * PAGE * 7 + 11, pages * PAGE, PAGE * 29):
                    await task.write(a + o, b"W%d" % i)
                    expect[o:o + 2] = b"W%d" % i
            async def reader(i):
                for o in range(0, pages * PAGE, PAGE * (i + 1)):
                    await task.read(a + o, PAGE)
            async with trio.open_nursery() as inner:
                for i in range(3):
                    inner.start_soon(reader, i)
                inner.start_soon(writer, 1)
            assert await task.read(a, pages * PAGE) == expect
            task.terminate()
        assert bytes(manager.backing) == bytes(expect)
        nursery.cancel_scope.cancel()

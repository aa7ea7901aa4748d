"""The kernel's side of EMM creation and data calls, against a manager written in the test."""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import kernelsim
from kernelsim import calls, port_allocate, port_set_allocate
from kernelsim import messages as m
from kernelsim.interface import (
    KERN_MEMORY_FAILURE,
    KERN_MEMORY_PRESENT,
    KERN_SUCCESS,
    KERN_TERMINATED,
    MEMORY_OBJECT_COPY_CALL,
    MEMORY_OBJECT_COPY_DELAY,
    MEMORY_OBJECT_COPY_NONE,
    VM_PROT_ALL,
    VM_PROT_NONE,
    VM_PROT_READ,
    VM_PROT_WRITE,
    KernMemoryError,
    MachSendInvalidDest,
)
from managers import WAIT, TestManager

PAGE = 4096


@asynccontextmanager
async def setup(manager: TestManager, *, pages: int = 8, memory: int = 64, cluster: int = 1, page_size: int = PAGE):
    """A kernel with one task mapping `pages` pages of the manager's object; yields
    (kernel, task, address)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run)
        async with kernelsim.boot("k1", page_size, memory, cluster_pages=cluster) as kernel:
            task = await kernel.task_create()
            address = await task.vm_map(manager.send_right(), pages * page_size)
            yield kernel, task, address
        nursery.cancel_scope.cancel()


async def test_first_fault_sends_init_and_nothing_before_ready():
    manager = TestManager(auto_ready=False)
    manager.fill_pattern()
    async with setup(manager) as (kernel, task, address):
        results = []

        async def reader():
            results.append(await task.read(address + PAGE, 4))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            init = await manager.wait_for(m.MemoryObjectInit)
            assert init.page_size == PAGE
            assert init.control.port.kobject is not None  # a kernel port
            assert init.name != init.control
            # the fault waits: no data_request may come before ready
            await trio.testing.wait_all_tasks_blocked()
            assert manager.messages(m.MemoryObjectDataRequest) == []
            assert results == []
            calls.memory_object_ready(init.control, False, MEMORY_OBJECT_COPY_DELAY)
        assert results == [manager.pattern(PAGE, 4)]
        request = manager.messages(m.MemoryObjectDataRequest)[0]
        assert (request.offset, request.length, request.desired_access) == (PAGE, PAGE, VM_PROT_READ)
        assert request.control == init.control
        # a second fault on the same object does not init again
        await task.read(address, 1)
        assert len(manager.messages(m.MemoryObjectInit)) == 1


async def test_write_fault_asks_for_read_and_write_access():
    manager = TestManager()
    async with setup(manager) as (kernel, task, address):
        await task.write(address + 3 * PAGE, b"x")
        request = manager.messages(m.MemoryObjectDataRequest)[0]
        assert request.offset == 3 * PAGE
        assert request.desired_access == VM_PROT_READ | VM_PROT_WRITE


async def test_data_request_clusters_up_to_the_configured_size_within_the_entry():
    manager = TestManager()
    manager.fill_pattern()
    async with setup(manager, pages=6, cluster=4) as (kernel, task, address):
        await task.read(address + 2 * PAGE, 1)
        await task.read(address, 1)  # pages 0-1: stops at the resident page 2
        await task.read(address + 5 * PAGE, 1)
        requests = [(r.offset, r.length) for r in manager.messages(m.MemoryObjectDataRequest)]
        # page 2 takes 2..5 (the entry ends at 6); page 0 takes 0..1; page 5 is already in
        assert requests == [(2 * PAGE, 4 * PAGE), (0, 2 * PAGE)]
        assert await task.read(address, 6 * PAGE) == manager.pattern(0, 6 * PAGE)


async def test_supply_of_a_partial_page_discards_the_partial_part():
    manager = TestManager()
    manager.fill_pattern()
    manager.on_request = lambda request: None  # the test answers by hand
    async with setup(manager, cluster=2) as (kernel, task, address):
        reads = {}

        async def read(page):
            reads[page] = await task.read(address + page * PAGE, PAGE)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, 0)
            request = await manager.wait_for(m.MemoryObjectDataRequest)
            assert request.length == 2 * PAGE
            nursery.start_soon(read, 1)
            # one and a half pages: the half page is dropped, page 1 stays absent
            calls.memory_object_data_supply(request.control, 0, b"a" * PAGE + b"b" * (PAGE // 2))
            await trio.testing.wait_all_tasks_blocked()
            assert reads == {0: b"a" * PAGE}
            assert kernel.stats.partial_pages_discarded == 1
            calls.memory_object_data_supply(request.control, PAGE, b"c" * PAGE)
        assert reads[1] == b"c" * PAGE


async def test_supplied_lock_value_forbidding_the_access_sends_data_unlock():
    manager = TestManager()
    manager.fill_pattern()
    manager.lock_value = VM_PROT_WRITE  # readable, but writes must ask
    async with setup(manager) as (kernel, task, address):
        assert await task.read(address, 3) == manager.pattern(0, 3)
        assert manager.messages(m.MemoryObjectDataUnlock) == []
        done = []

        async def writer():
            await task.write(address, b"new")
            done.append(True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            unlock = await manager.wait_for(m.MemoryObjectDataUnlock)
            assert (unlock.offset, unlock.length, unlock.desired_access) == (0, PAGE, VM_PROT_WRITE)
            await trio.testing.wait_all_tasks_blocked()
            assert done == []  # the write waits for the manager
            calls.memory_object_lock_request(unlock.control, 0, PAGE, lock_value=VM_PROT_NONE)
        assert await task.read(address, 3) == b"new"
        assert len(manager.messages(m.MemoryObjectDataUnlock)) == 1


async def test_a_read_of_a_page_locked_against_reading_also_asks_to_unlock():
    manager = TestManager()
    manager.lock_value = VM_PROT_ALL
    manager.on_unlock = lambda unlock: calls.memory_object_lock_request(unlock.control, unlock.offset, unlock.length)
    async with setup(manager) as (kernel, task, address):
        with trio.fail_after(WAIT):
            assert await task.read(address, 1) == b"\0"
        (unlock,) = manager.messages(m.MemoryObjectDataUnlock)
        assert unlock.desired_access == VM_PROT_READ


async def test_supply_completed_reports_memory_present_for_data_already_held():
    manager = TestManager()
    manager.fill_pattern()
    reply = port_allocate("supply reply")
    async with setup(manager) as (kernel, task, address):
        await task.read(address + PAGE, 1)  # page 1 is now held
        control = manager.messages(m.MemoryObjectInit)[0].control
        # pages 0..2 offered: 0 is taken, 1 is already there, so the supply stops at 1
        calls.memory_object_data_supply(control, 0, b"z" * (3 * PAGE), reply_to=reply.make_send_once())
        completed = (await reply.receive()).message
        assert isinstance(completed, m.MemoryObjectSupplyCompleted)
        assert (completed.offset, completed.length) == (0, 3 * PAGE)
        assert completed.result == KERN_MEMORY_PRESENT and completed.error_offset == PAGE
        assert await task.read(address, PAGE) == b"z" * PAGE  # taken without a request
        assert await task.read(address + PAGE, PAGE) == manager.pattern(PAGE, PAGE)  # new data ignored
        # page 2 was past the stop: it still comes from a request
        assert await task.read(address + 2 * PAGE, 1) == manager.pattern(2 * PAGE, 1)
        assert [r.offset for r in manager.messages(m.MemoryObjectDataRequest)] == [PAGE, 2 * PAGE]
        calls.memory_object_data_supply(control, 3 * PAGE, b"q" * PAGE, reply_to=reply.make_send_once())
        completed = (await reply.receive()).message
        assert completed.result == KERN_SUCCESS


async def test_data_unavailable_gives_zero_filled_unlocked_pages():
    manager = TestManager()
    manager.fill_pattern()
    manager.on_request = lambda r: calls.memory_object_data_unavailable(r.control, r.offset, r.length)
    async with setup(manager) as (kernel, task, address):
        assert await task.read(address + PAGE, PAGE) == bytes(PAGE)
        await task.write(address + PAGE, b"written")  # unlocked: no data_unlock
        assert manager.messages(m.MemoryObjectDataUnlock) == []
        assert await task.read(address + PAGE, 7) == b"written"


async def test_data_error_fails_the_fault_with_offset_and_reason_and_never_hangs():
    manager = TestManager()
    failures = []

    def answer(request):
        if not failures:
            failures.append(request)
            calls.memory_object_data_error(request.control, request.offset, request.length, KERN_MEMORY_FAILURE)
        else:
            calls.memory_object_data_supply(request.control, request.offset, b"ok" * (request.length // 2))

    manager.on_request = answer
    async with setup(manager) as (kernel, task, address):
        with trio.fail_after(WAIT), pytest.raises(KernMemoryError) as failure:
            await task.read(address + 2 * PAGE + 5, 1)
        assert failure.value.offset == 2 * PAGE
        assert failure.value.reason == KERN_MEMORY_FAILURE
        # the error touched only the fault that was waiting: the next access asks again
        assert await task.read(address + 2 * PAGE, 2) == b"ok"
        assert len(manager.messages(m.MemoryObjectDataRequest)) == 2


async def test_destroy_while_a_fault_is_pending_fails_it_then_terminates_with_the_ports():
    manager = TestManager()
    manager.on_request = lambda request: None
    async with setup(manager) as (kernel, task, address):
        async with trio.open_nursery() as nursery:

            async def reader():
                with pytest.raises(KernMemoryError) as failure:
                    await task.read(address + PAGE, 1)
                assert failure.value.reason == 42 and failure.value.offset == PAGE

            nursery.start_soon(reader)
            await manager.wait_for(m.MemoryObjectDataRequest)
            init = manager.messages(m.MemoryObjectInit)[0]
            calls.memory_object_destroy(init.control, 42)
        terminate = await manager.wait_for(m.MemoryObjectTerminate)
        assert terminate.control.port is init.control.port
        assert terminate.name.port is init.name.port
        assert terminate.control.port.kobject is None  # no longer served by the kernel
        # every later fault on the object fails too, at once
        with trio.fail_after(WAIT), pytest.raises(KernMemoryError) as failure:
            await task.read(address, 1)
        assert failure.value.reason == 42
        # the manager destroyed the rights it was handed: the old control port is gone
        with pytest.raises(MachSendInvalidDest):
            calls.memory_object_data_supply(init.control, 0, b"x" * PAGE)


async def test_terminate_after_the_last_mapping_returns_dirty_and_precious_pages_first():
    manager = TestManager()
    manager.fill_pattern()
    manager.precious = True
    async with setup(manager, pages=4) as (kernel, task, address):
        second = await task.vm_map(manager.send_right(), PAGE)  # the same object mapped twice
        await task.read(address, 1)  # clean precious page 0
        await task.write(address + PAGE, b"dirty")  # dirty page 1
        task.vm_deallocate(address, 4 * PAGE)
        await trio.testing.wait_all_tasks_blocked()
        assert manager.messages(m.MemoryObjectTerminate) == []  # one mapping is left
        task.vm_deallocate(second, PAGE)
        await manager.wait_for(m.MemoryObjectTerminate)
        kinds = [type(r.message) for r in manager.received]
        assert kinds.index(m.MemoryObjectTerminate) == len(kinds) - 1
        returns = manager.messages(m.MemoryObjectDataReturn)
        assert [(r.offset, len(r.data), r.dirty) for r in returns] == [(0, PAGE, False), (PAGE, PAGE, True)]
        assert manager.backing[PAGE : PAGE + 5] == b"dirty"
        assert kernel.resident.count == 0


async def test_may_cache_keeps_the_object_until_the_manager_uncaches_it():
    manager = TestManager()
    manager.may_cache = True
    manager.fill_pattern()
    async with setup(manager, pages=2) as (kernel, task, address):
        await task.read(address, 1)
        task.vm_deallocate(address, 2 * PAGE)
        await trio.testing.wait_all_tasks_blocked()
        assert manager.messages(m.MemoryObjectTerminate) == []
        # mapped again: the cached object is reused, no new init, no new request
        address = await task.vm_map(manager.send_right(), 2 * PAGE)
        assert await task.read(address, 1) == manager.pattern(0, 1)
        assert len(manager.messages(m.MemoryObjectInit)) == 1
        assert len(manager.messages(m.MemoryObjectDataRequest)) == 1
        task.vm_deallocate(address, 2 * PAGE)
        control = manager.messages(m.MemoryObjectInit)[0].control
        reply = port_allocate()
        calls.memory_object_change_attributes(control, False, MEMORY_OBJECT_COPY_NONE, reply.make_send_once())
        completed = (await reply.receive()).message
        assert completed == m.MemoryObjectChangeCompleted(may_cache=False, copy_strategy=MEMORY_OBJECT_COPY_NONE)
        await manager.wait_for(m.MemoryObjectTerminate)


async def test_get_and_change_attributes():
    manager = TestManager(auto_ready=False)
    async with setup(manager) as (kernel, task, address):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(task.read, address, 1)
            init = await manager.wait_for(m.MemoryObjectInit)
            attributes = await calls.memory_object_get_attributes(init.control)
            assert (attributes.return_code, attributes.object_ready) == (KERN_SUCCESS, False)
            # change_attributes also makes the object ready (the chapter says so)
            reply = port_allocate()
            calls.memory_object_change_attributes(init.control, True, MEMORY_OBJECT_COPY_CALL, reply.make_send_once())
            assert (await reply.receive()).message.copy_strategy == MEMORY_OBJECT_COPY_CALL
        attributes = await calls.memory_object_get_attributes(init.control)
        assert (attributes.object_ready, attributes.may_cache, attributes.copy_strategy) == (True, True, MEMORY_OBJECT_COPY_CALL)


async def test_seqnos_seen_by_the_manager_strictly_increase_per_port():
    """Two objects served from one port set: each port numbers its own messages 1, 2, 3..."""
    managers = [TestManager(label=f"object{i}") for i in range(2)]
    port_set = port_set_allocate("manager")
    for manager in managers:
        port_set.add(manager.port)
    seen = []

    async def serve():
        async for received in port_set:
            seen.append((received.port, received.seqno))
            next(x for x in managers if x.port == received.port).handle(received.message)

    async with trio.open_nursery() as nursery, kernelsim.boot("k1", PAGE, 8, cluster_pages=1) as kernel:
        nursery.start_soon(serve)
        task = await kernel.task_create()
        addresses = [await task.vm_map(manager.send_right(), 16 * PAGE) for manager in managers]
        async with trio.open_nursery() as faults:
            for page in range(16):
                for address in addresses:
                    faults.start_soon(task.write, address + page * PAGE, b"w")
        for address in addresses:
            task.vm_deallocate(address, 16 * PAGE)  # returns and terminates: more messages
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    for manager in managers:
        seqnos = [seqno for port, seqno in seen if port == manager.port]
        assert len(seqnos) > 16
        assert seqnos == list(range(1, len(seqnos) + 1))


async def test_manager_death_fails_pending_and_later_faults():
    manager = TestManager()
    manager.on_request = lambda request: None
    async with setup(manager) as (kernel, task, address):
        async with trio.open_nursery() as nursery:

            async def reader():
                with trio.fail_after(WAIT), pytest.raises(KernMemoryError) as failure:
                    await task.read(address, 1)
                assert failure.value.reason == KERN_MEMORY_FAILURE
                assert "manager died" in str(failure.value)

            nursery.start_soon(reader)
            await manager.wait_for(m.MemoryObjectDataRequest)
            manager.port.destroy()
        with pytest.raises(KernMemoryError):
            await task.read(address + PAGE, 1)


async def test_unsolicited_supply_is_used_without_a_request_and_misaligned_calls_are_refused():
    manager = TestManager()
    async with setup(manager) as (kernel, task, address):
        await task.read(address, 1)
        control = manager.messages(m.MemoryObjectInit)[0].control
        calls.memory_object_data_supply(control, 5 * PAGE, b"early" + bytes(PAGE - 5))
        assert await task.read(address + 5 * PAGE, 5) == b"early"
        assert [r.offset for r in manager.messages(m.MemoryObjectDataRequest)] == [0]
        refused = kernel.stats.refused_calls
        calls.memory_object_data_supply(control, 100, b"x" * PAGE)
        calls.memory_object_lock_request(control, 3, PAGE, should_flush=True)
        assert kernel.stats.refused_calls == refused + 2
        assert await task.read(address + 5 * PAGE, 5) == b"early"


async def test_terminate_of_an_object_never_faulted_sends_nothing():
    manager = TestManager()
    async with setup(manager) as (kernel, task, address):
        task.vm_deallocate(address, 8 * PAGE)
        await trio.testing.wait_all_tasks_blocked()
        assert manager.received == []


async def test_a_lock_request_flush_drops_pages_and_later_faults_ask_again():
    manager = TestManager()
    manager.fill_pattern()
    async with setup(manager) as (kernel, task, address):
        await task.write(address, b"kept")
        control = manager.messages(m.MemoryObjectInit)[0].control
        reply = port_allocate()
        calls.memory_object_lock_request(control, 0, 8 * PAGE, 1, True, VM_PROT_NONE, reply.make_send_once())
        completed = (await reply.receive()).message
        assert isinstance(completed, m.MemoryObjectLockCompleted) and completed.length == 8 * PAGE
        returned = await manager.wait_for(m.MemoryObjectDataReturn)
        assert len(manager.messages(m.MemoryObjectDataReturn)) == 1
        assert returned.dirty and not returned.kernel_copy and returned.data[:4] == b"kept"
        assert kernel.resident.count == 0
        assert await task.read(address, 4) == b"kept"  # fetched again from the manager
        assert len(manager.messages(m.MemoryObjectDataRequest)) == 2


async def test_clean_pages_are_dropped_under_the_memory_limit():
    manager = TestManager(size=64 * PAGE)
    manager.fill_pattern()
    async with setup(manager, pages=64, memory=4) as (kernel, task, address):
        for page in range(64):
            assert await task.read(address + page * PAGE, 1) == manager.pattern(page * PAGE, 1)
            assert kernel.resident.count <= 4
        assert kernel.resident.peak == 4
        assert manager.messages(m.MemoryObjectDataReturn) == []


async def test_a_cached_object_goes_when_memory_pressure_takes_its_last_page():
    cached, other = TestManager(label="cached"), TestManager(label="other")
    cached.may_cache = True
    async with trio.open_nursery() as nursery, kernelsim.boot("k1", PAGE, 4) as kernel:
        nursery.start_soon(cached.run)
        nursery.start_soon(other.run)
        task = await kernel.task_create()
        address = await task.vm_map(cached.send_right(), 2 * PAGE)
        await task.read(address, 2 * PAGE)
        task.vm_deallocate(address, 2 * PAGE)
        await trio.testing.wait_all_tasks_blocked()
        assert cached.messages(m.MemoryObjectTerminate) == []  # cached, pages still resident
        busy = await task.vm_map(other.send_right(), 8 * PAGE)
        await task.read(busy, 8 * PAGE)  # needs every frame
        await cached.wait_for(m.MemoryObjectTerminate)
        assert len(kernel.objects) == 1
        nursery.cancel_scope.cancel()

"""Tasks, address maps and the vm_* calls; memory access across pages and entries."""

from __future__ import annotations

import pytest
import trio

import kernelsim
from kernelsim.interface import (
    VM_INHERIT_COPY,
    VM_INHERIT_NONE,
    VM_INHERIT_SHARE,
    VM_PROT_ALL,
    VM_PROT_DEFAULT,
    VM_PROT_NONE,
    VM_PROT_READ,
    VM_PROT_WRITE,
    KernInvalidAddress,
    KernInvalidArgument,
    KernNoSpace,
    KernProtectionFailure,
)
from managers import TestManager

PAGE = 4096


async def test_vm_allocate_is_page_aligned_and_zero_filled():
    async with kernelsim.boot("k1", PAGE, 64) as kernel:
        task = await kernel.task_create()
        address = task.vm_allocate(3 * PAGE + 1)
        assert address % PAGE == 0
        region = task.vm_region(address)
        assert region.size == 4 * PAGE
        assert await task.read(address, 4 * PAGE) == bytes(4 * PAGE)


async def test_reads_and_writes_cross_pages_and_map_entries():
    manager = TestManager()
    manager.fill_pattern()
    async with trio.open_nursery() as nursery, kernelsim.boot("k1", PAGE, 64) as kernel:
        nursery.start_soon(manager.run)
        task = await kernel.task_create()
        anonymous = task.vm_allocate(2 * PAGE, address=0x100000, anywhere=False)
        mapped = await task.vm_map(manager.send_right(), 2 * PAGE, address=0x100000 + 2 * PAGE, anywhere=False)
        assert mapped == anonymous + 2 * PAGE
        # a write across the boundary between the two entries
        payload = bytes(range(256)) * 40
        start = mapped - 5000
        await task.write(start, payload)
        assert await task.read(start, len(payload)) == payload
        # the bytes around it are untouched: zeros before, the manager's pattern after
        assert await task.read(anonymous, start - anonymous) == bytes(start - anonymous)
        end = start + len(payload)
        assert await task.read(end, mapped + 2 * PAGE - end) == manager.pattern(end - mapped, mapped + 2 * PAGE - end)
        nursery.cancel_scope.cancel()


async def test_an_unmapped_address_raises_kern_invalid_address_with_the_address():
    async with kernelsim.boot("k1", PAGE, 16) as kernel:
        task = await kernel.task_create()
        address = task.vm_allocate(PAGE)
        with pytest.raises(KernInvalidAddress) as failure:
            await task.read(address + PAGE, 1)
        assert failure.value.address == address + PAGE
        # a range that runs off the end fails at the first unmapped byte
        with pytest.raises(KernInvalidAddress) as failure:
            await task.write(address + PAGE - 2, b"abcd")
        assert failure.value.address == address + PAGE


async def test_protection_violation_raises_kern_protection_failure():
    async with kernelsim.boot("k1", PAGE, 16) as kernel:
        task = await kernel.task_create()
        address = task.vm_allocate(2 * PAGE)
        task.vm_protect(address + PAGE, PAGE, False, VM_PROT_READ)
        await task.write(address, b"ok")
        with pytest.raises(KernProtectionFailure) as failure:
            await task.write(address + PAGE + 10, b"no")
        assert failure.value.address == address + PAGE + 10
        assert failure.value.requested == VM_PROT_WRITE
        assert failure.value.allowed == VM_PROT_READ
        assert await task.read(address + PAGE, 2) == b"\0\0"
        task.vm_protect(address, PAGE, False, VM_PROT_NONE)
        with pytest.raises(KernProtectionFailure):
            await task.read(address, 1)


async def test_vm_protect_cannot_exceed_the_maximum_and_set_maximum_lowers_current():
    async with kernelsim.boot("k1", PAGE, 16) as kernel:
        task = await kernel.task_create()
        address = task.vm_allocate(PAGE)
        task.vm_protect(address, PAGE, True, VM_PROT_READ)
        region = task.vm_region(address)
        assert (region.protection, region.max_protection) == (VM_PROT_READ, VM_PROT_READ)
        with pytest.raises(KernProtectionFailure):
            task.vm_protect(address, PAGE, False, VM_PROT_DEFAULT)
        with pytest.raises(KernInvalidAddress):
            task.vm_protect(address, 2 * PAGE, False, VM_PROT_READ)


async def test_vm_map_refuses_protection_beyond_max_and_unaligned_offsets():
    manager = TestManager()
    async with kernelsim.boot("k1", PAGE, 16) as kernel:
        task = await kernel.task_create()
        with pytest.raises(KernInvalidArgument):
            await task.vm_map(manager.send_right(), PAGE, protection=VM_PROT_ALL, max_protection=VM_PROT_READ)
        with pytest.raises(KernInvalidArgument):
            await task.vm_map(manager.send_right(), PAGE, offset=100)
        assert task.map.entries == []


async def test_fixed_address_in_use_raises_kern_no_space():
    async with kernelsim.boot("k1", PAGE, 16) as kernel:
        task = await kernel.task_create()
        address = task.vm_allocate(4 * PAGE)
        with pytest.raises(KernNoSpace):
            task.vm_allocate(PAGE, address=address + PAGE, anywhere=False)
        # anywhere finds room after it
        assert task.vm_allocate(PAGE) >= address + 4 * PAGE


async def test_vm_deallocate_of_the_middle_splits_the_entry():
    async with kernelsim.boot("k1", PAGE, 16) as kernel:
        task = await kernel.task_create()
        address = task.vm_allocate(3 * PAGE)
        await task.write(address, b"A" * (3 * PAGE))
        task.vm_deallocate(address + PAGE, PAGE)
        with pytest.raises(KernInvalidAddress):
            await task.read(address + PAGE, 1)
        assert await task.read(address, PAGE) == b"A" * PAGE
        assert await task.read(address + 2 * PAGE, PAGE) == b"A" * PAGE
        first, second = task.vm_region(address), task.vm_region(address + PAGE)
        assert (first.address, first.size) == (address, PAGE)
        assert (second.address, second.size, second.offset) == (address + 2 * PAGE, PAGE, 2 * PAGE)


async def test_vm_region_reports_the_entry_or_the_next_and_no_space_past_the_last():
    manager = TestManager()
    async with trio.open_nursery() as nursery, kernelsim.boot("k1", PAGE, 16) as kernel:
        nursery.start_soon(manager.run)
        task = await kernel.task_create()
        address = await task.vm_map(
            manager.send_right(), 2 * PAGE, offset=4 * PAGE, protection=VM_PROT_READ,
            max_protection=VM_PROT_DEFAULT, inheritance=VM_INHERIT_SHARE,
        )
        task.vm_inherit(address, PAGE, VM_INHERIT_NONE)
        region = task.vm_region(address - PAGE)  # below: the next region up
        assert region.address == address and region.size == PAGE
        assert (region.protection, region.max_protection) == (VM_PROT_READ, VM_PROT_DEFAULT)
        assert region.inheritance == VM_INHERIT_NONE and region.offset == 4 * PAGE
        tail = task.vm_region(address + PAGE)
        assert tail.inheritance == VM_INHERIT_SHARE and tail.offset == 5 * PAGE
        # the name port is the one memory_object_init gave the manager
        await task.read(address, 1)
        init = await manager.wait_for(kernelsim.messages.MemoryObjectInit)
        assert region.name == init.name
        with pytest.raises(KernNoSpace):
            task.vm_region(address + 2 * PAGE)
        nursery.cancel_scope.cancel()


async def test_task_create_shares_inherited_memory_and_leaves_out_none():
    async with kernelsim.boot("k1", PAGE, 16) as kernel:
        parent = await kernel.task_create()
        shared = parent.vm_allocate(PAGE)
        private = parent.vm_allocate(PAGE)
        parent.vm_inherit(shared, PAGE, VM_INHERIT_SHARE)
        parent.vm_inherit(private, PAGE, VM_INHERIT_NONE)
        task = await kernel.task_create()
        alone = task.vm_allocate(2 * PAGE)
        task.vm_protect(alone, PAGE, False, VM_PROT_READ)  # splits the entry, shares nothing
        assert not task.vm_region(alone).shared and not task.vm_region(alone + PAGE).shared
        assert not parent.vm_region(shared).shared
        child = await kernel.task_create(parent, inherit_memory=True)
        assert parent.vm_region(shared).shared and child.vm_region(shared).shared
        await child.write(shared, b"from child")
        assert await parent.read(shared, 10) == b"from child"
        with pytest.raises(KernInvalidAddress):
            await child.read(private, 1)
        assert (await kernel.task_create(parent, inherit_memory=False)).map.entries == []


async def test_fork_with_copy_inheritance_gives_the_child_the_contents_as_of_the_fork():
    async with kernelsim.boot("k1", PAGE, 16) as kernel:
        parent = await kernel.task_create()
        address = parent.vm_allocate(3 * PAGE)
        await parent.write(address, b"before" + bytes(PAGE) + b"page1")
        child = await kernel.task_create(parent)  # VM_INHERIT_DEFAULT is copy
        await parent.write(address, b"PARENT")
        await child.write(address + 2 * PAGE, b"CHILD")
        assert await child.read(address, 6) == b"before"
        assert await parent.read(address, 6) == b"PARENT"
        assert await parent.read(address + 2 * PAGE, 5) == b"\0" * 5
        assert await child.read(address + 2 * PAGE, 5) == b"CHILD"
        await child.write(address + PAGE + 100, b"mine")  # page 1 is the parent's: copied on write
        assert await child.read(address + PAGE + 6, 5) == b"page1"
        assert await parent.read(address + PAGE + 100, 4) == b"\0" * 4
        # a grandchild copies the child, whatever the child does next
        grandchild = await kernel.task_create(child)
        await child.write(address, b"child!")
        assert await grandchild.read(address, 6) == b"before"
        assert kernel.stats.pushes >= 2 and kernel.stats.cow_faults >= 1


async def test_bad_kernel_parameters_are_refused():
    with pytest.raises(KernInvalidArgument):
        kernelsim.Kernel("k", page_size=6000)
    with pytest.raises(KernInvalidArgument):
        kernelsim.Kernel("k", page_size=2048)
    with pytest.raises(KernInvalidArgument):
        kernelsim.Kernel("k", memory_pages=0)

"""Copies of memory (GNU Mach's vm_object_copy_strategically and friends).

A copy (vm_copy, a fork with VM_INHERIT_COPY, vm_map with copy) keeps the contents as of the
copy, whoever changes the original afterwards.  How depends on the object's copy strategy, which
its manager gave in memory_object_ready (internal objects are always copied on write):

- MEMORY_OBJECT_COPY_NONE: the kernel copies the data now, into a new internal object.
- MEMORY_OBJECT_COPY_CALL: the kernel tells the manager (memory_object_copy, with a new memory
  object whose every right it gets, then memory_object_init on it); the resident pages of the
  original are write-locked (a write must now ask, so the manager can keep the old contents),
  and so are the pages on their way in, when they come; the manager serves the copy, and its
  data_unavailable means "the original's page".
- MEMORY_OBJECT_COPY_DELAY (and internal objects): a copy object shadows the original; a page
  is copied when either side writes it (vm_fault pushes the original's old page into the copy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .interface import (
    MEMORY_OBJECT_COPY_CALL,
    MEMORY_OBJECT_COPY_NONE,
    VM_PROT_READ,
    VM_PROT_WRITE,
    KernMemoryError,
    KernResourceShortage,
    MachSendInvalidDest,
)
from .manager_wait import wait_for_manager
from .messages import MemoryObjectCopy
from .vm_fault import _Restart, _WaitForMemory, fault_page

if TYPE_CHECKING:
    from .vm_object import VMObject


async def copy_range(source: VMObject, offset: int, size: int) -> tuple[VMObject, int]:
    """A copy of [offset, offset+size) of `source`: (the object holding it, its offset there)."""
    kernel = source.kernel
    kernel.stats.copies += 1
    strategy = await _strategy(source)
    if strategy == MEMORY_OBJECT_COPY_NONE:
        return await _copy_now(source, offset, size), 0
    if strategy == MEMORY_OBJECT_COPY_CALL:
        return _copy_call(source, offset, size), 0
    copy = kernel.objects.delayed_copy(source, offset, offset + size)
    if not source.internal:
        await _take_read_copies(source, offset, size)
    return copy, offset


async def _take_read_copies(source: VMObject, offset: int, size: int) -> None:
    """Read in the pages of the range this kernel does not hold.

    Another kernel may have been given write access to them before the copy: its later writes
    would reach the manager without anyone asking this kernel, and the copy would see them.
    Asking for each page (after the copy object exists) takes that write access away; from then
    on, any kernel's write to the range must first have this one flush it, and the copy takes
    the old pages then."""
    kernel = source.kernel
    page_size = kernel.page_size
    for page_offset in range(offset, offset + size, page_size):
        while source.alive and page_offset not in source.pages:
            try:
                await fault_page(source, page_offset, VM_PROT_READ, offset + size)
                break
            except _WaitForMemory as wait:
                await kernel.vm_page_wait(wait.shortage)
            except _Restart:
                pass


async def _strategy(source: VMObject) -> int:
    if source.internal:
        return -1  # copied on write
    # The strategy comes with memory_object_ready: introduce the object first if need be.
    if not source.pager_initialized:
        source.kernel.objects.pager_init(source)
    await wait_for_manager(source, 0, "memory_object_init", source.wait_ready)
    if not source.alive:
        raise KernMemoryError(0, source.death_reason, source.death_message)
    return source.copy_strategy


async def _copy_now(source: VMObject, offset: int, size: int) -> VMObject:
    kernel = source.kernel
    page_size = kernel.page_size
    copy = kernel.objects.allocate_internal(size)
    for copy_offset in range(0, size, page_size):
        while True:
            try:
                page = await fault_page(source, offset + copy_offset, VM_PROT_READ)
                target = kernel.page_alloc(copy, copy_offset)
                break
            except _WaitForMemory as wait:
                await kernel.vm_page_wait(wait.shortage)
            except KernResourceShortage as shortage:
                await kernel.vm_page_wait(shortage)
            except _Restart:
                pass
        target.data = bytearray(page.data)  # type: ignore[arg-type]
        target.dirty = True  # the copy's own data: paged out, never dropped
    return copy


def _copy_call(source: VMObject, offset: int, size: int) -> VMObject:
    kernel = source.kernel
    copy, port = kernel.objects.call_copy(source, offset, size)
    for page in source.pages_in_range(offset, size):
        # "Readable pages may be silently copied to the new memory object; pages not copied
        # are locked to prevent write access."  None is copied here: the manager then serves
        # (and knows) every page of the copy, and a later write to the original asks first,
        # so the manager can keep the old contents for the copy.
        if not page.absent:
            page.page_lock |= VM_PROT_WRITE
        if page.absent or page.unlock_request & VM_PROT_WRITE:
            # On its way: the manager answers a request made before it heard of the copy, and
            # that answer may leave the page writable (a supply for writing, a zero-filled
            # page, a write unlock).  The page is write-locked when it comes all the same, so
            # the task's write asks again, after the memory_object_copy.
            source.lock_on_arrival.add(page)
    try:
        source.pager.send(  # type: ignore[union-attr]
            MemoryObjectCopy(old_control=source.control.make_send(), offset=offset, length=size, new_object=port)  # type: ignore[union-attr]
        )
    except MachSendInvalidDest:
        kernel.objects.manager_died(source)
        raise KernMemoryError(offset, source.death_reason, source.death_message) from None
    # "A memory_object_init call will be made on the new memory object after the currently
    # cached pages of the original object are prepared": the manager hears of it at once.
    kernel.objects.pager_init(copy)
    return copy

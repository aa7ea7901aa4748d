"""Page faults (GNU Mach's vm/vm_fault.c): find or fetch the page behind an address.

For an address in an external object the fault
  1. introduces the kernel to the manager (memory_object_init) if this is the object's first
     fault in this kernel, and waits for memory_object_ready;
  2. sends memory_object_data_request for the page (and, up to the kernel's cluster size, the
     absent pages after it in the same map entry), marks them absent and waits;
  3. if the page came with a lock forbidding the access, sends memory_object_data_unlock and
     waits for a lock request to lift it.
A data_error, a destroy or the manager's death fails the fault with KernMemoryError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .interface import (
    VM_PROT_READ,
    VM_PROT_WRITE,
    KernInvalidAddress,
    KernMemoryError,
    KernProtectionFailure,
    KernResourceShortage,
    MachSendInvalidDest,
)
from .messages import MemoryObjectDataRequest, MemoryObjectDataUnlock

if TYPE_CHECKING:
    from .vm_map import MapEntry, VMMap
    from .vm_object import VMObject
    from .vm_page import Page


def _dead_object_error(object: VMObject, offset: int) -> KernMemoryError:
    return KernMemoryError(offset, object.death_reason, object.death_message)


async def vm_fault(map: VMMap, address: int, access: int) -> Page:
    """The resident page holding `address`, with `access` (VM_PROT_READ or VM_PROT_WRITE)
    permitted by the map and by the manager's lock.  A write marks the page dirty."""
    kernel = map.kernel
    page_size = kernel.page_size
    page_address = address & ~(page_size - 1)
    kernel.stats.faults += 1
    while True:
        entry = map.lookup(address)
        if entry is None:
            raise KernInvalidAddress(address)
        if access & ~entry.protection:
            raise KernProtectionFailure(address, access, entry.protection)
        object = entry.object
        offset = entry.object_offset(page_address)
        if not object.alive:
            raise _dead_object_error(object, offset)
        page = object.pages.get(offset)

        if page is None:
            if object.internal:
                try:
                    page = kernel.page_alloc(object, offset)
                except KernResourceShortage as shortage:
                    await kernel.vm_page_wait(shortage)
                    continue
                page.data = bytearray(page_size)
                kernel.stats.zero_fills += 1
            else:
                await _page_in(entry, object, offset, access)
                continue

        if page.absent:
            await page.wait()
            if page.error is not None:
                raise KernMemoryError(offset, page.error, "memory_object_data_error from the manager")
            continue

        if page.page_lock & access:
            wanted = access & page.page_lock
            if wanted & ~page.unlock_request:
                page.unlock_request |= wanted
                kernel.stats.unlocks += 1
                _send(object, offset, MemoryObjectDataUnlock(
                    control=object.control.make_send(),  # type: ignore[union-attr]
                    offset=offset,
                    length=page_size,
                    desired_access=access,
                ))
            await page.wait()
            continue

        kernel.resident.touch(page)
        if access & VM_PROT_WRITE:
            page.dirty = True
        return page


async def _page_in(entry: MapEntry, object: VMObject, offset: int, access: int) -> None:
    """Ask the manager for the page at `offset` (and a cluster after it) and wait for it."""
    kernel = object.kernel
    page_size = kernel.page_size
    if not object.pager_initialized:
        kernel.objects.pager_init(object)
    if not object.ready:
        await object.wait_ready()
        return  # the fault restarts: the map may have changed while it waited

    # The cluster: this page and the absent ones after it, within the entry and memory.
    entry_end_offset = entry.object_offset(entry.end)
    length = 0
    pages = []
    for index in range(kernel.cluster_pages):
        page_offset = offset + index * page_size
        if page_offset >= entry_end_offset or page_offset in object.pages:
            break
        try:
            page = kernel.page_alloc(object, page_offset)
        except KernResourceShortage as shortage:
            if index == 0:
                await kernel.vm_page_wait(shortage)
                return  # the fault restarts and looks again
            break
        page.absent = True
        pages.append(page)
        length += page_size

    desired_access = VM_PROT_READ | access
    kernel.stats.data_requests += 1
    kernel.stats.pages_requested += len(pages)
    _send(object, offset, MemoryObjectDataRequest(
        control=object.control.make_send(),  # type: ignore[union-attr]
        offset=offset,
        length=length,
        desired_access=desired_access,
    ))
    await pages[0].wait()
    if pages[0].error is not None:
        raise KernMemoryError(offset, pages[0].error, "memory_object_data_error from the manager")


def _send(object: VMObject, offset: int, message) -> None:
    try:
        object.pager.send(message)  # type: ignore[union-attr]
    except MachSendInvalidDest:
        object.kernel.objects.manager_died(object)
        raise _dead_object_error(object, offset) from None

"""Page faults (GNU Mach's vm/vm_fault.c): find or fetch the page behind an address.

The fault looks for the page in the mapped object, then down its shadow chain:
  1. in an object with a manager, a page it does not hold is asked for: memory_object_init and
     memory_object_ready first if this is the object's first fault in this kernel, then
     memory_object_data_request for the page (and, up to the kernel's cluster size, the absent
     pages after it in the same map entry);
  2. a page its manager says is unavailable, in an object that copies another (its shadow),
     is the shadow's page; at the bottom of the chain it is a zero-filled page;
  3. if the page came with a lock forbidding the access, memory_object_data_unlock is sent and
     the fault waits for a lock request to lift it.
A write to a page found in a shadow copies it into the mapped object first (copy-on-write); a
write to an object that has a delayed copy gives the copy the old page first (a push).
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
    from .kernel import Kernel
    from .vm_map import VMMap
    from .vm_object import VMObject
    from .vm_page import Page


class _Restart(Exception):
    """The fault waited for something; it looks again from the map."""


def _dead_object_error(object: VMObject, offset: int) -> KernMemoryError:
    return KernMemoryError(offset, object.death_reason, object.death_message)


async def vm_fault(map: VMMap, address: int, access: int) -> Page:
    """The resident page holding `address`, with `access` (VM_PROT_READ or VM_PROT_WRITE)
    permitted by the map and by the manager's lock.  A write marks the page dirty."""
    kernel = map.kernel
    page_address = address & ~(kernel.page_size - 1)
    kernel.stats.faults += 1
    while True:
        entry = map.lookup(address)
        if entry is None:
            raise KernInvalidAddress(address)
        if access & ~entry.protection:
            raise KernProtectionFailure(address, access, entry.protection)
        first = entry.object
        offset = entry.object_offset(page_address)
        limit = entry.object_offset(entry.end)
        try:
            page = await fault_page(first, offset, access, limit)
        except _WaitForMemory as wait:
            await kernel.vm_page_wait(wait.shortage)
            continue
        except _Restart:
            continue
        kernel.resident.touch(page)
        if access & VM_PROT_WRITE:
            page.dirty = True
        return page


async def fault_page(first: VMObject, offset: int, access: int, limit: int | None = None) -> Page:
    """The page of `first` at `offset` with `access`, from wherever it is in the shadow chain;
    raises _Restart after any wait (the caller looks again).  `limit` bounds the cluster."""
    kernel = first.kernel
    object, object_offset = first, offset
    while True:
        if not object.alive:
            raise _dead_object_error(object, object_offset)
        # Above the first object only reading is needed: a write copies the page up.
        needed = access if object is first else VM_PROT_READ
        page = object.pages.get(object_offset)
        if page is not None:
            await _usable(object, page, needed)
            break
        if object.pager is not None and object_offset not in object.unavailable and (
            not object.internal or object_offset in object.existence
        ):
            cluster_end = limit if object is first else None
            await _page_in(object, object_offset, needed, cluster_end)
            raise _Restart
        if object.shadow is not None:
            object_offset += object.shadow_offset
            object = object.shadow
            continue
        # The bottom of the chain has nothing here: a zero-filled page of the first object.
        page = _allocate(kernel, first, offset)
        page.data = bytearray(kernel.page_size)
        kernel.stats.zero_fills += 1
        if access & VM_PROT_WRITE:
            _push_if_copied(first, offset, page.data)
        return page

    if object is not first:
        if not access & VM_PROT_WRITE:
            return page  # a read sees the shadow's page itself
        # Copy-on-write: the first object gets its own copy of the page (and a delayed copy of
        # the first object, which saw the shadow's page until now, keeps that).
        source = bytes(page.data)  # type: ignore[arg-type]
        _push_if_copied(first, offset, source)
        page = _allocate(kernel, first, offset)
        page.data = bytearray(source)
        kernel.stats.cow_faults += 1
        return page
    if access & VM_PROT_WRITE:
        _push_if_copied(first, offset, page.data)
    return page


async def _usable(object: VMObject, page: Page, access: int) -> None:
    """Return if the page can be used for `access` now; otherwise wait and raise _Restart."""
    if page.absent:
        await page.wait()
        if page.error is not None:
            raise KernMemoryError(page.offset, page.error, "memory_object_data_error from the manager")
        raise _Restart
    if page.page_lock & access:
        wanted = access & page.page_lock
        if wanted & ~page.unlock_request:
            page.unlock_request |= wanted
            object.kernel.stats.unlocks += 1
            _send(object, page.offset, MemoryObjectDataUnlock(
                control=object.control.make_send(),  # type: ignore[union-attr]
                offset=page.offset,
                length=object.kernel.page_size,
                desired_access=access,
            ))
        await page.wait()
        raise _Restart


def _allocate(kernel: Kernel, object: VMObject, offset: int) -> Page:
    """A frame for `object` at `offset`, or (when none can be had now) wait and restart."""
    try:
        return kernel.page_alloc(object, offset)
    except KernResourceShortage as shortage:
        raise _WaitForMemory(shortage) from None


class _WaitForMemory(_Restart):
    def __init__(self, shortage: KernResourceShortage) -> None:
        super().__init__()
        self.shortage = shortage


def _push_if_copied(object: VMObject, offset: int, data: bytes | bytearray | None) -> None:
    """Before the page of `object` at `offset` changes, its newest delayed copy takes the old
    contents `data` (unless it has its own page there); may raise _WaitForMemory."""
    copy = object.copy
    if copy is None or not copy.alive or not copy.covered(offset) or copy.has_own(offset):
        return
    kernel = object.kernel
    pushed = _allocate(kernel, copy, offset)
    pushed.data = bytearray(data)  # type: ignore[arg-type]
    pushed.dirty = True  # the copy's own data now: it must be paged out, not dropped
    kernel.stats.pushes += 1


async def _page_in(object: VMObject, offset: int, access: int, cluster_end: int | None) -> None:
    """Ask the object's manager for the page at `offset` (and a cluster after it) and wait."""
    kernel = object.kernel
    page_size = kernel.page_size
    if not object.pager_initialized:
        kernel.objects.pager_init(object)
    if not object.ready:
        await object.wait_ready()
        return  # the fault restarts: the map may have changed while it waited

    pages = []
    for index in range(kernel.cluster_pages if cluster_end is not None else 1):
        page_offset = offset + index * page_size
        if index and (
            page_offset >= cluster_end  # type: ignore[operator]
            or page_offset in object.pages
            or page_offset in object.unavailable
            or (object.internal and page_offset not in object.existence)
        ):
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

    desired_access = VM_PROT_READ | access
    kernel.stats.data_requests += 1
    kernel.stats.pages_requested += len(pages)
    _send(object, offset, MemoryObjectDataRequest(
        control=object.control.make_send(),  # type: ignore[union-attr]
        offset=offset,
        length=len(pages) * page_size,
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

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
Every wait for the manager's answer goes through manager_wait.wait_for_manager: a fault that
waits long is warned about and listed by `stat`, and fails after the kernel's fault timeout.
A kernel with read-ahead also asks for the clusters after a sequential reader's (_read_ahead).
Tasks reach resident pages that need no fault without coming here (Task._resident_run).
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
from .manager_wait import wait_for_manager
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
            page = await fault_page(first, offset, access, limit, read_ahead=access == VM_PROT_READ)
        except _WaitForMemory as wait:
            await kernel.vm_page_wait(wait.shortage)
            continue
        except _Restart:
            continue
        kernel.resident.touch(page)
        if access & VM_PROT_WRITE:
            page.dirty = True
        return page


async def fault_page(
    first: VMObject, offset: int, access: int, limit: int | None = None, *, read_ahead: bool = False
) -> Page:
    """The page of `first` at `offset` with `access`, from wherever it is in the shadow chain;
    raises _Restart after any wait (the caller looks again).  `limit` bounds the cluster.
    With `read_ahead` (a task's read), sequential reads of the first object ask for the next
    cluster before it is needed (see _read_ahead)."""
    kernel = first.kernel
    object, object_offset = first, offset
    while True:
        if not object.alive:
            raise _dead_object_error(object, object_offset)
        # Above the first object only reading is needed: a write copies the page up.
        needed = access if object is first else VM_PROT_READ
        page = object.pages.get(object_offset)
        if page is not None:
            if page.ahead is not None and read_ahead and object is first and limit is not None:
                start, page.ahead = page.ahead, None
                _read_ahead(object, start, limit)
                if not object.alive:
                    raise _Restart
            await _usable(object, page, needed)
            break
        if object.pager is not None and object_offset not in object.unavailable and (
            not object.internal or object_offset in object.existence
        ):
            cluster_end = limit if object is first else None
            await _page_in(object, object_offset, needed, cluster_end, read_ahead and object is first)
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
        await wait_for_manager(object, page.offset, "memory_object_data_request", page.wait)
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
        await wait_for_manager(object, page.offset, "memory_object_data_unlock", page.wait)
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


async def _page_in(
    object: VMObject, offset: int, access: int, cluster_end: int | None, read_ahead: bool = False
) -> None:
    """Ask the object's manager for the page at `offset` (and a cluster after it) and wait.
    With `read_ahead`, a read that follows a page the object holds also asks for the cluster
    after this one."""
    kernel = object.kernel
    page_size = kernel.page_size
    if not object.pager_initialized:
        kernel.objects.pager_init(object)
    if not object.ready:
        await wait_for_manager(object, offset, "memory_object_init", object.wait_ready)
        return  # the fault restarts: the map may have changed while it waited

    wanted = kernel.cluster_pages if cluster_end is not None else 1
    # The frames that are free now are taken in one step; past them, each further page of the
    # cluster may need something paged out first (page_alloc), and the cluster ends where no
    # frame can be had.
    pages: list[Page] = []
    room = min(wanted, kernel.resident.free)
    if room:
        count = 1 + (_cluster_run(object, offset + page_size, room - 1, cluster_end) if room > 1 else 0)  # type: ignore[arg-type]
        pages = kernel.page_alloc_absent(object, list(range(offset, offset + count * page_size, page_size)))
        if count < room:
            wanted = count  # the cluster stopped at a page it cannot take
    for index in range(len(pages), wanted):
        page_offset = offset + index * page_size
        if index and not _cluster_run(object, page_offset, 1, cluster_end):  # type: ignore[arg-type]
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

    kernel.stats.data_requests += 1
    kernel.stats.pages_requested += len(pages)
    _send(object, offset, MemoryObjectDataRequest(
        control=object.control.make_send(),  # type: ignore[union-attr]
        offset=offset,
        length=len(pages) * page_size,
        desired_access=VM_PROT_READ | access,
    ))
    if (
        read_ahead
        and kernel.read_ahead
        and len(pages) == kernel.cluster_pages
        and offset - page_size in object.pages  # the reader came from the page before: sequential
    ):
        cluster_size = len(pages) * page_size
        for ahead in range(1, kernel.read_ahead + 1):
            _read_ahead(object, offset + ahead * cluster_size, cluster_end)  # type: ignore[arg-type]
        if not object.alive:
            return  # its manager died: the fault restarts and finds that out
    await wait_for_manager(object, offset, "memory_object_data_request", pages[0].wait)
    if pages[0].error is not None:
        raise KernMemoryError(offset, pages[0].error, "memory_object_data_error from the manager")


def _read_ahead(object: VMObject, start: int, cluster_end: int) -> None:
    """Ask for the cluster at `start` before a task needs it (a sequential reader soon will),
    so that the manager's work and the transfer overlap the kernel's work on the cluster before.

    It takes only frames that are free beyond the pageout daemon's high-water mark: a read-ahead
    never pages anything out, never waits, and leaves faults the frames they would have had.
    The cluster stops as a fault's does (end of the map entry, a page the object holds or its
    manager has none of).  It asks for reading only.  A whole cluster's first page is marked
    with the start of the cluster `kernel.read_ahead` clusters further on: the read that reaches
    the mark asks for that one (fault_page), and so on while the task reads on."""
    kernel = object.kernel
    resident = kernel.resident
    room = min(kernel.cluster_pages, resident.free - resident.high_water)
    if room <= 0 or not object.alive or not object.ready or object.control is None:
        return
    page_size = kernel.page_size
    count = _cluster_run(object, start, room, cluster_end)
    if not count:
        return
    end = start + count * page_size
    pages = kernel.page_alloc_absent(object, list(range(start, end, page_size)))
    if count == kernel.cluster_pages:
        pages[0].ahead = start + kernel.read_ahead * count * page_size
    kernel.stats.data_requests += 1
    kernel.stats.read_aheads += 1
    kernel.stats.pages_requested += count
    try:
        _send(object, start, MemoryObjectDataRequest(
            control=object.control.make_send(),
            offset=start,
            length=count * page_size,
            desired_access=VM_PROT_READ,
        ))
    except KernMemoryError:
        pass  # the manager is gone: the object died with it, as the fault will find


def _cluster_run(object: VMObject, start: int, most: int, cluster_end: int) -> int:
    """How many pages from `start` on (at most `most`) a cluster may take: it stops at the end
    of the map entry (`cluster_end`), at a page the object holds, or at one its manager has
    none of (data_unavailable in a copy; an internal object's page never paged out)."""
    page_size = object.kernel.page_size
    offsets = range(start, min(start + most * page_size, cluster_end), page_size)
    pages, unavailable = object.pages, object.unavailable
    if (
        pages.keys().isdisjoint(offsets)
        and (not unavailable or unavailable.isdisjoint(offsets))
        and (not object.internal or object.existence.issuperset(offsets))
    ):
        return len(offsets)  # the usual case, checked in one pass
    count = 0
    for page_offset in offsets:
        if page_offset in pages or page_offset in unavailable or (object.internal and page_offset not in object.existence):
            break
        count += 1
    return count


def _send(object: VMObject, offset: int, message) -> None:
    try:
        object.pager.send(message)  # type: ignore[union-attr]
    except MachSendInvalidDest:
        object.kernel.objects.manager_died(object)
        raise _dead_object_error(object, offset) from None

"""Giving pages back: data_return and making room under the memory limit (GNU Mach's vm_pageout.c).

Dirty pages go back to their manager with `memory_object_data_return(dirty=True)`, clean precious
pages with `dirty=False` (the kernel promised to return them), other clean pages are simply
dropped: the manager still has them.  Adjacent pages of one object that go back together travel
in one message, of at most RETURN_BYTES.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import trio

from .interface import KernResourceShortage, MachSendInvalidDest
from .messages import MemoryObjectDataInitialize, MemoryObjectDataReturn

if TYPE_CHECKING:
    from .kernel import Kernel
    from .vm_object import VMObject
    from .vm_page import Page

_SCAN_FIRST = 32
RETURN_BYTES = 1 << 20
"""The most one data_return (or data_initialize) carries: longer runs go in several messages,
so no message nears the codec's bound and a manager never buffers much at once."""


def _runs(pages: list[Page], page_size: int, same) -> list[list[Page]]:
    """Runs of adjacent pages (sorted by offset) with the same `same(page)`, none longer than
    RETURN_BYTES."""
    most = max(1, RETURN_BYTES // page_size)
    runs = []
    for _, run_iter in itertools.groupby(enumerate(pages), key=lambda item: (item[1].offset - item[0] * page_size, same(item[1]))):
        run = [page for _, page in run_iter]
        runs.extend(run[start : start + most] for start in range(0, len(run), most))
    return runs


def return_pages(object: VMObject, pages: list[Page], *, kernel_copy: bool) -> None:
    """memory_object_data_return for `pages` (sorted by offset), one message per run of adjacent
    pages with the same dirty flag.  The pages are clean afterwards.

    An internal object is first handed to the default memory manager (memory_object_create);
    the first time a page goes there it goes by memory_object_data_initialize."""
    if not pages:
        return
    kernel = object.kernel
    if object.internal:
        _page_out_internal(object, pages)
        return
    if object.pager is None or object.control is None:
        return
    for run in _runs(pages, kernel.page_size, lambda page: page.dirty):
        data = b"".join(bytes(page.data) for page in run)  # type: ignore[arg-type]
        message = MemoryObjectDataReturn(
            control=object.control.make_send(),
            offset=run[0].offset,
            data=data,
            dirty=run[0].dirty,
            kernel_copy=kernel_copy,
        )
        dirty = [page for page in run if page.dirty]
        for page in run:
            page.dirty = False
        kernel.stats.data_returns += 1
        kernel.stats.pages_returned += len(run)
        try:
            object.pager.send(message)
        except MachSendInvalidDest:
            # Not sent: the changes are still only here, to be kept as the manager's death keeps
            # dirty pages (manager_died), not dropped as if returned.
            for page in dirty:
                page.dirty = True
            kernel.objects.manager_died(object)
            return


def send_return(object: VMObject, offset: int, data: bytes) -> None:
    """memory_object_data_return of data the kernel holds for no resident page."""
    kernel = object.kernel
    kernel.stats.data_returns += 1
    kernel.stats.pages_returned += len(data) // kernel.page_size
    try:
        object.pager.send(  # type: ignore[union-attr]
            MemoryObjectDataReturn(
                control=object.control.make_send(), offset=offset, data=data, dirty=True, kernel_copy=False  # type: ignore[union-attr]
            )
        )
    except MachSendInvalidDest:
        kernel.objects.manager_died(object)


def _page_out_internal(object: VMObject, pages: list[Page]) -> None:
    kernel = object.kernel
    if not kernel.objects.pager_create(object):
        return  # the default manager is gone: the object died with it
    for run in _runs(pages, kernel.page_size, lambda page: page.offset in object.existence):
        data = b"".join(bytes(page.data) for page in run)  # type: ignore[arg-type]
        known = run[0].offset in object.existence
        control = object.control.make_send()  # type: ignore[union-attr]
        if known:
            message = MemoryObjectDataReturn(control=control, offset=run[0].offset, data=data, dirty=True, kernel_copy=False)
        else:
            message = MemoryObjectDataInitialize(control=control, offset=run[0].offset, data=data)
        for page in run:
            page.dirty = False
            object.existence.add(page.offset)
        kernel.stats.data_returns += 1
        kernel.stats.pages_returned += len(run)
        try:
            object.pager.send(message)  # type: ignore[union-attr]
        except MachSendInvalidDest:
            kernel.objects.manager_died(object)
            return


def _evictable(page: Page) -> bool:
    object = page.object
    if page.absent or not object.alive:
        return False
    # Internal data (anonymous memory, copies) can only go to a default memory manager; a
    # clean page it never changed is zeros or still with that manager, and may simply go.
    default = object.kernel.default_memory_manager
    return not object.internal or not page.dirty or (default is not None and not default.dead)


def _cluster(page: Page, limit: int) -> list[Page]:
    """`page` and the evictable pages adjacent to it in its object, up to `limit`, by offset."""
    object = page.object
    page_size = object.kernel.page_size
    run = [page]
    offset = page.offset + page_size
    while len(run) < limit and (neighbour := object.pages.get(offset)) is not None and _evictable(neighbour):
        run.append(neighbour)
        offset += page_size
    offset = page.offset - page_size
    while len(run) < limit and (neighbour := object.pages.get(offset)) is not None and _evictable(neighbour):
        run.insert(0, neighbour)
        offset -= page_size
    return run


def _candidates(resident):
    """Resident pages, least recently used first; the whole list is only copied when the
    oldest few cannot go (usually one of them can)."""
    first = resident.oldest(_SCAN_FIRST)
    yield from first
    if len(first) == _SCAN_FIRST:
        yield from resident.oldest(resident.count)[_SCAN_FIRST:]


def reclaim(kernel: Kernel) -> int:
    """Evict the least recently used evictable page and a cluster of its neighbours: dirty
    pages and clean precious ones go back to the manager (adjacent ones in one message),
    other clean ones are dropped.  Returns how many frames were freed (0: none can go)."""
    for page in _candidates(kernel.resident):
        if not _evictable(page):
            continue
        object = page.object
        run = _cluster(page, kernel.pageout_cluster)
        return_pages(object, [p for p in run if p.dirty or p.precious], kernel_copy=False)
        for evicted in run:
            kernel.objects.free_page(evicted)
        kernel.stats.evictions += len(run)
        if not object.pages and object in kernel.objects.cached:
            # A cached object no task maps, with nothing left in memory: let it go.
            kernel.objects.terminate(object)
        return len(run)
    return 0


async def pageout_daemon(kernel: Kernel) -> None:
    """Keep some frames free: when fewer than the low-water mark are, evict until the
    high-water mark is reached, so faults rarely have to page out themselves."""
    resident = kernel.resident
    while True:
        await resident.wait_for_pageout()
        while resident.free < resident.high_water:
            if not reclaim(kernel):
                # Everything resident is being paged in or cannot go: wait for that to change.
                await resident.wait_for_change()
                break
            kernel.stats.pageout_daemon_runs += 1
            await trio.lowlevel.checkpoint()


def make_room(kernel: Kernel) -> None:
    """Ensure one free frame, or raise KernResourceShortage with what holds the memory."""
    if kernel.resident.free > 0:
        return
    if not reclaim(kernel):
        raise KernResourceShortage(
            f"kernel {kernel.name}: all {kernel.resident.limit} page frames hold pages that cannot be "
            "paged out (being paged in, or anonymous memory with no default memory manager)",
            limit=kernel.resident.limit,
        )

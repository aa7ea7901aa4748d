"""Giving pages back: data_return and making room under the memory limit (GNU Mach's vm_pageout.c).

Dirty pages go back to their manager with `memory_object_data_return(dirty=True)`, clean precious
pages with `dirty=False` (the kernel promised to return them), other clean pages are simply
dropped: the manager still has them.  Adjacent pages of one object that go back together travel
in one message.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from .interface import KernResourceShortage, MachSendInvalidDest
from .messages import MemoryObjectDataReturn

if TYPE_CHECKING:
    from .kernel import Kernel
    from .vm_object import VMObject
    from .vm_page import Page

_SCAN_FIRST = 32


def return_pages(object: VMObject, pages: list[Page], *, kernel_copy: bool) -> None:
    """memory_object_data_return for `pages` (sorted by offset), one message per run of adjacent
    pages with the same dirty flag.  The pages are clean afterwards."""
    if not pages or object.pager is None or object.control is None:
        return
    kernel = object.kernel
    page_size = kernel.page_size
    for _, run_iter in itertools.groupby(
        enumerate(pages), key=lambda item: (item[1].offset - item[0] * page_size, item[1].dirty)
    ):
        run = [page for _, page in run_iter]
        data = b"".join(bytes(page.data) for page in run)  # type: ignore[arg-type]
        message = MemoryObjectDataReturn(
            control=object.control.make_send(),
            offset=run[0].offset,
            data=data,
            dirty=run[0].dirty,
            kernel_copy=kernel_copy,
        )
        for page in run:
            page.dirty = False
        kernel.stats.data_returns += 1
        kernel.stats.pages_returned += len(run)
        try:
            object.pager.send(message)
        except MachSendInvalidDest:
            kernel.objects.manager_died(object)
            return


def reclaim(kernel: Kernel) -> bool:
    """Free one page frame, least recently used first; False when none can go."""
    resident = kernel.resident
    candidates = resident.oldest(_SCAN_FIRST)
    if len(candidates) == _SCAN_FIRST:
        candidates = itertools.chain(candidates, resident.oldest(resident.count)[_SCAN_FIRST:])  # type: ignore[assignment]
    for page in candidates:
        if page.absent:
            continue
        object = page.object
        if object.internal:
            # Anonymous data has nowhere to go until a default memory manager exists ([4/8]).
            continue
        if page.dirty or page.precious:
            return_pages(object, [page], kernel_copy=False)
        kernel.objects.free_page(page)
        kernel.stats.evictions += 1
        if not object.pages and object in kernel.objects.cached:
            # A cached object no task maps, with nothing left in memory: let it go.
            kernel.objects.terminate(object)
        return True
    return False


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

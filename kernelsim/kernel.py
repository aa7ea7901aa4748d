"""One simulated host: its page size, its memory, its tasks and its VM objects.

    async with kernelsim.boot("k1", page_size=4096, memory_pages=256) as kernel:
        task = await kernel.task_create()
        address = await task.vm_map(object_port.make_send(), 4 * kernel.page_size)
        data = await task.read(address, 100)

Several kernels can live in one process; each speaks to managers only through ports, so a
kernel in another process ([5/8]) looks the same to them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields

import trio

from .codec import MAX_DATA
from .interface import VM_INHERIT_COPY, VM_INHERIT_SHARE, KernInvalidArgument, KernResourceShortage
from .ipc_port import SendRight, port_allocate
from .manager_wait import FAULT_WARNING, WaitingFault, check_wait_setting, fault_watchdog, wait_for_manager
from .memory_object import ControlServer, NotifyServer
from .messages import MemoryObjectDataReturn, Message
from .task import Task
from .vm_object import ObjectTable, VMObject
from .vm_page import Page, ResidentMemory
from .vm_pageout import make_room, pageout_daemon, send_return

log = logging.getLogger("kernelsim.kernel")

MIN_PAGE_SIZE = 4096
MAX_PAGE_SIZE = 1 << 24
MAX_MEMORY_PAGES = 1 << 32
"""Limits of a kernel's configuration: a page must fit in a message with room for a cluster,
and the page frame count is a natural_t."""
READ_AHEAD_MIN_CLUSTER = 16
"""A kernel whose clusters are at least this many pages reads ahead by default: it is set up
for bulk transfers.  With smaller clusters (1 page by default) each fault makes one request."""
READ_AHEAD_CLUSTERS = 2
"""How many clusters such a kernel keeps asked for ahead of a task reading sequentially."""


@dataclass
class KernelStats:
    faults: int = 0
    inits: int = 0
    creates: int = 0
    copies: int = 0
    pushes: int = 0
    cow_faults: int = 0
    data_requests: int = 0
    read_aheads: int = 0
    pages_requested: int = 0
    pages_supplied: int = 0
    zero_fills: int = 0
    data_errors: int = 0
    unlocks: int = 0
    lock_requests: int = 0
    flushes: int = 0
    data_returns: int = 0
    pages_returned: int = 0
    evictions: int = 0
    pageout_daemon_runs: int = 0
    partial_pages_discarded: int = 0
    refused_calls: int = 0
    fault_timeouts: int = 0

    def as_dict(self) -> dict[str, int]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


def check_configuration(page_size: int, memory_pages: int, cluster_pages: int) -> None:
    """KernInvalidArgument, naming the value, unless a kernel can be booted with these: the page
    size a power of two from MIN_PAGE_SIZE, and a cluster of pages (what one data_request asks
    for) small enough to travel in one message."""
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise KernInvalidArgument(f"page size {page_size} must be a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}", page_size=page_size)
    if not 1 <= memory_pages <= MAX_MEMORY_PAGES:
        raise KernInvalidArgument(f"memory limit {memory_pages} must be from 1 to {MAX_MEMORY_PAGES} pages", memory_pages=memory_pages)
    if not 1 <= cluster_pages or cluster_pages * page_size > MAX_DATA:
        raise KernInvalidArgument(
            f"cluster of {cluster_pages} pages of {page_size} bytes: at least one page, at most {MAX_DATA} bytes (one message)",
            cluster_pages=cluster_pages,
        )


class Kernel:
    def __init__(
        self,
        name: str,
        page_size: int = MIN_PAGE_SIZE,
        memory_pages: int = 1024,
        *,
        cluster_pages: int = 1,
        pageout_cluster: int = 16,
        read_ahead: int | None = None,
        fault_warning: float = FAULT_WARNING,
        fault_timeout: float | None = None,
    ) -> None:
        check_configuration(page_size, memory_pages, cluster_pages)
        self.name = name
        self.page_size = page_size
        self.cluster_pages = cluster_pages
        if read_ahead is None:
            read_ahead = READ_AHEAD_CLUSTERS if cluster_pages >= READ_AHEAD_MIN_CLUSTER else 0
        if read_ahead < 0:
            raise KernInvalidArgument(f"read-ahead {read_ahead} must not be negative", read_ahead=read_ahead)
        # Clusters asked for ahead of a task reading sequentially (vm_fault._read_ahead).
        self.read_ahead = read_ahead
        # Pages evicted (and returned) together; never more than a quarter of memory.
        self.pageout_cluster = max(1, min(pageout_cluster, memory_pages // 4))
        self.resident = ResidentMemory(memory_pages)
        self.stats = KernelStats()
        self.events: deque[str] = deque(maxlen=1000)
        self.tasks: set[Task] = set()
        self.default_memory_manager: SendRight | None = None
        self.control_server = ControlServer(self)
        self.notify_port = port_allocate(f"{name} notify", host=name)
        self.notify_port.set_kobject(NotifyServer(self).handle)
        self.objects = ObjectTable(self)
        self.running = True
        # Pages tasks changed in objects whose manager died, by object name (see manager_died).
        self.orphans: dict[str, dict[int, bytes]] = {}
        # Faults waiting for a manager's answer (manager_wait): warned about after
        # `fault_warning` seconds (0: never), failed after `fault_timeout` (None: never, as Mach).
        self.fault_warning: float = check_wait_setting(fault_warning, "fault warning", zero_allowed=True)  # type: ignore[assignment]
        self.fault_timeout: float | None = check_wait_setting(fault_timeout, "fault timeout", zero_allowed=False)
        self.waiting_faults: set[WaitingFault] = set()
        # Where warnings go (a kernel process prints them as '#' lines); by default, the log.
        self.on_warning: Callable[[str], None] = lambda text: log.warning("kernel %s: %s", self.name, text)

    def __repr__(self) -> str:
        return f"<kernel {self.name} page_size={self.page_size} memory={self.resident.limit}>"

    @property
    def memory_pages(self) -> int:
        return self.resident.limit

    def note(self, event: str) -> None:
        """Keep a line about something the kernel did or refused, for whoever is watching."""
        self.events.append(event)

    def warn(self, text: str) -> None:
        """Something a person should hear of now (a fault waiting long for its manager)."""
        self.note(text)
        self.on_warning(text)

    async def task_create(self, parent: Task | None = None, inherit_memory: bool = True, name: str | None = None) -> Task:
        """A new task; with a parent and inherit_memory, its map is built from the parent's by
        each entry's inheritance: share (the same object), copy (a copy, as the object's copy
        strategy says) or none (left out)."""
        task = Task(self, name)
        if parent is not None and inherit_memory:
            if parent.kernel is not self:
                raise KernInvalidArgument("a parent task must belong to the same kernel")
            for entry in list(parent.map):
                if entry.inheritance == VM_INHERIT_SHARE:
                    self.objects.reference(entry.object)
                    entry.is_shared = True
                    task.map.insert(dataclasses.replace(entry))
                elif entry.inheritance == VM_INHERIT_COPY:
                    (copy,) = await parent.copy_entries(entry.start, entry.end)
                    self.objects.reference(copy.object)
                    task.map.insert(copy)
        self.tasks.add(task)
        return task

    def vm_set_default_memory_manager(self, default_manager: SendRight | None) -> SendRight | None:
        """Set the port temporary objects are delivered to; returns the old one.  A null port
        only reads it."""
        old = self.default_memory_manager
        if default_manager is not None:
            self.default_memory_manager = default_manager
        return old

    def page_alloc(self, object: VMObject, offset: int) -> Page:
        """A frame for `object` at `offset`, paging something out first when memory is full;
        KernResourceShortage when no frame can be freed now."""
        make_room(self)
        page = Page(object, offset)
        object.pages[offset] = page
        self.resident.insert(page)
        return page

    def page_alloc_absent(self, object: VMObject, offsets: list[int]) -> list[Page]:
        """Frames for `object` at each of `offsets`, absent (asked for, no data yet), in one
        step: as `page_alloc` for each in turn, for a caller that has checked that as many
        frames are free (so nothing need be paged out)."""
        pages = [Page(object, offset, True) for offset in offsets]
        object.pages.update(zip(offsets, pages))
        self.resident.insert_many(pages)
        return pages

    async def vm_page_wait(self, shortage: KernResourceShortage) -> None:
        """Wait for a frame after page_alloc failed (VM_PAGE_WAIT); the fault then restarts.

        Frames busy being paged in become reclaimable when their data arrives; a memory full of
        pages that can never be paged out will not change, so `shortage` is raised instead."""
        if not self.resident.any_absent():
            raise shortage
        await self.resident.wait_for_change()

    async def return_orphans(self, object: VMObject) -> int:
        """Give a manager that came back the pages tasks had changed in an object of this name
        before its predecessor died; returns how many pages went.

        The kept pages stay kept until the new manager is ready and each has been sent: a
        manager that dies (or does not answer within the fault timeout) meanwhile leaves the
        rest kept for the next one."""
        tag = object.tag
        if tag is None or tag not in self.orphans:
            return 0
        if not object.pager_initialized:
            self.objects.pager_init(object)
        await wait_for_manager(object, 0, "memory_object_init", object.wait_ready)
        kept = self.orphans.pop(tag, None)
        if not kept:
            return 0  # another caller returned them while this one waited
        order = sorted(kept)
        for index, offset in enumerate(order):
            if object.alive:
                page = object.pages.get(offset)
                if page is not None and not page.absent:
                    # Resident already (read before this call): the kept data wins, as the newer.
                    page.data = bytearray(kept[offset])
                    page.dirty = True
                    continue
                send_return(object, offset, kept[offset])
            if not object.alive:
                # Its manager died: what did not go is kept again (pages the object held, kept
                # by manager_died, are newer and win).
                again = self.orphans.setdefault(tag, {})
                for rest in order[index:]:
                    again.setdefault(rest, kept[rest])
                return index
        return len(order)

    async def return_kept_pages(self, name: str, pager: SendRight) -> int:
        """Return the pages kept for object `name` to the manager of memory object `pager`
        (the object of that name at a manager that came back), through a VM object of
        this kernel's for it that goes again once they are sent; how many went."""
        object = self.objects.enter(pager)
        self.objects.reference(object)
        if object.tag is None:
            object.tag = name
        try:
            return await self.return_orphans(object)
        finally:
            self.objects.deallocate(object)

    def keep_undelivered(self, message: Message) -> None:
        """A message to a manager that its connection closed before writing: the pages of a
        dirty data_return are kept for the manager's successor, as if they had still been
        dirty here when the manager died (manager_died keeps those, and runs after this)."""
        if not isinstance(message, MemoryObjectDataReturn) or not message.dirty:
            return
        object = self.objects.lookup_control(message.control.port.name)
        if object is None or object.tag is None:
            self.warn(f"lost {len(message.data)} returned bytes at {message.offset:#x}: their connection closed, and the object has no name to keep them by")
            return
        kept = self.orphans.setdefault(object.tag, {})
        for start in range(0, len(message.data), self.page_size):
            kept[message.offset + start] = bytes(message.data[start : start + self.page_size])
        self.note(f"kept {len(message.data)} bytes of {object.tag} at {message.offset:#x}: the data_return was not delivered")

    def vm_sync(self, object: VMObject) -> int:
        """Return the object's changed pages to its manager, keeping clean copies (a kernel's
        msync); returns how many went."""
        from .vm_pageout import return_pages

        if object.internal or not object.pager_initialized or not object.alive:
            return 0
        dirty = sorted((p for p in object.pages.values() if p.dirty and not p.absent), key=lambda p: p.offset)
        return_pages(object, dirty, kernel_copy=True)
        return len(dirty)

    def shutdown(self) -> None:
        """An orderly halt: every task goes (returning dirty data), then cached objects."""
        if not self.running:
            return
        self.running = False
        for task in list(self.tasks):
            task.terminate()
        self.objects.shutdown()
        self.notify_port.destroy()


@asynccontextmanager
async def boot(
    name: str,
    page_size: int = MIN_PAGE_SIZE,
    memory_pages: int = 1024,
    *,
    cluster_pages: int = 1,
    pageout_cluster: int = 16,
    read_ahead: int | None = None,
    fault_warning: float = FAULT_WARNING,
    fault_timeout: float | None = None,
) -> AsyncIterator[Kernel]:
    """Run a kernel for the duration of the block, with its pageout daemon; it shuts down in
    order at the end.  `read_ahead`: clusters asked for ahead of a sequential reader (by
    default READ_AHEAD_CLUSTERS with clusters of READ_AHEAD_MIN_CLUSTER pages or more, else
    none).  `fault_warning`, `fault_timeout`: see manager_wait."""
    kernel = Kernel(
        name,
        page_size,
        memory_pages,
        cluster_pages=cluster_pages,
        pageout_cluster=pageout_cluster,
        read_ahead=read_ahead,
        fault_warning=fault_warning,
        fault_timeout=fault_timeout,
    )
    async with trio.open_nursery() as nursery:
        kernel.nursery = nursery  # the home of the kernel's daemons
        nursery.start_soon(pageout_daemon, kernel)
        nursery.start_soon(fault_watchdog, kernel)
        try:
            yield kernel
        finally:
            kernel.shutdown()
            nursery.cancel_scope.cancel()

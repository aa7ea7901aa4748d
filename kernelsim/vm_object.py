"""VM objects and their life cycle (GNU Mach's vm/vm_object.c).

A VM object is the kernel's view of one memory object: the pages it holds of it, and the ports
it talks to the manager on.  There is one VM object per memory object port per kernel, shared by
every mapping of it in that kernel's tasks.  An internal object (anonymous memory from
vm_allocate) has no manager yet; [4/8] gives it the default memory manager.

Life cycle of an external object:

    enter (vm_map)  →  memory_object_init at the first fault  →  memory_object_ready
        →  data requests ...  →  last mapping goes  →  dirty/precious pages returned,
        memory_object_terminate (unless may_cache: then it stays cached)

or, at any point, `memory_object_destroy` from the manager or the manager's death: faults
waiting on the object fail with KernMemoryError and no new ones start.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

import trio

from .interface import (
    KERN_MEMORY_FAILURE,
    KERN_TERMINATED,
    MEMORY_OBJECT_COPY_DELAY,
    MachSendInvalidDest,
)
from .ipc_port import ReceiveRight, SendRight, port_allocate
from .messages import MemoryObjectInit, MemoryObjectTerminate
from .vm_page import Page

if TYPE_CHECKING:
    from .kernel import Kernel

log = logging.getLogger("kernelsim.vm_object")

_object_ids = itertools.count(1)


class VMObject:
    def __init__(self, kernel: Kernel, *, pager: SendRight | None, size: int | None) -> None:
        self.kernel = kernel
        self.id = next(_object_ids)
        self.pager = pager
        self.internal = pager is None
        self.size = size
        self.pages: dict[int, Page] = {}
        self.ref_count = 0
        self.alive = True
        self.death_reason = 0
        self.death_message = ""
        self.pager_initialized = False
        self.ready = self.internal
        self.may_cache = False
        self.copy_strategy = MEMORY_OBJECT_COPY_DELAY
        self._ready_changed: trio.Event | None = None
        label = f"{kernel.name} object {self.id}"
        self.name_port: ReceiveRight = port_allocate(f"{label} name", host=kernel.name)
        self.name_port.set_kobject(_ignore_name_port_call)
        self.control: ReceiveRight | None = None
        self.dead_name_notify: SendRight | None = None
        if not self.internal:
            self.control = port_allocate(f"{label} control", host=kernel.name)

    def __repr__(self) -> str:
        kind = "internal" if self.internal else f"pager {self.pager.name}"  # type: ignore[union-attr]
        return f"<vm_object {self.id} of {self.kernel.name} ({kind})>"

    # -- readiness ---------------------------------------------------------------------------

    async def wait_ready(self) -> None:
        """Until memory_object_ready (or the object's death)."""
        while not self.ready and self.alive:
            if self._ready_changed is None:
                self._ready_changed = trio.Event()
            await self._ready_changed.wait()

    def set_ready(self) -> None:
        self.ready = True
        self._wake_ready_waiters()

    def _wake_ready_waiters(self) -> None:
        if self._ready_changed is not None:
            self._ready_changed.set()
            self._ready_changed = None

    # -- pages -------------------------------------------------------------------------------

    def pages_in_range(self, offset: int, size: int) -> list[Page]:
        """The resident pages in [offset, offset+size), by offset, without walking a huge range."""
        page_size = self.kernel.page_size
        if size // page_size <= len(self.pages):
            found = (self.pages.get(o) for o in range(offset, offset + size, page_size))
            return [page for page in found if page is not None]
        end = offset + size
        return [self.pages[o] for o in sorted(self.pages) if offset <= o < end]


def _ignore_name_port_call(port: object, message: object) -> None:
    # A name port names an object for vm_region; the kernel serves no call on it.
    log.info("ignored a message sent to name port %s: %r", port, message)


class ObjectTable:
    """A kernel's VM objects: the one per memory object port, and every live one by control port."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.by_pager: dict[int, VMObject] = {}
        self.by_control: dict[int, VMObject] = {}
        self.cached: set[VMObject] = set()

    def __len__(self) -> int:
        return len(self.by_pager)

    def enter(self, pager: SendRight) -> VMObject:
        """The VM object for memory object `pager`, creating it on first use (vm_object_enter).

        The kernel keeps its own send right; the caller's stays the caller's.
        """
        object = self.by_pager.get(pager.port.name)
        if object is not None and object.alive:
            self.cached.discard(object)
            return object
        object = VMObject(self.kernel, pager=pager.copy(), size=None)
        self.by_pager[pager.port.name] = object
        assert object.control is not None
        self.by_control[object.control.port.name] = object
        object.control.set_kobject(self.kernel.control_server.handle)
        # Learn of the manager's death from the port itself, as Mach does.
        object.dead_name_notify = self.kernel.notify_port.make_send()
        object.pager.request_dead_name(object.dead_name_notify)  # type: ignore[union-attr]
        return object

    def allocate_internal(self, size: int) -> VMObject:
        return VMObject(self.kernel, pager=None, size=size)

    def lookup_control(self, port_name: int) -> VMObject | None:
        return self.by_control.get(port_name)

    def reference(self, object: VMObject) -> None:
        object.ref_count += 1

    def deallocate(self, object: VMObject) -> None:
        """Drop one mapping's reference; the last one terminates the object unless cached."""
        object.ref_count -= 1
        if object.ref_count > 0 or not object.alive:
            return
        if object.internal:
            self._free_pages(object)
            object.alive = False
            object.name_port.destroy()
        elif object.may_cache and object.ready:
            self.cached.add(object)
        else:
            self.terminate(object)

    def uncache(self, object: VMObject) -> None:
        """The manager turned may_cache off: an unmapped cached object terminates now."""
        if object in self.cached:
            self.terminate(object)

    def pager_init(self, object: VMObject) -> None:
        """memory_object_init: the first fault on the object introduces this kernel to the manager."""
        assert object.control is not None and object.pager is not None
        object.pager_initialized = True
        self.kernel.stats.inits += 1
        try:
            object.pager.send(
                MemoryObjectInit(
                    control=object.control.make_send(),
                    name=object.name_port.make_send(),
                    page_size=self.kernel.page_size,
                )
            )
        except MachSendInvalidDest:
            self.manager_died(object)

    def terminate(self, object: VMObject) -> None:
        """The kernel is done with the object: return what the manager must not lose, then
        memory_object_terminate with every right to control and name (vm_object_terminate)."""
        from .vm_pageout import return_pages

        if not object.alive:
            return
        pages = [page for page in sorted(object.pages.values(), key=lambda p: p.offset) if not page.absent]
        if object.pager_initialized:
            return_pages(object, [p for p in pages if p.dirty or p.precious], kernel_copy=False)
        self._die(object, KERN_TERMINATED, "memory object terminated")
        self._send_terminate(object)

    def destroy(self, object: VMObject, reason: int) -> None:
        """memory_object_destroy: cached data is dropped, faults fail, then terminate."""
        self._die(object, reason, "memory object destroyed by its manager")
        self._send_terminate(object)

    def manager_died(self, object: VMObject) -> None:
        """The memory object port is dead: fail everything, nobody is left to tell."""
        if object.alive:
            self._die(object, KERN_MEMORY_FAILURE, "memory manager died")
            assert object.control is not None
            object.control.destroy()
            object.name_port.destroy()
            if object.pager is not None:
                object.pager.deallocate()

    def manager_port_died(self, port_name: int) -> None:
        object = self.by_pager.get(port_name)
        if object is not None:
            self.manager_died(object)

    def _die(self, object: VMObject, reason: int, message: str) -> None:
        object.alive = False
        object.death_reason = reason
        object.death_message = message
        self.cached.discard(object)
        assert object.pager is not None and object.control is not None
        if self.by_pager.get(object.pager.port.name) is object:
            del self.by_pager[object.pager.port.name]
        self.by_control.pop(object.control.port.name, None)
        object.control.set_kobject(None)
        if object.dead_name_notify is not None:
            object.pager.cancel_dead_name(object.dead_name_notify)
            object.dead_name_notify = None
        self._free_pages(object)
        object._wake_ready_waiters()

    def _send_terminate(self, object: VMObject) -> None:
        assert object.pager is not None and object.control is not None
        if object.pager_initialized:
            try:
                object.pager.send(MemoryObjectTerminate(control=object.control, name=object.name_port))
            except MachSendInvalidDest:
                object.control.destroy()
                object.name_port.destroy()
        else:
            # The manager never heard of this kernel's use of the object.
            object.control.destroy()
            object.name_port.destroy()
        object.pager.deallocate()

    def _free_pages(self, object: VMObject) -> None:
        resident = self.kernel.resident
        pages, object.pages = object.pages, {}
        for page in pages.values():
            resident.remove(page)
            page.wakeup()

    def free_page(self, page: Page) -> None:
        object = page.object
        if object.pages.get(page.offset) is page:
            del object.pages[page.offset]
        self.kernel.resident.remove(page)
        page.wakeup()

    def shutdown(self) -> None:
        """The kernel is going away: terminate what it still caches."""
        for object in list(self.cached):
            self.terminate(object)

"""VM objects and their life cycle (GNU Mach's vm/vm_object.c).

A VM object is the kernel's view of one memory object: the pages it holds of it, and the ports
it talks to the manager on.  There is one VM object per memory object port per kernel, shared by
every mapping of it in that kernel's tasks.

An internal object is one the kernel made: anonymous memory (vm_allocate) or a copy.  It has no
manager until the kernel first needs to page it out; then `pager_create` hands it to the default
memory manager (memory_object_create), which pages it from there on.

Copies (Mach's shadow and copy chains):
- `shadow`: the object this one copies.  A page this object lacks (and its pager does not hold)
  is the shadow's page at the same offset plus `shadow_offset`.  Writing it copies it here first.
- `copy`: the newest delayed copy of this object.  Before a page of this object changes, the
  copy takes the old page (a push), unless it already has its own; older copies see it through
  their shadow chain (older copy → newer copy → original).

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
from .messages import MemoryObjectCreate, MemoryObjectInit, MemoryObjectTerminate
from .vm_page import Page

if TYPE_CHECKING:
    from .kernel import Kernel

log = logging.getLogger("kernelsim.vm_object")

_object_ids = itertools.count(1)


class VMObject:
    def __init__(self, kernel: Kernel, *, pager: SendRight | None, size: int | None, internal: bool) -> None:
        self.kernel = kernel
        self.id = next(_object_ids)
        self.pager = pager
        self.internal = internal
        self.size = size
        self.pages: dict[int, Page] = {}
        self.ref_count = 0
        self.alive = True
        self.death_reason = 0
        self.death_message = ""
        self.pager_initialized = False
        self.ready = internal
        self.may_cache = False
        self.copy_strategy = MEMORY_OBJECT_COPY_DELAY
        self._ready_changed: trio.Event | None = None
        self.shadow: VMObject | None = None
        self.shadow_offset = 0
        self.copy: VMObject | None = None
        # A copy object's ranges of the original it must preserve (its own and older copies').
        self.covers: list[tuple[int, int]] = []
        # Offsets the default manager holds for an internal object (written out at least once).
        self.existence: set[int] = set()
        # Offsets the pager answered data_unavailable for, in an object with a shadow: the
        # page is the shadow's.
        self.unavailable: set[int] = set()
        # Lock requests this object is working through (pushes to a copy may need page-ins).
        self.lock_queue: list = []
        # Pages on their way (absent, or with a write unlock asked) when a COPY_CALL copy of
        # them was made: the manager's answer leaves them write-locked (vm_copy._copy_call).
        self.lock_on_arrival: set[Page] = set()
        self.label = f"{kernel.name} object {self.id}"
        # The name a task found the object by (kernels in other processes): pages it changed
        # outlive a dead manager under this name, to go back when the object is mapped again.
        self.tag: str | None = None
        self.name_port: ReceiveRight = port_allocate(f"{self.label} name", host=kernel.name)
        self.name_port.set_kobject(_ignore_name_port_call)
        self.control: ReceiveRight | None = None
        self.dead_name_notify: SendRight | None = None
        if not internal:
            self.control = port_allocate(f"{self.label} control", host=kernel.name)

    def __repr__(self) -> str:
        kind = "internal" if self.internal else f"pager {self.pager.name}"  # type: ignore[union-attr]
        return f"<vm_object {self.id} of {self.kernel.name} ({kind})>"

    def covered(self, offset: int) -> bool:
        return any(start <= offset < end for start, end in self.covers)

    def has_own(self, offset: int) -> bool:
        """Whether this object has its own version of the page (not its shadow's)."""
        return offset in self.pages or offset in self.existence

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
        object = VMObject(self.kernel, pager=pager.copy(), size=None, internal=False)
        self._register(object)
        return object

    def _register(self, object: VMObject) -> None:
        assert object.control is not None and object.pager is not None
        self.by_pager[object.pager.port.name] = object
        self.by_control[object.control.port.name] = object
        object.control.set_kobject(self.kernel.control_server.handle)
        # Learn of the manager's death from the port itself, as Mach does.
        object.dead_name_notify = self.kernel.notify_port.make_send()
        object.pager.request_dead_name(object.dead_name_notify)

    def allocate_internal(self, size: int) -> VMObject:
        return VMObject(self.kernel, pager=None, size=size, internal=True)

    def shadow_object(self, object: VMObject, source: VMObject, offset: int) -> None:
        """Make `object` a copy of `source` (its shadow), at `offset` in `source`."""
        self.reference(source)
        object.shadow = source
        object.shadow_offset = offset

    def delayed_copy(self, source: VMObject, start: int, end: int) -> VMObject:
        """A copy of [start, end) of `source`, copied on write (vm_object_copy_delayed), at the
        offsets of `source`.

        Two objects make it: the copy object, which only ever takes `source`'s old pages (an
        older copy now shadows this newer one, and finds there what it lacks), and, above it,
        the object the copy's task writes, so that its writes never show in older copies."""
        copy = self._copy_object(source, start, end)
        private = self.allocate_internal(end)
        self.shadow_object(private, copy, 0)
        return private

    def _copy_object(self, source: VMObject, start: int, end: int) -> VMObject:
        copy = self.allocate_internal(end)
        copy.covers = [(start, end)]
        older = source.copy
        self.shadow_object(copy, source, 0)
        if older is not None and older.alive:
            copy.covers += older.covers
            copy.size = max(copy.size or 0, older.size or 0)
            # older → copy → source: what older still lacks it finds in the newer copy.
            self.reference(copy)
            older.shadow = copy
            self.deallocate(source)
        source.copy = copy
        return copy

    def call_copy(self, source: VMObject, offset: int, length: int) -> tuple[VMObject, ReceiveRight]:
        """The new object of a memory_object_copy: an object of its own memory object port
        (whose receive right goes to the manager), falling back on `source` for the pages its
        manager says are unavailable."""
        port = port_allocate(f"{self.kernel.name} copy of {source.label}")
        copy = VMObject(self.kernel, pager=port.make_send(), size=length, internal=False)
        self._register(copy)
        self.shadow_object(copy, source, offset)
        return copy, port

    def lookup_control(self, port_name: int) -> VMObject | None:
        return self.by_control.get(port_name)

    def reference(self, object: VMObject) -> None:
        object.ref_count += 1

    def deallocate(self, object: VMObject) -> None:
        """Drop one reference (a mapping's, or a copy's on its shadow); the last one terminates
        the object unless it is cached."""
        object.ref_count -= 1
        if object.ref_count > 0 or not object.alive:
            return
        if object.internal:
            self.terminate(object)
        elif object.may_cache and object.ready:
            self.cached.add(object)
        else:
            self.terminate(object)

    def _unchain(self, object: VMObject) -> None:
        """The object is gone: it no longer copies its shadow."""
        shadow, object.shadow = object.shadow, None
        if shadow is not None:
            if shadow.copy is object:
                shadow.copy = None
            self.deallocate(shadow)

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

    def pager_create(self, object: VMObject) -> bool:
        """memory_object_create: hand an internal object to the default memory manager, which
        gets every right to a new memory object port (and needs no init or ready).  False if
        there is no default manager (or it is dead)."""
        default = self.kernel.default_memory_manager
        if object.pager is not None:
            return True
        if default is None or default.dead:
            return False
        port = port_allocate(f"{self.kernel.name} temporary {object.id}")
        port.port.origin = self._origin(object)
        object.pager = port.make_send()
        object.control = port_allocate(f"{object.label} control", host=self.kernel.name)
        object.pager_initialized = True
        self._register(object)
        self.kernel.stats.creates += 1
        try:
            default.send(
                MemoryObjectCreate(
                    new_object=port,
                    new_object_size=object.size or 0,
                    new_control=object.control.make_send(),
                    new_name=object.name_port.make_send(),
                    new_page_size=self.kernel.page_size,
                )
            )
        except MachSendInvalidDest:
            self.manager_died(object)
            return False
        return True

    def _origin(self, object: VMObject) -> tuple[SendRight, int] | None:
        """The memory object (and offset in it) an internal object copies, if any."""
        offset, ancestor = 0, object
        while ancestor.internal and ancestor.shadow is not None:
            offset += ancestor.shadow_offset
            ancestor = ancestor.shadow
        if ancestor.internal or ancestor.pager is None or ancestor is object:
            return None
        return ancestor.pager.copy(), offset

    def terminate(self, object: VMObject) -> None:
        """The kernel is done with the object: return what the manager must not lose, then
        memory_object_terminate with every right to control and name (vm_object_terminate).
        An internal object's data simply goes; its default manager is told to forget it."""
        from .vm_pageout import return_pages

        if not object.alive:
            return
        if not object.internal and object.pager_initialized:
            pages = [page for page in sorted(object.pages.values(), key=lambda p: p.offset) if not page.absent]
            return_pages(object, [p for p in pages if p.dirty or p.precious], kernel_copy=False)
        self._die(object, KERN_TERMINATED, "memory object terminated")
        self._send_terminate(object)

    def destroy(self, object: VMObject, reason: int) -> None:
        """memory_object_destroy: cached data is dropped, faults fail, then terminate."""
        self._die(object, reason, "memory object destroyed by its manager")
        self._send_terminate(object)

    def manager_died(self, object: VMObject) -> None:
        """The memory object port is dead: fail everything, nobody is left to tell.  Pages the
        tasks changed are kept (as orphans, by the object's name) if the object has a name."""
        if object.alive and object.tag is not None:
            kept = self.kernel.orphans.setdefault(object.tag, {})
            for page in object.pages.values():
                if page.dirty and not page.absent:
                    kept[page.offset] = bytes(page.data)  # type: ignore[arg-type]
            if not kept:
                del self.kernel.orphans[object.tag]
        if object.alive:
            self._die(object, KERN_MEMORY_FAILURE, "memory manager died")
            if object.control is not None:
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
        if object.pager is not None and self.by_pager.get(object.pager.port.name) is object:
            del self.by_pager[object.pager.port.name]
        if object.control is not None:
            self.by_control.pop(object.control.port.name, None)
            object.control.set_kobject(None)
        if object.dead_name_notify is not None and object.pager is not None:
            object.pager.cancel_dead_name(object.dead_name_notify)
            object.dead_name_notify = None
        if object.copy is not None:
            object.copy = None
        self._free_pages(object)
        object._wake_ready_waiters()
        self._unchain(object)

    def _send_terminate(self, object: VMObject) -> None:
        if object.pager is None:
            object.name_port.destroy()
            return
        assert object.control is not None
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
        object.lock_on_arrival.clear()
        for page in pages.values():
            resident.remove(page)
            page.wakeup()

    def free_page(self, page: Page) -> None:
        object = page.object
        if object.pages.get(page.offset) is page:
            del object.pages[page.offset]
        object.lock_on_arrival.discard(page)
        self.kernel.resident.remove(page)
        page.wakeup()

    def shutdown(self) -> None:
        """The kernel is going away: terminate what it still caches."""
        for object in list(self.cached):
            self.terminate(object)

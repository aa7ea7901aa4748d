"""The kernel's side of the manager's calls (GNU Mach's vm/memory_object.c).

Every control port the kernel gives out is served by `ControlServer.handle`, which runs in the
sender's task as soon as the message is sent (see `ipc_port`), so calls take effect in the order
the manager made them.  A call on a port that is not a live control port of this kernel, or with
bad arguments, changes nothing and is logged (and counted in `kernel.stats.refused_calls`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .interface import (
    KERN_INVALID_ARGUMENT,
    KERN_MEMORY_PRESENT,
    KERN_RESOURCE_SHORTAGE,
    KERN_SUCCESS,
    MEMORY_OBJECT_COPY_CALL,
    MEMORY_OBJECT_COPY_DELAY,
    MEMORY_OBJECT_COPY_NONE,
    MEMORY_OBJECT_COPY_TEMPORARY,
    MEMORY_OBJECT_RETURN_ALL,
    MEMORY_OBJECT_RETURN_DIRTY,
    MEMORY_OBJECT_RETURN_NONE,
    VM_PROT_ALL,
    VM_PROT_NONE,
    VM_PROT_READ,
    VM_PROT_WRITE,
    KernError,
    KernResourceShortage,
    MachSendInvalidDest,
)
from .ipc_port import Port, PortRight
from .messages import (
    MachNotifyDeadName,
    MachNotifyNoSenders,
    MemoryObjectChangeAttributes,
    MemoryObjectChangeCompleted,
    MemoryObjectDataError,
    MemoryObjectDataSupply,
    MemoryObjectDataUnavailable,
    MemoryObjectDestroy,
    MemoryObjectGetAttributes,
    MemoryObjectGetAttributesReply,
    MemoryObjectLockCompleted,
    MemoryObjectLockRequest,
    MemoryObjectReady,
    MemoryObjectSupplyCompleted,
    Message,
)
from .vm_pageout import return_pages

if TYPE_CHECKING:
    from .kernel import Kernel
    from .vm_object import VMObject
    from .vm_page import Page

log = logging.getLogger("kernelsim.memory_object")

COPY_STRATEGIES = (
    MEMORY_OBJECT_COPY_NONE,
    MEMORY_OBJECT_COPY_CALL,
    MEMORY_OBJECT_COPY_DELAY,
    MEMORY_OBJECT_COPY_TEMPORARY,
)
RETURN_POLICIES = (MEMORY_OBJECT_RETURN_NONE, MEMORY_OBJECT_RETURN_DIRTY, MEMORY_OBJECT_RETURN_ALL)


class ControlServer:
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self._handlers = {
            MemoryObjectReady: self.ready,
            MemoryObjectChangeAttributes: self.change_attributes,
            MemoryObjectGetAttributes: self.get_attributes,
            MemoryObjectDataSupply: self.data_supply,
            MemoryObjectDataUnavailable: self.data_unavailable,
            MemoryObjectDataError: self.data_error,
            MemoryObjectLockRequest: self.lock_request,
            MemoryObjectDestroy: self.destroy,
        }

    def refuse(self, why: str, message: Message) -> None:
        self.kernel.stats.refused_calls += 1
        log.warning("kernel %s refused %s: %s", self.kernel.name, message.describe(), why)
        self.kernel.note(f"refused {message.mach_name}: {why}")

    def handle(self, port: Port, message: Message) -> None:
        object = self.kernel.objects.lookup_control(port.name)
        handler = self._handlers.get(type(message))
        if handler is None:
            self.refuse(f"not a call the kernel serves on a control port (id {message.msg_id})", message)
            message.destroy_rights()
            return
        if object is None or not object.alive:
            self.refuse(f"port {port.name} is not a live control port of kernel {self.kernel.name}", message)
            message.destroy_rights()
            return
        handler(object, message)

    # -- helpers -----------------------------------------------------------------------------

    def _aligned(self, object: VMObject, message: Message, offset: int, size: int) -> bool:
        page_size = self.kernel.page_size
        if offset < 0 or size < 0 or offset % page_size:
            self.refuse(f"offset {offset:#x} / size {size} not page aligned (page size {page_size})", message)
            return False
        return True

    def _reply(self, reply_to: PortRight | None, message: Message) -> None:
        if reply_to is None:
            return
        try:
            reply_to.send(message)
        except MachSendInvalidDest:
            log.info("reply port of kernel %s is dead; %s dropped", self.kernel.name, message.mach_name)

    # -- attributes --------------------------------------------------------------------------

    def ready(self, object: VMObject, message: MemoryObjectReady) -> None:
        if message.copy_strategy not in COPY_STRATEGIES:
            self.refuse(f"unknown copy strategy {message.copy_strategy}", message)
            return
        object.may_cache = message.may_cache
        object.copy_strategy = message.copy_strategy
        object.set_ready()

    def change_attributes(self, object: VMObject, message: MemoryObjectChangeAttributes) -> None:
        if message.copy_strategy not in COPY_STRATEGIES:
            self.refuse(f"unknown copy strategy {message.copy_strategy}", message)
            if message.reply_to is not None:
                message.reply_to.deallocate()
            return
        object.may_cache = message.may_cache
        object.copy_strategy = message.copy_strategy
        object.set_ready()
        self._reply(
            message.reply_to,
            MemoryObjectChangeCompleted(may_cache=object.may_cache, copy_strategy=object.copy_strategy),
        )
        if not object.may_cache:
            self.kernel.objects.uncache(object)

    def get_attributes(self, object: VMObject, message: MemoryObjectGetAttributes) -> None:
        self._reply(
            message.reply,
            MemoryObjectGetAttributesReply(
                return_code=KERN_SUCCESS,
                object_ready=object.ready,
                may_cache=object.may_cache,
                copy_strategy=object.copy_strategy,
            ),
        )

    # -- data --------------------------------------------------------------------------------

    def data_supply(self, object: VMObject, message: MemoryObjectDataSupply) -> None:
        kernel = self.kernel
        page_size = kernel.page_size
        offset, data = message.offset, message.data
        if not self._aligned(object, message, offset, len(data)) or message.lock_value & ~VM_PROT_ALL:
            if message.lock_value & ~VM_PROT_ALL:
                self.refuse(f"lock value {message.lock_value:#x} is not a protection", message)
            self._supply_completed(object, message, KERN_INVALID_ARGUMENT, offset)
            return
        whole = len(data) - len(data) % page_size  # partial pages are discarded
        if whole != len(data):
            kernel.stats.partial_pages_discarded += 1
        result, error_offset = KERN_SUCCESS, 0
        view = memoryview(data)
        pages = object.pages
        lock_value, precious = message.lock_value, message.precious
        filled = 0
        try:
            for page_offset in range(offset, offset + whole, page_size):
                page = pages.get(page_offset)
                if page is None:
                    # Data sent ahead of any request: take it if memory allows, as a hint.
                    try:
                        page = kernel.page_alloc(object, page_offset)
                    except KernResourceShortage:
                        result, error_offset = KERN_RESOURCE_SHORTAGE, page_offset
                        break
                    if not object.alive:  # making room returned data to a manager that is gone
                        kernel.objects.free_page(page)
                        break
                elif not page.absent:
                    result, error_offset = KERN_MEMORY_PRESENT, page_offset
                    break
                start = page_offset - offset
                page.fill_quietly(view[start : start + page_size], lock_value, precious)
                if object.lock_on_arrival:
                    _lock_if_copied(object, page)
                filled += 1
        finally:
            # The pages filled are reclaimable now: faults waiting for memory look again (one
            # wake-up for the whole supply; the faults waiting on each page are woken by fill).
            if filled:
                kernel.stats.pages_supplied += filled
                kernel.resident.changed()
        self._supply_completed(object, message, result, error_offset)

    def _supply_completed(self, object: VMObject, message: MemoryObjectDataSupply, result: int, error_offset: int) -> None:
        if message.reply_to is None:
            return
        assert object.control is not None
        self._reply(
            message.reply_to,
            MemoryObjectSupplyCompleted(
                control=object.control.make_send(),
                offset=message.offset,
                length=len(message.data),
                result=result,
                error_offset=error_offset,
            ),
        )

    def data_unavailable(self, object: VMObject, message: MemoryObjectDataUnavailable) -> None:
        """The manager has no data for the absent pages of the range: in an object that copies
        another, they are the original's pages (the fault looks in the shadow); otherwise they
        are zero-filled and unlocked."""
        if not self._aligned(object, message, message.offset, message.size):
            return
        page_size = self.kernel.page_size
        for page in object.pages_in_range(message.offset, message.size):
            if not page.absent:
                continue
            if object.shadow is not None:
                object.unavailable.add(page.offset)
                self.kernel.objects.free_page(page)
            else:
                page.fill(bytes(page_size), VM_PROT_NONE, precious=False)
                _lock_if_copied(object, page)
                self.kernel.stats.zero_fills += 1

    def data_error(self, object: VMObject, message: MemoryObjectDataError) -> None:
        """Faults waiting on the range fail; later faults ask again."""
        if not self._aligned(object, message, message.offset, message.size):
            return
        for page in object.pages_in_range(message.offset, message.size):
            if page.absent:
                page.error = message.error_value
                self.kernel.objects.free_page(page)
                self.kernel.stats.data_errors += 1

    def lock_request(self, object: VMObject, message: MemoryObjectLockRequest) -> None:
        """For each cached page of the range: lock, then return if asked, then flush if asked.

        Absent pages are not cached data and are left alone: a supply the manager sent before
        this request has already been applied (calls are served in order)."""
        if (
            not self._aligned(object, message, message.offset, message.size)
            or message.should_return not in RETURN_POLICIES
            or message.lock_value & ~VM_PROT_ALL
        ):
            if message.should_return not in RETURN_POLICIES or message.lock_value & ~VM_PROT_ALL:
                self.refuse("bad should_return or lock_value", message)
            if message.reply_to is not None:
                message.reply_to.deallocate()
            return
        if object.lock_queue or (message.should_flush and self._copy_lacks(object, message.offset, message.size)):
            # The object has a delayed copy that still reads these pages through it: the copy
            # takes them before they go (which may need page-ins from the manager, who keeps
            # serving while it waits for this lock request).  Later lock requests on the object
            # wait their turn.
            object.lock_queue.append(message)
            if len(object.lock_queue) == 1:
                self.kernel.nursery.start_soon(self._work_through_locks, object)
            return
        self._apply_lock(object, message)

    def _copy_lacks(self, object: VMObject, offset: int, size: int) -> list[int]:
        """The pages of the range the object's newest delayed copy still reads through it."""
        copy = object.copy
        if copy is None or not copy.alive:
            return []
        page_size = self.kernel.page_size
        lacking = []
        for start, end in copy.covers:
            low, high = max(start, offset), min(end, offset + size)
            for page_offset in range(low - low % page_size, high, page_size):
                if not copy.has_own(page_offset):
                    lacking.append(page_offset)
        return lacking

    async def _work_through_locks(self, object: VMObject) -> None:
        while object.lock_queue:
            message = object.lock_queue[0]
            if message.should_flush and object.alive:
                await self._push_to_copy(object, message.offset, message.size)
            if object.alive:
                self._apply_lock(object, message)
            object.lock_queue.pop(0)

    async def _push_to_copy(self, object: VMObject, offset: int, size: int) -> None:
        from .vm_fault import _push_if_copied, _Restart, _WaitForMemory, fault_page

        kernel = self.kernel
        for page_offset in self._copy_lacks(object, offset, size):
            while object.alive and object.copy is not None and not object.copy.has_own(page_offset):
                try:
                    page = await fault_page(object, page_offset, VM_PROT_READ)
                    _push_if_copied(object, page_offset, page.data)
                except _WaitForMemory as wait:
                    await kernel.vm_page_wait(wait.shortage)
                except _Restart:
                    pass
                except KernError as error:
                    log.error("kernel %s: a delayed copy of %r lost page %#x: %s", kernel.name, object, page_offset, error)
                    break

    def _apply_lock(self, object: VMObject, message: MemoryObjectLockRequest) -> None:
        kernel = self.kernel
        page_size = kernel.page_size
        size = -(-message.size // page_size) * page_size
        pages = [page for page in object.pages_in_range(message.offset, size) if not page.absent]
        for page in pages:
            page.page_lock = message.lock_value
            page.unlock_request &= message.lock_value
            if not message.lock_value & VM_PROT_WRITE:
                _lock_if_copied(object, page)
        if message.should_return != MEMORY_OBJECT_RETURN_NONE:
            wanted = [
                page
                for page in pages
                if page.dirty or (message.should_return == MEMORY_OBJECT_RETURN_ALL and page.precious)
            ]
            return_pages(object, wanted, kernel_copy=not message.should_flush)
        for page in pages:
            if message.should_flush:
                kernel.objects.free_page(page)
                kernel.stats.flushes += 1
            else:
                page.wakeup()
        kernel.stats.lock_requests += 1
        assert object.control is not None
        self._reply(
            message.reply_to,
            MemoryObjectLockCompleted(control=object.control.make_send(), offset=message.offset, length=message.size),
        )

    def destroy(self, object: VMObject, message: MemoryObjectDestroy) -> None:
        self.kernel.objects.destroy(object, message.reason)


def _lock_if_copied(object: VMObject, page: Page) -> None:
    """A page that was on its way when a COPY_CALL copy of it was made gets the copy's write
    lock now, whatever the manager's answer to the earlier request says (vm_copy._copy_call).
    Its unlock request is clear, so a write asks the manager again, which knows of the copy."""
    if page in object.lock_on_arrival:
        object.lock_on_arrival.discard(page)
        page.page_lock |= VM_PROT_WRITE


class NotifyServer:
    """The kernel's notification port: dead memory object ports mean dead managers."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def handle(self, port: Port, message: Message) -> None:
        if isinstance(message, MachNotifyDeadName):
            self.kernel.objects.manager_port_died(message.name)
        elif isinstance(message, MachNotifyNoSenders):
            pass
        else:
            log.warning("kernel %s notify port got %s", self.kernel.name, message.describe())
            message.destroy_rights()

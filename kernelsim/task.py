"""Tasks: an address map, the vm_* calls on it, and simulated memory access.

`await task.read(address, n)` and `await task.write(address, data)` stand for the task's threads
touching memory: any byte range, across pages and map entries, each page faulted in as it is
touched.  The vm_* calls only change the map (as in Mach they do not talk to managers); they
are plain methods.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .interface import (
    VM_INHERIT_COPY,
    VM_INHERIT_DEFAULT,
    VM_INHERIT_NONE,
    VM_INHERIT_SHARE,
    VM_PROT_ALL,
    VM_PROT_DEFAULT,
    VM_PROT_READ,
    VM_PROT_WRITE,
    VM_OFFSET_T,
    KernInvalidAddress,
    KernInvalidArgument,
    KernNoSpace,
    KernProtectionFailure,
)
from .ipc_port import SendRight
from .vm_copy import copy_range
from .vm_fault import vm_fault
from .vm_map import MapEntry, VMMap

if TYPE_CHECKING:
    from .kernel import Kernel
    from .vm_page import Page

_task_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Region:
    """What vm_region tells of one map entry."""

    address: int
    size: int
    protection: int
    max_protection: int
    inheritance: int
    shared: bool
    name: SendRight
    """A send right to the object's name port: the port memory_object_init named it by."""
    offset: int


class Task:
    def __init__(self, kernel: Kernel, name: str | None = None) -> None:
        self.kernel = kernel
        self.id = next(_task_ids)
        self.name = name or f"task{self.id}"
        self.map = VMMap(kernel)
        self.alive = True

    def __repr__(self) -> str:
        return f"<task {self.name} on {self.kernel.name}>"

    # -- helpers -----------------------------------------------------------------------------

    def _round(self, size: int) -> int:
        page_size = self.kernel.page_size
        return -(-size // page_size) * page_size

    def _range(self, address: int, size: int) -> tuple[int, int]:
        page_size = self.kernel.page_size
        if size < 0 or address < 0:
            raise KernInvalidArgument(f"negative address or size ({address:#x}, {size})", address=address, size=size)
        start = address & ~(page_size - 1)
        return start, self._round(address + size)

    def _place(self, size: int, address: int | None, anywhere: bool, mask: int) -> int:
        if size <= 0:
            raise KernInvalidArgument(f"size {size} must be positive", size=size)
        if anywhere or address is None:
            return self.map.find_space(size, mask)
        if address % self.kernel.page_size:
            raise KernInvalidArgument(f"address {address:#x} is not page aligned", address=address)
        if not self.map.is_free(address, address + size):
            raise KernNoSpace(address, size, "range already in use")
        return address

    def _check_prot(self, protection: int, max_protection: int) -> None:
        if protection & ~VM_PROT_ALL or max_protection & ~VM_PROT_ALL:
            raise KernInvalidArgument(f"bad protection {protection:#x}/{max_protection:#x}")
        if protection & ~max_protection:
            raise KernInvalidArgument(
                f"protection {protection:#x} exceeds max protection {max_protection:#x}",
                protection=protection,
                max_protection=max_protection,
            )

    def _mapped(self, start: int, end: int) -> list[MapEntry]:
        """The entries of [start, end), clipped, which must cover it with no hole."""
        entries = self.map.clip(start, end)
        cursor = start
        for entry in entries:
            if entry.start != cursor:
                break
            cursor = entry.end
        if cursor < end:
            raise KernInvalidAddress(cursor, "range not wholly mapped")
        return entries

    # -- vm_* calls --------------------------------------------------------------------------

    def vm_allocate(self, size: int, address: int | None = None, anywhere: bool = True) -> int:
        """Zero-filled anonymous memory; returns its address."""
        size = self._round(size)
        start = self._place(size, address, anywhere, 0)
        object = self.kernel.objects.allocate_internal(size)
        self.kernel.objects.reference(object)
        self.map.insert(MapEntry(start, start + size, object, 0, VM_PROT_DEFAULT, VM_PROT_ALL, VM_INHERIT_DEFAULT))
        return start

    async def vm_map(
        self,
        memory_object: SendRight | None,
        size: int,
        offset: int = 0,
        *,
        address: int | None = None,
        anywhere: bool = True,
        mask: int = 0,
        copy: bool = False,
        protection: int = VM_PROT_DEFAULT,
        max_protection: int = VM_PROT_ALL,
        inheritance: int = VM_INHERIT_DEFAULT,
    ) -> int:
        """Map `size` bytes of `memory_object` from `offset`; returns the address.  With `copy`,
        what is mapped is a copy of that range, as the object's copy strategy says (which may
        mean waiting for the manager's memory_object_ready).

        The kernel keeps its own send right to the object; a null object is anonymous memory.
        """
        self._check_prot(protection, max_protection)
        if inheritance not in (VM_INHERIT_SHARE, VM_INHERIT_COPY, VM_INHERIT_NONE):
            raise KernInvalidArgument(f"bad inheritance {inheritance}", inheritance=inheritance)
        if offset < 0 or offset % self.kernel.page_size:
            raise KernInvalidArgument(
                f"offset {offset:#x} is not a multiple of the page size {self.kernel.page_size}", offset=offset
            )
        size = self._round(size)
        if offset + size > VM_OFFSET_T.high + 1:
            # The object's pages past this have offsets no vm_offset_t in a message can carry.
            raise KernInvalidArgument(
                f"range [{offset:#x}, {offset + size:#x}) of a memory object: offsets end at {VM_OFFSET_T.high + 1:#x}",
                offset=offset,
                size=size,
            )
        start = self._place(size, address, anywhere, mask)
        if memory_object is None:
            object = self.kernel.objects.allocate_internal(size)
            object_offset = offset
        else:
            if memory_object.dead:
                raise KernInvalidArgument(f"memory object port {memory_object.name} is dead")
            object = self.kernel.objects.enter(memory_object)
            object_offset = offset
            if copy:
                source = object
                self.kernel.objects.reference(source)  # held while the copy is made
                try:
                    object, object_offset = await copy_range(source, offset, size)
                finally:
                    self.kernel.objects.deallocate(source)
        if not self.map.is_free(start, start + size):
            start = self._place(size, address, anywhere, mask)  # the map changed while we waited
        self.kernel.objects.reference(object)
        self.map.insert(MapEntry(start, start + size, object, object_offset, protection, max_protection, inheritance))
        return start

    def vm_deallocate(self, address: int, size: int) -> None:
        """Unmap the range (holes are fine); the last mapping of an object terminates it."""
        start, end = self._range(address, size)
        for entry in self.map.remove(start, end):
            self.kernel.objects.deallocate(entry.object)

    def vm_protect(self, address: int, size: int, set_maximum: bool, new_protection: int) -> None:
        if new_protection & ~VM_PROT_ALL:
            raise KernInvalidArgument(f"bad protection {new_protection:#x}")
        start, end = self._range(address, size)
        entries = self._mapped(start, end)
        if not set_maximum:
            for entry in entries:
                if new_protection & ~entry.max_protection:
                    raise KernProtectionFailure(entry.start, new_protection, entry.max_protection)
        for entry in entries:
            if set_maximum:
                entry.max_protection = new_protection
                entry.protection &= new_protection
            else:
                entry.protection = new_protection

    def vm_inherit(self, address: int, size: int, new_inheritance: int) -> None:
        if new_inheritance not in (VM_INHERIT_SHARE, VM_INHERIT_COPY, VM_INHERIT_NONE):
            raise KernInvalidArgument(f"bad inheritance {new_inheritance}", inheritance=new_inheritance)
        start, end = self._range(address, size)
        for entry in self._mapped(start, end):
            entry.inheritance = new_inheritance

    def vm_region(self, address: int) -> Region:
        """The entry at `address` or, if none, the next one above; KernNoSpace past the last."""
        entry = self.map.next_entry(address)
        if entry is None:
            raise KernNoSpace(address, 0, "no region at or above this address")
        return Region(
            address=entry.start,
            size=entry.size,
            protection=entry.protection,
            max_protection=entry.max_protection,
            inheritance=entry.inheritance,
            shared=entry.is_shared,
            name=entry.object.name_port.make_send(),
            offset=entry.offset,
        )

    async def copy_entries(self, start: int, end: int) -> list[MapEntry]:
        """Copies of the entries of [start, end) (which must be wholly mapped and readable),
        each as its object's copy strategy says; their addresses are the source's."""
        copies = []
        for entry in self._mapped(start, end):
            if not entry.protection & VM_PROT_READ:
                raise KernProtectionFailure(entry.start, VM_PROT_READ, entry.protection)
        for entry in list(self._mapped(start, end)):
            source = entry.object
            self.kernel.objects.reference(source)
            try:
                object, offset = await copy_range(source, entry.offset, entry.size)
            finally:
                self.kernel.objects.deallocate(source)
            copies.append(
                MapEntry(entry.start, entry.end, object, offset, entry.protection, entry.max_protection, entry.inheritance)
            )
        return copies

    async def vm_copy(self, source_address: int, size: int, dest_address: int) -> None:
        """Copy [source, source+size) over [dest, dest+size), which must be mapped writable:
        the destination then holds the source's contents as of now, whatever changes later."""
        page_size = self.kernel.page_size
        if source_address % page_size or dest_address % page_size or size % page_size:
            raise KernInvalidArgument("vm_copy needs page-aligned addresses and size", source=source_address, size=size)
        for entry in self._mapped(dest_address, dest_address + size):
            if not entry.protection & VM_PROT_WRITE:
                raise KernProtectionFailure(entry.start, VM_PROT_WRITE, entry.protection)
        copies = await self.copy_entries(source_address, source_address + size)
        self.vm_deallocate(dest_address, size)
        for copy in copies:
            shift = dest_address - source_address
            copy.start += shift
            copy.end += shift
            self.kernel.objects.reference(copy.object)
            self.map.insert(copy)

    async def vm_read(self, address: int, size: int) -> bytes:
        """The contents of the range now (Mach returns them as out-of-line memory)."""
        return await self.read(address, size)

    async def vm_write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Store `data` at `address` (the range must be mapped writable)."""
        await self.write(address, data)

    # -- memory access -----------------------------------------------------------------------

    async def read(self, address: int, n: int) -> bytes:
        """The `n` bytes at `address`, faulting in each page."""
        if n < 0:
            raise KernInvalidArgument(f"negative length {n}")
        page_size = self.kernel.page_size
        within = address & (page_size - 1)
        if 0 < n <= page_size - within:  # in one page
            page = self._resident_page(address, VM_PROT_READ) or await vm_fault(self.map, address, VM_PROT_READ)
            return bytes(page.data[within : within + n])  # type: ignore[index]
        # Each page's bytes are taken when the page is reached (as a fault would find them);
        # the pieces of pages reached without waiting are joined before any wait, so a write
        # made while this read waits shows only in the pages read after it.
        chunks: list[bytes] = []
        pieces: list[bytes | bytearray] = []
        done = 0
        while done < n:
            done = self._resident_run(address, done, n, VM_PROT_READ, pieces)
            if done >= n:
                break
            if pieces:
                chunks.append(b"".join(pieces))
                pieces.clear()
            at = address + done
            page = await vm_fault(self.map, at, VM_PROT_READ)
            within = at & (page_size - 1)
            chunk = min(page_size - within, n - done)
            pieces.append(page.data if chunk == page_size else page.data[within : within + chunk])  # type: ignore[arg-type,index]
            done += chunk
        if chunks:
            chunks.append(b"".join(pieces))
            return b"".join(chunks)
        return b"".join(pieces)

    async def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Store `data` at `address`, faulting in each page for writing."""
        page_size = self.kernel.page_size
        view = memoryview(data).cast("B")
        n = len(view)
        within = address & (page_size - 1)
        if 0 < n <= page_size - within:  # in one page
            page = self._resident_page(address, VM_PROT_WRITE) or await vm_fault(self.map, address, VM_PROT_WRITE)
            page.data[within : within + n] = view  # type: ignore[index]
            return
        done = 0
        while done < n:
            done = self._resident_run(address, done, n, VM_PROT_WRITE, view)
            if done >= n:
                break
            at = address + done
            page = await vm_fault(self.map, at, VM_PROT_WRITE)
            within = at & (page_size - 1)
            chunk = min(page_size - within, n - done)
            page.data[within : within + chunk] = view[done : done + chunk]  # type: ignore[index]
            done += chunk

    def _resident_page(self, address: int, access: int) -> Page | None:
        """The page at `address` if it needs no fault for `access` (see _resident_run), with
        the same effects as vm_fault's; None if vm_fault must see to it."""
        entry = self.map.lookup(address)
        if entry is None or access & ~entry.protection or not entry.object.alive:
            return None
        object = entry.object
        offset = entry.object_offset(address & ~(self.kernel.page_size - 1))
        page = object.pages.get(offset)
        if page is None or page.absent or page.page_lock & access:
            return None
        if not access & VM_PROT_WRITE:
            if page.ahead is not None:
                return None  # a read-ahead mark: vm_fault asks for the next cluster
        else:
            copy = object.copy
            if copy is not None and copy.alive and copy.covered(offset) and not copy.has_own(offset):
                return None
            page.dirty = True
        self.kernel.resident.touch(page)
        self.kernel.stats.faults += 1
        return page

    def _resident_run(self, address: int, done: int, n: int, access: int, buffer) -> int:
        """Access the bytes [address+done, address+n) of the pages that need no fault: resident
        pages of the mapped object itself, one after the other in one map entry, whose
        protection and lock allow `access` and, for a write, that no delayed copy must take
        first.  These are the checks vm_fault makes, with the same effects: the pages are
        touched (LRU), a write marks them dirty, each counts as a fault.  A read appends the
        bytes to `buffer` (a list), a write takes them from it (a memoryview).  Returns how far
        it got; the caller faults on the page there."""
        at = address + done
        entry = self.map.lookup(at)
        if entry is None or access & ~entry.protection or not entry.object.alive:
            return done
        object = entry.object
        page_size = self.kernel.page_size
        pages = object.pages
        writing = access & VM_PROT_WRITE
        copy = object.copy if writing else None
        if copy is not None and not copy.alive:
            copy = None
        stop = min(address + n, entry.end)
        page_offset = entry.object_offset(at & ~(page_size - 1))
        within = at & (page_size - 1)
        touched = []
        while at < stop:
            page = pages.get(page_offset)
            if page is None or page.absent or page.page_lock & access or (page.ahead is not None and not writing):
                break  # vm_fault takes it from here (and asks for the next cluster at a mark)
            if copy is not None and copy.covered(page_offset) and not copy.has_own(page_offset):
                break  # the copy must take the old page first: vm_fault pushes it
            chunk = min(page_size - within, stop - at)
            if writing:
                page.data[within : within + chunk] = buffer[done : done + chunk]  # type: ignore[index]
                page.dirty = True
            elif chunk == page_size:
                buffer.append(page.data)
            else:
                buffer.append(page.data[within : within + chunk])  # type: ignore[index]
            touched.append(page)
            done += chunk
            at += chunk
            page_offset += page_size
            within = 0
        if touched:
            self.kernel.resident.touch_all(touched)
            self.kernel.stats.faults += len(touched)
        return done

    def terminate(self) -> None:
        """task_terminate: the whole address space goes."""
        if self.alive:
            self.alive = False
            for entry in self.map.remove(0, self.map.entries[-1].end if self.map.entries else 0):
                self.kernel.objects.deallocate(entry.object)
            self.kernel.tasks.discard(self)

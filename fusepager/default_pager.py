"""The default memory manager: where kernels page out memory nobody else backs.

A kernel that set this manager's port with vm_set_default_memory_manager hands it its internal
objects (anonymous memory, copies) when it first needs to page them out:
memory_object_create(new object, size, control, name, page size), after which the new object is
served like any other by a `Pager` (no init or ready: the kernel assumes them).  Each temporary
keeps its pages in a sparse file, STORE/default/ID/data, shown in the mount as default/ID/data:

- memory_object_data_initialize stores a page's first data, and is ignored for a page that
  already has data (the chapter says so);
- memory_object_data_return stores a page's new data;
- memory_object_data_request gets the data, or memory_object_data_unavailable for pages never
  written;
- memory_object_terminate forgets the temporary and removes its file.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import trio

from kernelsim import messages as m
from kernelsim.interface import KERN_MEMORY_FAILURE
from kernelsim.ipc_port import SendRight, port_allocate

from .pager import Pager, PagerCallbacks, PagerError
from .trace import Stats, Trace

log = logging.getLogger("fusepager.default_pager")

_temporary_ids = itertools.count(1)


class TemporaryCallbacks(PagerCallbacks):
    """A temporary object's pages in a sparse file; `written` says which pages have data."""

    def __init__(self, path: Path, size: int, page_size: int) -> None:
        self.path = path
        self.size = size
        self.page_size = page_size
        self.written: set[int] = set()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def _pages(self, offset: int, length: int) -> range:
        return range(offset - offset % self.page_size, offset + length, self.page_size)

    async def read_pages(self, offset: int, length: int) -> bytes | None:
        if self.fd < 0:
            raise PagerError("the temporary object has ended", KERN_MEMORY_FAILURE)
        if not any(page in self.written for page in self._pages(offset, length)):
            return None  # never written: the kernel zero-fills (or looks in the shadow)
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as error:
            raise PagerError(f"reading temporary data: {error.strerror}", KERN_MEMORY_FAILURE, error.errno) from error
        return data.ljust(length, b"\0")

    async def write_pages(self, offset: int, data: bytes) -> None:
        if self.fd < 0:
            return  # the temporary ended while this return was on its way: nobody needs it
        try:
            os.pwrite(self.fd, data, offset)
        except OSError as error:
            raise PagerError(f"writing temporary data: {error.strerror}", KERN_MEMORY_FAILURE, error.errno) from error
        self.written.update(self._pages(offset, len(data)))

    async def initialize_pages(self, offset: int, data: bytes) -> None:
        for index in range(0, len(data), self.page_size):
            page = offset + index
            if page not in self.written:
                await self.write_pages(page, data[index : index + self.page_size])

    async def report_extent(self) -> int:
        return self.size

    def read(self, offset: int, size: int) -> bytes:
        """For the mount's default/ID/data: the file's bytes, up to the object's size."""
        size = max(0, min(size, self.size - offset))
        if self.fd < 0:
            return b""
        return os.pread(self.fd, size, offset).ljust(size, b"\0") if size else b""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


@dataclass(eq=False)
class Temporary:
    id: int
    size: int
    pager: Pager
    callbacks: TemporaryCallbacks
    kernel: str
    origin: tuple[SendRight, int] | None = None  # the memory object it copies, and where


class DefaultManager:
    """Receives memory_object_create on `port` and serves each temporary with its own pager."""

    def __init__(self, root: Path, trace: Trace | None = None, stats: Stats | None = None) -> None:
        self.root = root
        self.trace = trace or Trace()
        self.stats = stats or Stats()
        self.port = port_allocate("default memory manager")
        self.temporaries: dict[int, Temporary] = {}
        self._nursery: trio.Nursery | None = None
        # Temporaries left by an earlier run belong to kernels that are gone.
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)

    def send_right(self) -> SendRight:
        """What vm_set_default_memory_manager takes."""
        return self.port.make_send()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            async for received in self.port:
                message = received.message
                self.stats.received(message)
                if isinstance(message, m.MemoryObjectCreate):
                    await self._create(message)
                else:
                    self.stats.refused += 1
                    self.trace.line(f"default manager refused {message.describe()}: not memory_object_create")
                    message.destroy_rights()
            nursery.cancel_scope.cancel()

    async def _create(self, message: m.MemoryObjectCreate) -> None:
        ident = next(_temporary_ids)
        directory = self.root / str(ident)
        directory.mkdir()
        callbacks = TemporaryCallbacks(directory / "data", message.new_object_size, message.new_page_size)
        pager = Pager(callbacks, name=f"default/{ident}", trace=self.trace, stats=self.stats, port=message.new_object)
        temporary = Temporary(ident, message.new_object_size, pager, callbacks, message.new_control.host, message.new_object.port.origin)
        pager.on_end = lambda: self._ended(temporary)
        self.temporaries[ident] = temporary
        copies = ""
        if temporary.origin is not None:
            copies = f", a copy of memory object port {temporary.origin[0].name} from {temporary.origin[1]:#x}"
        self.trace.message(temporary.kernel or "?", "default", message)
        self.trace.line(f"default manager: temporary {ident} of {message.new_object_size} bytes{copies}")
        pager.adopt(message)
        assert self._nursery is not None
        await self._nursery.start(pager.serve)

    def _ended(self, temporary: Temporary) -> None:
        if self.temporaries.pop(temporary.id, None) is None:
            return
        temporary.pager.port.destroy()
        temporary.callbacks.close()
        try:
            os.rmdir(self.root / str(temporary.id))
        except OSError as error:
            if error.errno != errno.ENOENT:
                log.warning("removing temporary %d: %s", temporary.id, error)
        self.trace.line(f"default manager: temporary {temporary.id} ended")

    def copies_of(self, port_name: int) -> list[Temporary]:
        """The temporaries that are delayed copies of the memory object `port_name`."""
        return [t for t in self.temporaries.values() if t.origin is not None and t.origin[0].name == port_name]

    def close(self) -> None:
        for temporary in list(self.temporaries.values()):
            self._ended(temporary)
        self.port.destroy()

"""The memory manager behind a mount: one pager per object of a FileStore.

`FileManager` starts a `Pager` for an object the first time something needs it (a kernel looks
it up by name, the mount shows its kernels) and keeps it for as long as the object exists.  The
pagers' callbacks (`StoreCallbacks`) read and write the object's sparse data file.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import trio

from kernelsim import messages as m
from kernelsim.interface import KERN_FAILURE, KERN_INVALID_NAME, KERN_MEMORY_FAILURE, KERN_SUCCESS, MachSendInvalidDest
from kernelsim.ipc_port import SendRight, port_allocate

from .control import COPY_NAMES, COPY_STRATEGIES
from .copies import CopyStore
from .default_pager import DefaultManager
from .outside import OutsideCopies
from .pager import Pager, PagerCallbacks, PagerError
from .removed import RemovedObject
from .store import FileStore, ObjectMeta, StoredObject, StoreError
from .trace import Stats, Trace

log = logging.getLogger("fusepager.manager")

TRACE_SYNC_INTERVAL = 1.0


class StoreCallbacks(PagerCallbacks):
    """A pager's I/O on one object of the file store."""

    def __init__(self, stored: StoredObject) -> None:
        self.stored = stored

    async def read_pages(self, offset: int, length: int) -> bytes | None:
        try:
            return self.stored.read_pages(offset, length)
        except (OSError, StoreError) as error:
            raise PagerError(f"reading {length} bytes at {offset:#x}: {os.strerror(error.errno)}", KERN_MEMORY_FAILURE, error.errno) from error

    async def write_pages(self, offset: int, data: bytes) -> None:
        # Kernels return whole pages.  Past the object's end, keep what they wrote up to its
        # last non-zero byte: zeros there read back the same as no data, and a page that only
        # straddles the end must not grow the object to a page boundary.
        end_of_object = self.stored.size
        if offset + len(data) > end_of_object:
            inside = max(0, end_of_object - offset)
            data = data[: inside + len(data[inside:].rstrip(b"\0"))]
            if not data:
                return
        try:
            self.stored.write(offset, data)
        except (OSError, StoreError) as error:
            raise PagerError(f"writing {len(data)} bytes at {offset:#x}: {os.strerror(error.errno)}", KERN_MEMORY_FAILURE, error.errno) from error

    async def report_extent(self) -> int:
        return self.stored.size

    def copy_store(self, copy_id: int, length: int, page_size: int) -> CopyStore:
        """A COPY_CALL copy's pages go to STORE/objects/NAME/snapshots/ID, a sparse file."""
        directory = os.path.join(self.stored.path, b"snapshots")
        os.makedirs(directory, exist_ok=True)
        return FileCopyStore(os.path.join(directory, str(copy_id).encode()), page_size)


class FileCopyStore(CopyStore):
    def __init__(self, path: bytes, page_size: int) -> None:
        super().__init__(page_size)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    async def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset).ljust(length, b"\0")

    async def write(self, offset: int, data: bytes) -> None:
        try:
            os.pwrite(self.fd, data, offset)
        except OSError as error:
            raise PagerError(f"writing snapshot {os.fsdecode(self.path)}: {error.strerror}", KERN_MEMORY_FAILURE) from error
        self.held.update(range(offset, offset + len(data), self.page_size))

    def discard(self) -> None:
        os.close(self.fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def display_name(name: bytes) -> str:
    return os.fsdecode(name)


class FileManager:
    def __init__(self, store: FileStore, trace: Trace | None = None, stats: Stats | None = None) -> None:
        self.store = store
        self.trace = trace or Trace()
        self.stats = stats or Stats()
        self.pagers: dict[bytes, Pager] = {}
        # Also the default memory manager of the kernels it serves: their temporaries live in
        # STORE/default.
        self.default = DefaultManager(Path(os.fsdecode(store.root)) / "default", self.trace, self.stats)
        # Kernels in other processes find objects by name here (netname_look_up).
        self.name_service = port_allocate("fusepager name service")
        self.connections: set = set()  # kernels in other processes (transport.Connection)
        self.removed: set[RemovedObject] = set()  # removed objects' ports kernels may hold
        self._nursery: trio.Nursery | None = None
        # Told when kernels change an object's bytes in the store or gain the right to: the
        # mount drops Linux's cached copy of its `data` file.
        self.on_object_changed: Callable[[bytes], None] | None = None
        # The copies of an object's bytes held outside the protocol, given to its pager (the
        # mount: Linux's page cache of its `data`; see outside.py).
        self.outside_copies: Callable[[bytes], OutsideCopies] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Home of the pagers; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.default.run)
            nursery.start_soon(self._serve_names)
            nursery.start_soon(self._sync_trace)
            task_status.started()
            await trio.sleep_forever()

    async def _sync_trace(self) -> None:
        """The trace's buffered lines reach its file within a second, read or not (`tail -F`
        of the store's file, or a daemon that is killed, sees them)."""
        while True:
            await trio.sleep(TRACE_SYNC_INTERVAL)
            self.trace.sync()

    async def _serve_names(self) -> None:
        async for received in self.name_service:
            message = received.message
            if not isinstance(message, m.NetnameLookUp):
                self.stats.refused += 1
                self.trace.line(f"name service refused {message.describe()}: not netname_look_up")
                message.destroy_rights()
                continue
            try:
                port = self.pager(message.name).send_right()
                answer = m.NetnameLookUpReply(return_code=KERN_SUCCESS, port=port)
            except StoreError as error:
                self.trace.line(f"name service: no object {message.name!r} ({error})")
                answer = m.NetnameLookUpReply(return_code=KERN_INVALID_NAME, port=None)
            except Exception as error:
                # A bug met by one look-up: that kernel hears KERN_FAILURE, the service goes on.
                log.exception("name service: internal error looking up %r", message.name)
                self.trace.line(f"name service INTERNAL ERROR looking up {message.name!r}: {error!r} (see the daemon's log)")
                answer = m.NetnameLookUpReply(return_code=KERN_FAILURE, port=None)
            try:
                message.reply.send(answer)
            except MachSendInvalidDest:
                answer.destroy_rights()

    def pager(self, name: bytes) -> Pager:
        """The object's pager, started on first use; StoreError ENOENT if there is no object."""
        pager = self.pagers.get(name)
        if pager is not None:
            return pager
        stored = self.store.open(name)
        meta = stored.meta
        pager = Pager(
            StoreCallbacks(stored),
            name=display_name(name),
            may_cache=meta.may_cache,
            copy_strategy=COPY_STRATEGIES[meta.copy_strategy],
            auto_ready=meta.auto_ready,
            notify_on_evict=True,
            trace=self.trace,
            stats=self.stats,
            on_change=lambda kind, offset, length: self._changed(name),
        )
        if self.outside_copies is not None:
            pager.outside = self.outside_copies(name)
        assert self._nursery is not None, "FileManager.run is not running"
        self._nursery.start_soon(pager.serve)
        self.pagers[name] = pager
        return pager

    def _changed(self, name: bytes) -> None:
        if self.on_object_changed is not None:
            self.on_object_changed(name)

    def spawn(self, function, *args) -> None:
        """Run a background task beside the pagers."""
        assert self._nursery is not None, "FileManager.run is not running"
        self._nursery.start_soon(self._guarded, function, *args)

    async def _guarded(self, function, *args) -> None:
        """A background task's bug is logged and traced; it never ends the manager (and with
        it the mount)."""
        try:
            await function(*args)
        except Exception as error:
            name = getattr(function, "__name__", function)
            log.exception("manager: internal error in %s", name)
            self.trace.line(f"manager INTERNAL ERROR in {name}: {error!r} (see the daemon's log)")

    def active(self, name: bytes) -> Pager | None:
        """The object's pager if one runs (no pager means no kernel has used it)."""
        return self.pagers.get(name)

    async def resolve(self, name: str) -> SendRight:
        """A send right to the memory object called `name`: how kernels find objects."""
        try:
            return self.pager(os.fsencode(name)).send_right()
        except StoreError as error:
            raise ValueError(f"no object {name!r}: {error}") from None

    def create(self, name: bytes) -> None:
        self.store.create(name, ObjectMeta())
        self.trace.line(f"manager created object {display_name(name)}")

    def remove(self, name: bytes) -> None:
        """Remove an object no kernel has initialised (memory_object_init, and no terminate
        since); StoreError EBUSY if one has.  A kernel that mapped it but has not faulted yet
        has not: its first fault hears memory_object_destroy (fusepager.removed)."""
        pager = self.pagers.get(name)
        if pager is not None and pager.kernels:
            labels = ", ".join(sorted(r.label for r in pager.kernels.values()))
            raise StoreError(
                errno.EBUSY,
                f"object {display_name(name)} is in use by {labels} (initialised, not terminated): "
                f"unmap it there, or have its kernels let go with: echo destroy > objects/{display_name(name)}/ctl",
            )
        self.store.remove(name)
        if pager is not None:
            self.pagers.pop(name)
            RemovedObject(pager, self.trace, self.stats, self.removed)
        self.trace.line(f"manager removed object {display_name(name)}")

    async def set_attributes(self, name: bytes, may_cache: bool | None, copy_strategy: int | None) -> None:
        """New attributes: stored, and sent to every kernel (memory_object_change_attributes)."""
        stored = self.store.open(name)
        meta = stored.meta
        may_cache = meta.may_cache if may_cache is None else may_cache
        copy_name = meta.copy_strategy if copy_strategy is None else COPY_NAMES[copy_strategy]
        stored.set_meta(may_cache=may_cache, copy_strategy=copy_name)
        pager = self.pagers.get(name)
        if pager is not None:
            await pager.change_attributes(may_cache, COPY_STRATEGIES[copy_name])

    def set_auto_ready(self, name: bytes, auto_ready: bool) -> None:
        self.store.open(name).set_meta(auto_ready=auto_ready)
        pager = self.pagers.get(name)
        if pager is not None:
            pager.auto_ready = auto_ready

    async def idle(self) -> None:
        """Until no pager has I/O in flight or messages waiting (used at shutdown)."""
        while any(len(p.sequencer) or p.port.port.queued for p in self.pagers.values()):
            await trio.sleep(0.01)

    async def store_unstored(self) -> None:
        """A last try to store what failed writes left in the pagers' memory (at unmount)."""
        for pager in list(self.pagers.values()):
            if pager.unstored:
                await pager.store_unstored()

    def close(self) -> None:
        for pager in self.pagers.values():
            for copy in list(pager.copies.values()):
                pager._copy_ended(copy)
            pager.port.destroy()
        self.pagers.clear()
        for removed in list(self.removed):
            removed.close()
        self.default.close()
        self.name_service.destroy()
        self.trace.close()
        self.store.close()

    def pager_for_port(self, port_name: int) -> Pager | None:
        """The pager serving memory object port `port_name` (an object's or a copy's)."""
        for pager in self.pagers.values():
            if pager.port.name == port_name:
                return pager
            for copy in pager.copies.values():
                if copy.pager is not None and copy.pager.port.name == port_name:
                    return copy.pager
        return None

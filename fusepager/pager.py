"""The pager engine: the EMM protocol for one memory object, on top of an author's callbacks.

Modelled on the Hurd's libpager.  The author writes storage callbacks (`PagerCallbacks`): read
pages, write pages, report the extent, and optionally approve an unlock or hear of an eviction.
The engine does the protocol:

- it takes every kernel→manager message off the object port in seqno order and applies its
  state change at once, in that order; the I/O it needs then runs concurrently, kept in order
  where byte ranges overlap (`RangeSequencer`), so many requests are in flight at once;
- it keeps one `KernelRecord` per kernel (control and name ports, page size, ready,
  attributes) and that kernel's `Pagemap`;
- it grants exactly the access asked for: a read gets a write-locked page, so the kernel must
  ask (data_unlock) before writing, and the engine always knows which kernel may hold changes;
- it offers the author libpager's verbs: `sync`, `flush`, `return_`, `change_attributes`,
  `offer_page`, `shutdown`, plus `lock`, `destroy` and a manual `ready` for the mount.

Run it inside a nursery: `await nursery.start(pager.serve)`; give kernels `pager.send_right()`.
"""

from __future__ import annotations

import dis
import functools
import inspect
import itertools
import logging
import time
import types
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from dataclasses import dataclass, field

import trio

from kernelsim import calls
from kernelsim import messages as m
from kernelsim.interface import (
    COPY_STRATEGY_NAMES,
    KERN_MEMORY_ERROR,
    KERN_MEMORY_FAILURE,
    MEMORY_OBJECT_COPY_DELAY,
    MEMORY_OBJECT_COPY_TEMPORARY,
    MEMORY_OBJECT_RETURN_ALL,
    MEMORY_OBJECT_RETURN_DIRTY,
    MEMORY_OBJECT_RETURN_NONE,
    VM_PROT_NONE,
    VM_PROT_READ,
    VM_PROT_WRITE,
    MachSendInvalidDest,
)
from kernelsim.ipc_port import ReceivedMessage, ReceiveRight, SendRight, port_allocate

from .copies import CopyStore, MemoryCopyStore
from .outside import OutsideCopies
from .pagemap import Pagemap
from .sequencer import RangeSequencer, Reservation
from .trace import Stats, Trace
from .unstored import Unstored

log = logging.getLogger("fusepager.pager")

T = TypeVar("T")

LOCK_TIMEOUT = 30.0
"""Seconds a verb waits for a kernel's lock_completed before it stops waiting and says so."""


_DELAYED_COPIES = (MEMORY_OBJECT_COPY_DELAY, MEMORY_OBJECT_COPY_TEMPORARY)
"""Strategies under which a kernel copies the object on write by itself (delayed copies): the
engine asks such a kernel before every change from outside it, and such a kernel may need pages
from the engine to answer a flush (its copies take the old pages first)."""


class LockTimeout(Exception):
    """A kernel did not answer a lock request in time; the verb that waited says which."""


class PagerError(Exception):
    """Raised by a callback that cannot do its I/O; the kernel gets memory_object_data_error."""

    def __init__(self, message: str, reason: int = KERN_MEMORY_ERROR, errno: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.errno = errno  # the operating system's error, where there is one (ENOSPC, EIO, ...)


class PagerCallbacks:
    """What a memory manager's author provides.  All I/O the engine does goes through these."""

    async def read_pages(self, offset: int, length: int) -> bytes | None:
        """`length` bytes at `offset`, or None when the object has no data there (the kernel
        then zero-fills: memory_object_data_unavailable).  Raise PagerError on failure."""
        raise NotImplementedError

    async def write_pages(self, offset: int, data: bytes) -> None:
        """Store what a kernel returned.  Raise PagerError on failure."""
        raise NotImplementedError

    async def report_extent(self) -> int:
        """The object's size in bytes."""
        raise NotImplementedError

    async def unlock_pages(self, offset: int, length: int, access: int) -> None:
        """A kernel wants `access` to pages it holds; raise PagerError to refuse."""

    async def pages_evicted(self, offset: int, length: int) -> None:
        """A kernel let go of these pages (they came back without a kept copy)."""

    async def initialize_pages(self, offset: int, data: bytes) -> None:
        """memory_object_data_initialize (for a default manager): initial data for pages, to be
        ignored where data exists already.  By default, the same as write_pages."""
        await self.write_pages(offset, data)

    def copy_store(self, copy_id: int, length: int, page_size: int) -> CopyStore:
        """Where copy `copy_id` (a COPY_CALL copy of `length` bytes) keeps its pages; in memory
        unless the author keeps them somewhere better (the mount: a snapshot file)."""
        return MemoryCopyStore(page_size)


@dataclass
class KernelRecord:
    """One kernel's use of the object: what memory_object_init told, what the engine granted."""

    host: str
    label: str
    control: SendRight
    name: SendRight
    page_size: int
    pagemap: Pagemap
    ready: bool = False
    may_cache: bool = False
    copy_strategy: int = MEMORY_OBJECT_COPY_DELAY
    pending_unlocks: list[m.MemoryObjectDataUnlock] = field(default_factory=list)
    # Ever told copy=delay or copy=temporary: it may hold delayed copies of the object, which
    # take the old pages before a change, even after it is told another strategy.
    delayed_copies: bool = False

    def __post_init__(self) -> None:
        self.delayed_copies = self.delayed_copies or self.copy_strategy in _DELAYED_COPIES

    def tell_copy_strategy(self, copy_strategy: int) -> None:
        self.copy_strategy = copy_strategy
        self.delayed_copies = self.delayed_copies or copy_strategy in _DELAYED_COPIES

    def round(self, offset: int, length: int) -> tuple[int, int]:
        """The kernel's whole pages covering [offset, offset+length)."""
        start = offset - offset % self.page_size
        end = offset + length
        end += -end % self.page_size
        return start, end - start

    def ready_line(self) -> str:
        return f"may_cache={int(self.may_cache)} copy={COPY_STRATEGY_NAMES[self.copy_strategy]}\n"


@dataclass(eq=False)
class _Revocation:
    """A kernel's range whose data may be on its way back."""

    start: int
    end: int
    done: trio.Event
    kernel: KernelRecord | None = None
    # Where the kernel may have changed pages (writable in its pagemap when asked), as
    # [start, end) runs: only there can data that changes the store come back.
    changing: list[tuple[int, int]] = field(default_factory=list)


@dataclass(eq=False)
class _AtOnce:
    """A data_request served at once, out of the grants line, to a kernel being flushed there
    (`_supply_at_once`); `sent` is set once it has been answered."""

    kernel: KernelRecord
    start: int
    end: int
    sent: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class _Queued:
    """A data_request waiting for its turn in the grants line, from its dispatch
    (`_request_pages`) until its turn comes (`_turn`).  A flush of its kernel over some of its
    pages cancels `scope` (maybe before `_turn` has entered it) and sets `at_once`: those pages
    are served at once, and the rest takes a place in line again (`_turn`)."""

    kernel: KernelRecord
    start: int
    end: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    at_once: _AtOnce | None = None


@dataclass(eq=False)
class _LockWait:
    offset: int
    length: int
    done: trio.Event = field(default_factory=trio.Event)
    revocation: _Revocation | None = None
    flush: bool = False
    lock_value: int = VM_PROT_NONE
    # Requests served at once over this range while the flush was on its way (_supply_at_once).
    served: list[_AtOnce] = field(default_factory=list)
    should_return: int = MEMORY_OBJECT_RETURN_NONE
    started: float = field(default_factory=time.monotonic)  # when the request was sent (for `locks`)


@dataclass(frozen=True)
class LockState:
    """One lock the engine keeps or waits on, as `Pager.locks` describes it (the mount's
    `locks` file)."""

    kind: str  # "manager": a lock from `lock` (ctl lock); "request": a lock request awaiting
    #            its lock_completed; "unlock": a data_unlock held by a manager lock
    offset: int  # bytes; a request's or an unlock's are in its kernel's pages
    length: int
    prot: int  # manager: the accesses forbidden; request: its lock value; unlock: the access asked
    kernel: str = ""  # the kernel's label (requests and unlocks)
    flush: bool = False  # requests: should_flush
    should_return: int = MEMORY_OBJECT_RETURN_NONE  # requests
    waited: float = 0.0  # requests: seconds since it was sent


_HANDLERS = {
    m.MemoryObjectInit: "_init",
    m.MemoryObjectDataRequest: "_data_request",
    m.MemoryObjectDataUnlock: "_data_unlock",
    m.MemoryObjectDataReturn: "_data_return",
    m.MemoryObjectLockCompleted: "_lock_completed",
    m.MemoryObjectTerminate: "_terminate",
    m.MemoryObjectCopy: "_copy",
    m.MemoryObjectDataInitialize: "_data_initialize",
}
"""The method that dispatches each kind of message (looked up on the pager each time)."""


class Pager:
    def __init__(
        self,
        callbacks: PagerCallbacks,
        *,
        name: str,
        may_cache: bool = False,
        copy_strategy: int = MEMORY_OBJECT_COPY_DELAY,
        auto_ready: bool = True,
        precious: bool = False,
        notify_on_evict: bool = False,
        trace: Trace | None = None,
        stats: Stats | None = None,
        on_change: Callable[[str, int, int], None] | None = None,
        port: ReceiveRight | None = None,
    ) -> None:
        self.callbacks = callbacks
        self.name = name
        self.may_cache = may_cache
        self.copy_strategy = copy_strategy
        self.auto_ready = auto_ready
        # notify_on_evict supplies every page precious so kernels return even clean pages they
        # evict (with dirty=0): the pagemap then knows of every eviction (libpager's option).
        self.notify_on_evict = notify_on_evict
        self.precious = precious or notify_on_evict
        self.on_change = on_change
        self.trace = trace or Trace()
        self.stats = stats or Stats()
        self.port = port if port is not None else port_allocate(f"object {name}")
        self.copies: dict[int, _Copy] = {}
        self.write_failures = 0  # returned pages write_pages could not store, ever ...
        self.last_write_failure: PagerError | None = None  # ... and why, the last time
        # ... and their bytes, which exist nowhere else: shown on every read, stored again at
        # sync, dropped where a later write succeeds.
        self.unstored = Unstored()
        # The last page write failed (a full disk): kernels asking to write more get
        # memory_object_data_error until a write or a sync succeeds.
        self.write_refusal: PagerError | None = None
        self._notify: ReceiveRight | None = None
        # Called when the last kernel goes (a copy's pager ends with its copy).
        self.on_end: Callable[[], None] | None = None
        # Set once the object is removed: then it answers every message (fusepager.removed).
        self.on_removed: Callable[[m.Message], None] | None = None
        self.kernels: dict[int, KernelRecord] = {}
        self.sequencer = RangeSequencer()
        # Grants (to kernels, and to the mount's reads and writes) on overlapping ranges happen
        # one after the other, in the order their messages came.
        self.grants = RangeSequencer()
        self.revoking: list[_Revocation] = []
        self._at_once: list[_AtOnce] = []
        self._queued: list[_Queued] = []
        self._refused_unlocks: dict[tuple[int, int], PagerError] = {}
        self.manager_locks: dict[tuple[int, int], int] = {}
        self._lock_waits: dict[int, deque[_LockWait]] = {}
        self._nursery: trio.Nursery | None = None
        self._changed = trio.lowlevel.ParkingLot()
        # The read_pages function last looked at, and how it can run (_read_kind).
        self._read_kind_of: tuple[object, int] = (None, _READ_IN_TASK)
        # Copies of the bytes held outside the protocol (the mount: Linux's page cache of
        # `data`): no kernel is given write access over a range they may hold (`_answer`,
        # `_unlock`); see outside.py.
        self.outside: OutsideCopies | None = None

    def __repr__(self) -> str:
        return f"<pager {self.name} kernels={len(self.kernels)}>"

    def send_right(self) -> SendRight:
        """A send right to the memory object port, to hand to a kernel's vm_map."""
        return self.port.make_send()

    # -- the serve loop ----------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the object port until the port dies or the task is cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            async for received in self.port:
                try:
                    self._dispatch(received)
                except Exception:
                    self._internal_error(f"handling {received.message.mach_name}")
                finally:
                    # Every message taken counts, refused or failed too: _catch_up (and
                    # wait_for_change) wait for the next one taken.
                    self._changed.unpark_all()
                    self.trace.flush()
            nursery.cancel_scope.cancel()

    def _internal_error(self, doing: str) -> None:
        """A bug in the engine: logged with its traceback and traced, and the pager goes on
        serving (one object's failure must not take the whole manager down)."""
        log.exception("pager %s: internal error while %s", self.name, doing)
        self.trace.line(f"{self.name} INTERNAL ERROR while {doing} (see the daemon's log)")

    def _dispatch(self, received: ReceivedMessage) -> None:
        message = received.message
        self.stats.received(message)
        control = getattr(message, "control", None) or getattr(message, "old_control", None)
        record = self.kernels.get(control.name) if control is not None else None
        source = record.label if record is not None else getattr(control, "host", "") or "?"
        self.trace.message(source, self.name, message)
        if self.on_removed is not None:
            self.on_removed(message)
            return
        handler_name = _HANDLERS.get(type(message))
        if handler_name is None:
            self._refuse(f"{message.mach_name} is not served by this pager")
            message.destroy_rights()
            return
        if record is None and not isinstance(message, m.MemoryObjectInit):
            message.destroy_rights()
            self._refuse(f"{message.mach_name} from a control port this pager was never given")
            return
        getattr(self, handler_name)(record, message)

    def _refuse(self, why: str) -> None:
        self.stats.refused += 1
        self.trace.line(f"{self.name} refused: {why}")
        log.warning("pager %s refused: %s", self.name, why)

    def _spawn(self, function, *args) -> None:
        assert self._nursery is not None, "the pager is not being served"
        self._nursery.start_soon(self._guarded, function, *args)

    async def _guarded(self, function, *args) -> None:
        try:
            await function(*args)
        except Exception:
            self._internal_error(f"running {getattr(function, '__name__', function)}")

    def _send(self, record: KernelRecord, message: m.Message) -> bool:
        """Send a call to a kernel's control port; False when the kernel is gone.  The trace
        line takes its place first, but its text is made once the message is on its way (for
        a kernel in another process, that is while the kernel takes it)."""
        self.stats.sent(message)
        self.trace.message(self.name, record.label, message)
        try:
            record.control.send(message)
        except MachSendInvalidDest:
            self.trace.line(f"{self.name} -> {record.label} lost: the kernel's control port is dead")
            self._forget(record)
            return False
        self.trace.flush()
        return True

    # -- kernel → manager --------------------------------------------------------------------

    def _init(self, record: None, message: m.MemoryObjectInit) -> None:
        if message.control.name in self.kernels:
            self._refuse(f"a second memory_object_init on control port {message.control.name}")
            return
        host = message.control.host or f"kernel{message.control.name}"
        labels = {r.label for r in self.kernels.values()}
        label, suffix = host, 2
        while label in labels:
            label, suffix = f"{host}-{suffix}", suffix + 1
        record = KernelRecord(
            host=host,
            label=label,
            control=message.control,
            name=message.name,
            page_size=message.page_size,
            pagemap=Pagemap(message.page_size),
        )
        self.kernels[message.control.name] = record
        self._watch(record)
        if self.auto_ready:
            self.ready(record, self.may_cache, self.copy_strategy)

    def _watch(self, record: KernelRecord) -> None:
        """Hear of the kernel's death (its control port dies with it, in another process)."""
        if self._notify is None:
            self._notify = port_allocate(f"object {self.name} notify")
            self._notify.set_kobject(self._control_died)
        record.control.request_dead_name(SendRight(self._notify.port))

    def _control_died(self, port: object, message: m.Message) -> None:
        if isinstance(message, m.MachNotifyDeadName):
            record = self.kernels.get(message.name)
            if record is not None:
                self.trace.line(f"{record.label} is gone: its control port for {self.name} died")
                self._forget(record)

    def _flushing(self, record: KernelRecord, offset: int, length: int) -> list[_LockWait]:
        """The flushes sent to this kernel over these bytes that it has not answered yet."""
        end = offset + length
        return [
            wait
            for wait in self._lock_waits.get(record.control.name, ())
            if wait.flush and not wait.done.is_set() and wait.offset < end and offset < wait.offset + wait.length
        ]

    def _data_request(self, record: KernelRecord, message: m.MemoryObjectDataRequest) -> None:
        self._request_pages(record, message.offset, message.length, message.desired_access)

    def _request_pages(self, record: KernelRecord, offset: int, length: int, access: int) -> None:
        """Serve the kernel's request for [offset, offset+length): in the grants line, but for
        the pages a flush of this kernel covers that it has not answered yet.  Where nothing
        need wait or be asked first and read_pages cannot block, the answer goes at once
        (`_supply_now`), with no task and no place in line."""
        if access & VM_PROT_WRITE and self.write_refusal is not None:
            self._cannot_supply(record, offset, length, self._refusing_writes())
            return
        end = offset + length
        covered: list[tuple[int, int]] = []
        if record.delayed_copies and self._lock_waits.get(record.control.name):
            # The kernel may need those pages to answer the flush (its delayed copies take the
            # old pages before they go), which the engine waits for, maybe inside a grant this
            # request would wait behind: they are served now.  (Another kernel answers a
            # flush at once: nothing waits for its requests.)
            flushing = self._flushing(record, offset, length)
            covered = _merge((max(offset, wait.offset), min(end, wait.offset + wait.length)) for wait in flushing)
            for low, high in covered:
                self._spawn(self._supply_at_once, record, self._at_once_start(record, low, high - low))
        kind = self._read_kind()
        started = time.perf_counter()
        for low, high in _gaps(offset, end, covered) if covered else ((offset, end),):
            if kind != _READ_IN_TASK and self._free_to_supply(record, low, high - low, access):
                self._supply_now(record, low, high - low, access, kind, started)
                continue
            # Exclusive even for reads: a hole is answered with data_unavailable, which makes the
            # page writable in the kernel, so no two kernels may be granted the same range at once.
            grant = self.grants.reserve(low, high - low, exclusive=True)
            # A kernel told copy=delay may need these pages to answer a flush of it (`_turn`): a
            # flush must find the request from now on, not only once its task has first run,
            # which can be after a flush sent in between by a grant ahead in line; that flush
            # would then wait for the kernel, the kernel for the request, the request for it.
            queued = None
            if record.delayed_copies:
                queued = _Queued(record, low, high)
                self._queued.append(queued)
            self._spawn(self._supply, record, low, high - low, access, grant, started, queued)

    def _read_kind(self) -> int:
        """How the author's read_pages can run: at once, in the caller's task, when it is a plain
        function (_READ_PLAIN) or a coroutine function with no await in its body, which
        completes as soon as it starts (_READ_NEVER_SUSPENDS); else in a task (_READ_IN_TASK).
        Looked up each time (an author may swap the method), worked out once per function."""
        read = self.callbacks.read_pages
        function = getattr(read, "__func__", read)
        known, kind = self._read_kind_of
        if function is not known:
            kind = _read_kind(function)
            self._read_kind_of = (function, kind)
        return kind

    def _free_to_supply(self, record: KernelRecord, offset: int, length: int, access: int) -> bool:
        """Whether `_supply` would run through without waiting: its kernel is there, nothing in
        the grants line or the storage line comes before it, no other kernel's data is on its way
        back, no unlock refusal waits for the request, and no other kernel nor copy need be
        asked first (a hole found by the read may still need that: `_supply_now`)."""
        if record.control.name not in self.kernels:
            return False
        if self.grants.waits(offset, length, exclusive=True) or self.sequencer.waits(offset, length, exclusive=False):
            return False
        if self._refused_unlocks and (record.control.name, offset) in self._refused_unlocks:
            return False
        end = offset + length
        for revocation in self.revoking:
            if revocation.kernel is not record and revocation.start < end and offset < revocation.end:
                return False
        write = access & VM_PROT_WRITE
        if write and self._copied(offset, length):
            return False
        for other in self.kernels.values():
            if other is record or not other.ready:
                continue
            if write:
                if other.delayed_copies or other.pagemap.holds(offset, length):
                    return False
            elif other.pagemap.any_writable(offset, length):
                return False
        return True

    def _copied(self, offset: int, length: int) -> bool:
        """Whether a COPY_CALL copy covers any of the range (a change must let it save first)."""
        end = offset + length
        return any(c.offset < end and offset < c.offset + c.length for c in self.copies.values())

    def _hole_is_free(self, record: KernelRecord, offset: int, length: int) -> bool:
        """Whether granting a hole (writable) to `record` needs nothing from the others: no other
        ready kernel holds the range or is told copy=delay, and no copy covers it."""
        if self._copied(offset, length):
            return False
        for other in self.kernels.values():
            if other is not record and other.ready and (other.delayed_copies or other.pagemap.holds(offset, length)):
                return False
        return True

    def _supply_now(self, record: KernelRecord, offset: int, length: int, access: int, kind: int, started: float) -> None:
        """`_supply` for a request `_free_to_supply` allows, in the dispatching task: the read
        and the answer happen now.  What cannot (a hole that the others must give up first, a
        plain read_pages that returned an awaitable) goes on in a task, holding its places in
        line from now on."""
        try:
            data = self._read_now(kind, offset, length)
        except PagerError as error:
            self._cannot_supply(record, offset, length, error)
            return
        if data is not None and type(data) is not bytes and inspect.isawaitable(data):
            grant = self.grants.reserve(offset, length, exclusive=True)
            storage = self.sequencer.reserve(offset, length, exclusive=False)
            self._spawn(self._supply_rest, record, offset, length, access, grant, started, data, storage)
            return
        if data is not None and len(data) != length:
            self._cannot_supply(record, offset, length, _wrong_length(data, length))
            return
        if data is None and not access & VM_PROT_WRITE and not self._hole_is_free(record, offset, length):
            grant = self.grants.reserve(offset, length, exclusive=True)
            self._spawn(self._supply_rest, record, offset, length, access, grant, started, None, None)
            return
        self._answer(record, offset, length, access, data, started)

    def _read_now(self, kind: int, offset: int, length: int) -> Any:
        """The author's read_pages, run to its end here (`_read_kind` says it can), with the
        wrapper's rules (`_call`).  A plain read_pages may still return an awaitable."""
        read = self.callbacks.read_pages
        try:
            result = read(offset, length)
            if kind == _READ_NEVER_SUSPENDS:
                try:
                    result.send(None)
                except StopIteration as done:
                    result = done.value
                else:
                    result.close()
                    raise RuntimeError("read_pages suspended although its body has no await")
            if self.unstored and (result is None or type(result) is bytes):
                result = self._shown(offset, length, result)
            return result
        except PagerError:
            raise
        except Exception as error:
            raise self._callback_failed(read, error) from error

    async def _supply_rest(
        self, record: KernelRecord, offset: int, length: int, access: int, grant: Reservation, started: float, pending: Any, storage: Reservation | None
    ) -> None:
        """The rest of a `_supply_now` that had to wait: the read still under way (`pending`, in
        its place in the storage line), or a hole the others must give up first."""
        try:
            try:
                data = None
                if storage is not None:
                    async with storage:
                        data = self._shown(offset, length, await self._awaited(self.callbacks.read_pages, pending))
                await self._check_read(record, offset, length, access, data)
            except (PagerError, LockTimeout) as error:
                self._cannot_supply(record, offset, length, error)
                return
            self._answer(record, offset, length, access, data, started)
        finally:
            grant.release()

    async def _turn(self, grant: Reservation, queued: _Queued | None) -> _AtOnce | None:
        """Wait for the grant's turn in line (None when it has come).  If meanwhile the kernel
        is asked to flush some of these pages, it may need them to answer (its delayed copies
        take them first, or wait for this request's pages): they must not wait behind the grant
        that waits for that answer, and are served at once instead (the _AtOnce returned).
        `queued` is the request in `self._queued` (None for a kernel not told copy=delay),
        registered when it was dispatched (`_request_pages`); it leaves it here, however the
        wait ends (even cancelled before the task first ran: the cancel comes at the wait)."""
        if queued is None:
            await grant.__aenter__()
            return None
        try:
            with queued.scope:
                await grant.__aenter__()
        finally:
            self._queued.remove(queued)
        if queued.at_once is None:
            assert not queued.scope.cancelled_caught
            return None
        # The flush came while the grant waited (its cancel may even have come after the turn
        # had been given, too late to interrupt the wait): the pages it covers are served at
        # once, as the flush expects.
        grant.release()
        return queued.at_once

    async def _supply(
        self, record: KernelRecord, offset: int, length: int, access: int, grant: Reservation, started: float, queued: _Queued | None
    ) -> None:
        at_once = await self._turn(grant, queued)
        if at_once is not None:
            # The rest of the request takes a place in line again (or is served at once too,
            # where another flush of the kernel covers it now).
            for low, high in _gaps(offset, offset + length, [(at_once.start, at_once.end)]):
                self._request_pages(record, low, high - low, access)
            await self._supply_at_once(record, at_once)
            return
        try:
            if record.control.name not in self.kernels:
                return  # terminated meanwhile
            failure = self._refused_unlocks.pop((record.control.name, offset), None)
            try:
                if failure is not None:
                    raise failure
                await self._revoke(offset, length, access, keep=record)
                if access & VM_PROT_WRITE:
                    await self._preserve(offset, length, asking=record)
                data = await self._read(offset, length, but=record)
                await self._check_read(record, offset, length, access, data)
            except (PagerError, LockTimeout) as error:
                self._cannot_supply(record, offset, length, error)
                return
            self._answer(record, offset, length, access, data, started)
        finally:
            grant.release()

    async def _check_read(self, record: KernelRecord, offset: int, length: int, access: int, data: bytes | None) -> None:
        """What must follow read_pages before the answer: its length checked, and for a hole
        read for reading, the range made safe as for a write."""
        if data is not None and len(data) != length:
            raise _wrong_length(data, length)
        if data is None and not access & VM_PROT_WRITE:
            # A hole: data_unavailable leaves the zero-filled page writable in the kernel, so it
            # is granted as a write is: the other kernels give the range up (copy=delay
            # kernels' copies take the old pages) and the COPY_CALL copies save them first.
            await self._revoke(offset, length, VM_PROT_WRITE, keep=record)
            await self._preserve(offset, length, asking=record)

    def _refusing_writes(self) -> PagerError:
        cause = self.write_refusal
        assert cause is not None
        return PagerError(f"the store could not take the last page write ({cause}); no write access until a write or sync succeeds", cause.reason, cause.errno)

    def _cannot_supply(self, record: KernelRecord, offset: int, length: int, error: PagerError | LockTimeout) -> None:
        reason = error.reason if isinstance(error, PagerError) else KERN_MEMORY_FAILURE
        self.trace.line(f"{self.name} cannot supply {offset:#x}+{length} to {record.label}: {error}")
        self._send(record, m.MemoryObjectDataError(offset=offset, size=length, error_value=reason))

    def _answer(self, record: KernelRecord, offset: int, length: int, access: int, data: bytes | None, started: float) -> None:
        """Answer a data_request with what read_pages gave, and record the grant."""
        if record.control.name not in self.kernels:
            return  # terminated meanwhile
        outside = self.outside is not None and self.outside.may_hold(offset, length)
        if outside and data is None:
            # Linux may hold a copy of the range: no write access now (a data_unlock waits for
            # Linux to let go, `_unlock`), so the hole goes as zeros, write-locked.
            data = bytes(length)
        if data is None:
            # Zero-filled pages come unlocked (the protocol says so): the kernel may write them.
            sent = self._send(record, m.MemoryObjectDataUnavailable(offset=offset, size=length))
            if sent:
                record.pagemap.grant(offset, length, access | VM_PROT_WRITE)
                manager_lock = self._manager_lock(offset, length)
                if manager_lock:
                    self._send_lock(record, offset, length, manager_lock)
            granted = None  # as the pagemap says now (the lock may have been sent or not)
        else:
            lock_value = self._lock_value(offset, length, access) | (VM_PROT_WRITE if outside else VM_PROT_NONE)
            supply = m.MemoryObjectDataSupply(offset=offset, data=data, lock_value=lock_value, precious=self.precious, reply_to=None)
            sent = self._send(record, supply)
            granted = access & ~lock_value
            if sent:
                record.pagemap.grant(offset, length, granted, self.precious)
        if self.on_change is not None:
            if sent and granted is not None:
                writable = bool(granted & VM_PROT_WRITE)  # every page of the range has just got it
            else:
                writable = record.pagemap.any_writable(offset, length)
            if writable:
                self.on_change("write_granted", offset, length)
        self.stats.served(time.perf_counter() - started)

    def _at_once_start(self, record: KernelRecord, offset: int, length: int) -> _AtOnce:
        """A request of the kernel's is to be served at once (_supply_at_once), read-only.  From
        this moment: the pagemap records the pages, so a grant decided from now on asks this
        kernel; and every flush of the kernel over them that is on its way, or sent before they
        are, takes them back once answered (_lock_requests): they may reach the kernel after it
        has applied the flush (a fault that crossed it)."""
        record.pagemap.grant(offset, length, VM_PROT_READ & ~(VM_PROT_WRITE | self._manager_lock(offset, length)))
        served = _AtOnce(record, offset, offset + length)
        self._at_once.append(served)
        for wait in self._flushing(record, offset, length):
            wait.served.append(served)
        return served

    async def _supply_at_once(self, record: KernelRecord, served: _AtOnce) -> None:
        """Serve, out of the grants line, pages the kernel asked for while flushing them:
        read-only, as they are before the change that waits for the flush (`_at_once_start`
        has recorded them)."""
        offset, length = served.start, served.end - served.start
        try:
            try:
                # Only another kernel's changes on their way back matter: this kernel has none
                # here (it asks for the pages), and waiting for a kernel that merely flushes
                # could wait for one that waits for this very request.
                await self._wait_for_revocations(offset, length, but=record, returning_only=True)
                async with self.sequencer.reserve(offset, length, exclusive=False):
                    data = self._shown(offset, length, await self._call(self.callbacks.read_pages, offset, length))
                if data is not None and len(data) != length:
                    raise _wrong_length(data, length)
            except PagerError as error:
                self.trace.line(f"{self.name} cannot supply {offset:#x}+{length} to {record.label}: {error}")
                if self._send(record, m.MemoryObjectDataError(offset=offset, size=length, error_value=error.reason)):
                    record.pagemap.remove(offset, length)
                return
            if record.control.name not in self.kernels:
                return
            # A hole goes as zeros, write-locked: data_unavailable would make the page writable
            # in the kernel, out of line.  (Where a hole means "the shadow's page" instead, in
            # a copy or a temporary, the kernel asks only for pages the manager has.)
            data = data if data is not None else bytes(length)
            lock_value = VM_PROT_WRITE | self._manager_lock(offset, length)
            if self._send(record, m.MemoryObjectDataSupply(offset=offset, data=data, lock_value=lock_value, precious=False, reply_to=None)):
                # The kernel takes these pages after every flush sent before this supply: one
                # of those may have taken them out of the pagemap since `_at_once_start`, yet
                # the kernel holds them now.  Recorded again, so the flushes waiting for this
                # answer take them back (`_lock_requests`), and no later grant forgets to ask
                # this kernel first (it would unlock a page read before a change, and its
                # write-back would undo the change).
                page_size = record.page_size
                for page in range(offset - offset % page_size, offset + length, page_size):
                    if record.pagemap.get(page) is None:
                        record.pagemap.grant(page, page_size, VM_PROT_READ)
        finally:
            served.sent.set()
            self._at_once.remove(served)

    async def _read(self, offset: int, length: int, *, but: KernelRecord | None = None) -> bytes | None:
        """The author's read, after every return in flight for the range has been stored (but
        `but`'s: the kernel asking for the range has nothing of it to return)."""
        await self._wait_for_revocations(offset, length, but=but)
        async with self.sequencer.reserve(offset, length, exclusive=False):
            return self._shown(offset, length, await self._call(self.callbacks.read_pages, offset, length))

    def _shown(self, offset: int, length: int, data: bytes | None) -> bytes | None:
        """What the store gave for the range, with the returned bytes it could not take over it
        (a wrong-length answer is left for the caller to refuse)."""
        if not self.unstored or (data is not None and len(data) != length):
            return data
        return self.unstored.overlay(offset, length, data)

    async def _call(self, callback, *args):
        """An author's callback (its result awaited if it is awaitable: read_pages may be a plain
        function); anything it raises but PagerError is a bug in it, logged with its traceback
        and turned into a PagerError, so one bad callback fails one request instead of the
        pager."""
        try:
            result = callback(*args)
            if inspect.isawaitable(result):
                result = await result
            return result
        except PagerError:
            raise
        except Exception as error:
            raise self._callback_failed(callback, error) from error

    async def _awaited(self, callback, pending: Any) -> Any:
        """`_call` for a callback already called, whose result is `pending`, an awaitable."""
        try:
            return await pending
        except PagerError:
            raise
        except Exception as error:
            raise self._callback_failed(callback, error) from error

    def _callback_failed(self, callback, error: Exception) -> PagerError:
        name = getattr(callback, "__name__", None) or repr(callback)
        log.exception("pager %s: callback %s raised", self.name, name)
        return PagerError(f"{name} raised {type(error).__name__}: {error}", KERN_MEMORY_FAILURE)

    def _send_lock(self, record: KernelRecord, offset: int, length: int, lock_value: int) -> bool:
        """A lock request that only changes the lock (no return, no flush, no reply)."""
        message = m.MemoryObjectLockRequest(
            offset=offset, size=length, should_return=MEMORY_OBJECT_RETURN_NONE, should_flush=False, lock_value=lock_value, reply_to=None
        )
        if not self._send(record, message):
            return False
        record.pagemap.restrict(offset, length, lock_value)
        return True

    def _lock_value(self, offset: int, length: int, access: int) -> int:
        """What the kernel may not do with pages it asked `access` to."""
        lock_value = VM_PROT_NONE if access & VM_PROT_WRITE else VM_PROT_WRITE
        return lock_value | self._manager_lock(offset, length)

    def _lock_items(self, records: Iterable[KernelRecord], offset: int, length: int, lock_value: int) -> list[tuple[KernelRecord, int, int, int]]:
        """Lock requests putting `lock_value` on each kernel's pages of the range, plus the
        manager's own locks exactly where they are (a lock replaces the one before it)."""
        items = []
        for record in records:
            start, size = record.round(offset, length)
            cuts = {start, start + size}
            for lock_start, lock_length in self.manager_locks:
                low, rounded = record.round(lock_start, lock_length)
                cuts.update(edge for edge in (low, low + rounded) if start < edge < start + size)
            edges = sorted(cuts)
            for low, high in zip(edges, edges[1:]):
                items.append((record, low, high - low, lock_value | self._manager_lock(low, high - low)))
        return items

    def _manager_lock(self, offset: int, length: int) -> int:
        if not self.manager_locks:
            return VM_PROT_NONE
        lock = VM_PROT_NONE
        end = offset + length
        for (start, size), prot in self.manager_locks.items():
            if start < end and offset < start + size:
                lock |= prot
        return lock

    def _data_unlock(self, record: KernelRecord, message: m.MemoryObjectDataUnlock) -> None:
        if self._manager_lock(message.offset, message.length) & message.desired_access:
            record.pending_unlocks.append(message)
            self.trace.line(f"{self.name} holds unlock from {record.label}: range locked with 'lock'")
            return
        grant = self.grants.reserve(message.offset, message.length, exclusive=True)
        self._spawn(self._unlock, record, message, grant)

    async def _unlock(self, record: KernelRecord, message: m.MemoryObjectDataUnlock, grant: Reservation) -> None:
        offset, length, access = message.offset, message.length, message.desired_access
        if access & VM_PROT_WRITE and self.outside is not None:
            grant = await self._turn_with_no_outside_copies(grant, record.label, offset, length)
        async with grant:
            try:
                if access & VM_PROT_WRITE and self.write_refusal is not None:
                    raise self._refusing_writes()
                await self._call(self.callbacks.unlock_pages, offset, length, access)
                if record.control.name not in self.kernels:
                    return
                # Single writer: the others give the range up first (their changes come back).
                await self._revoke(offset, length, access, keep=record)
                if access & VM_PROT_WRITE:
                    await self._preserve(offset, length)
            except (PagerError, LockTimeout) as error:
                # As libpager does: the kernel drops the page, and the fault that asks for it
                # again gets memory_object_data_error, so the task hears of the refusal.
                self.trace.line(f"{self.name} refused unlock of {offset:#x}+{length} for {record.label}: {error}")
                self._refused_unlocks[(record.control.name, offset)] = error if isinstance(error, PagerError) else PagerError(str(error), KERN_MEMORY_FAILURE)
                flush = m.MemoryObjectLockRequest(
                    offset=offset, size=length, should_return=MEMORY_OBJECT_RETURN_DIRTY, should_flush=True, lock_value=VM_PROT_NONE, reply_to=None
                )
                if self._send(record, flush):
                    record.pagemap.remove(offset, length)
                return
            if record.control.name not in self.kernels:
                return
            # Run by run, the kernel keeps whatever write access it already had (its changes
            # must not look clean); if it lost the pages meanwhile, this changes nothing there
            # and its fault comes back as a data_request.
            runs = [(o, n, a) for o, n, a, _ in record.pagemap.ranges() if o < offset + length and offset < o + n] or [(offset, length, VM_PROT_READ)]
            for run_offset, run_length, held in runs:
                low, high = max(offset, run_offset), min(offset + length, run_offset + run_length)
                wanted = access | (held & VM_PROT_WRITE)
                lock_value = self._lock_value(low, high - low, wanted)
                unlock = m.MemoryObjectLockRequest(
                    offset=low, size=high - low, should_return=MEMORY_OBJECT_RETURN_NONE, should_flush=False, lock_value=lock_value, reply_to=None
                )
                if not self._send(record, unlock):
                    return
                record.pagemap.set_access(low, high - low, wanted & ~lock_value)
                if wanted & ~lock_value & VM_PROT_WRITE:
                    self._changed_data("write_granted", low, high - low)

    async def _turn_with_no_outside_copies(self, grant: Reservation, writer: str, offset: int, length: int) -> Reservation:
        """The grant's turn in line (the reservation returned, entered), taken when no copy of
        the range is held outside the protocol (`self.outside`: Linux's page cache), so that a
        write grant made in that turn cannot be undone by an older copy written back later.

        Why one check suffices: copies outside are noted only by someone holding the range in
        the grants line (the mount's `read_through` and `write_through`) or at once, when nobody
        holds or waits for it; so while this grant holds its turn, none appears.  Why the turn
        is given up while the outside lets go: Linux writes its dirty pages back as writes of
        `data`, which wait for the range in this same line (`write_through`); holding the turn
        meanwhile would deadlock.  So: give up the place, wait for the release, take a new
        place at the back of the line, and check again (a copy may have been made meanwhile,
        by a read that came first: then again)."""
        outside = self.outside
        assert outside is not None
        while True:
            try:
                await grant.__aenter__()
            except BaseException:
                grant.release()
                raise
            if not outside.may_hold(offset, length):
                return grant
            grant.release()
            self.trace.line(f"{self.name}: {offset:#x}+{length} may be held outside the protocol (Linux's cache): it is released before {writer} may write")
            await outside.release(offset, length)
            grant = self.grants.reserve(offset, length, exclusive=True)

    def _data_return(self, record: KernelRecord, message: m.MemoryObjectDataReturn) -> None:
        length = len(message.data)
        if not message.kernel_copy:
            record.pagemap.remove(message.offset, length)
        reservation = self.sequencer.reserve(message.offset, length, exclusive=True)
        self._spawn(self._write, record, message, reservation)

    async def _write(self, record: KernelRecord, message: m.MemoryObjectDataReturn, reservation) -> None:
        async with reservation:
            if message.dirty:
                try:
                    await self._call(self.callbacks.write_pages, message.offset, message.data)
                except PagerError as error:
                    # The kernel has let these bytes go: they stay here, shown on every read,
                    # until a sync stores them (or a later write replaces them).
                    self.unstored.keep(message.offset, message.data, record.page_size)
                    self.trace.line(
                        f"{self.name} could not store {message.offset:#x}+{len(message.data)} from {record.label}: {error}; "
                        f"kept in memory ({len(self.unstored)} bytes) until a sync stores it"
                    )
                    log.error("pager %s could not store returned data at %#x: %s", self.name, message.offset, error)
                    self.write_failures += 1
                    self.last_write_failure = self.write_refusal = error
                    self._changed_data("kept", message.offset, len(message.data))
                else:
                    self.write_refusal = None
                    if self.unstored:
                        self.unstored.discard(message.offset, len(message.data))
                    self._changed_data("stored", message.offset, len(message.data))
            if not message.kernel_copy:
                try:
                    await self._call(self.callbacks.pages_evicted, message.offset, len(message.data))
                except PagerError as error:
                    self.trace.line(f"{self.name} pages_evicted failed: {error}")

    def _lock_completed(self, record: KernelRecord, message: m.MemoryObjectLockCompleted) -> None:
        waits = self._lock_waits.get(record.control.name)
        if not waits:
            self._refuse(f"lock_completed from {record.label} that no lock request awaits")
            return
        wait = waits.popleft()
        # The returns the lock request caused came before this message: let their writes finish.
        reservation = self.sequencer.reserve(wait.offset, wait.length, exclusive=True)
        self._spawn(self._complete_lock, wait, reservation)

    async def _complete_lock(self, wait: _LockWait, reservation) -> None:
        async with reservation:
            wait.done.set()

    def adopt(self, create: m.MemoryObjectCreate) -> KernelRecord:
        """A kernel handed this (default manager's) object over with memory_object_create: it
        counts as initialized and ready, with no memory_object_ready (the kernel assumes it)."""
        record = KernelRecord(
            host=create.new_control.host or f"kernel{create.new_control.name}",
            label=create.new_control.host or f"kernel{create.new_control.name}",
            control=create.new_control,
            name=create.new_name,
            page_size=create.new_page_size,
            pagemap=Pagemap(create.new_page_size),
            ready=True,
            copy_strategy=self.copy_strategy,
        )
        self.kernels[create.new_control.name] = record
        self._watch(record)
        self._changed.unpark_all()
        return record

    def _data_initialize(self, record: KernelRecord, message: m.MemoryObjectDataInitialize) -> None:
        """First data of a kernel-created object: stored unless data is there already."""
        record.pagemap.remove(message.offset, len(message.data))
        reservation = self.sequencer.reserve(message.offset, len(message.data), exclusive=True)
        self._spawn(self._initialize, record, message, reservation)

    async def _initialize(self, record: KernelRecord, message: m.MemoryObjectDataInitialize, reservation: Reservation) -> None:
        async with reservation:
            try:
                await self._call(self.callbacks.initialize_pages, message.offset, message.data)
            except PagerError as error:
                await self._keep_initial(record, message, error)
            else:
                self._changed_data("stored", message.offset, len(message.data))

    async def _keep_initial(self, record: KernelRecord, message: m.MemoryObjectDataInitialize, error: PagerError) -> None:
        """initialize_pages failed (a full disk): as for a failed write, the kernel has let the
        data go, so the pages that have none yet keep it here (`unstored`); where data is there
        already, the initial data was to be ignored anyway."""
        kept = 0
        page_size = record.page_size
        for index in range(0, len(message.data), page_size):
            offset = message.offset + index
            if self.unstored.overlaps(offset, page_size):
                continue  # a return kept earlier: newer than initial data
            try:
                there = await self._call(self.callbacks.read_pages, offset, page_size)
            except PagerError:
                there = None  # cannot tell: keeping it loses nothing, dropping it might
            if there is None:
                self.unstored.keep(offset, message.data[index : index + page_size], page_size)
                kept += page_size
        self.write_failures += 1
        self.last_write_failure = self.write_refusal = error
        self.trace.line(
            f"{self.name} could not store initial data at {message.offset:#x}+{len(message.data)} from {record.label}: {error}; "
            f"{kept} bytes kept in memory ({len(self.unstored)} in all) until a sync stores them"
        )
        log.error("pager %s could not store initial data at %#x: %s", self.name, message.offset, error)
        if kept:
            self._changed_data("kept", message.offset, len(message.data))

    def _terminate(self, record: KernelRecord, message: m.MemoryObjectTerminate) -> None:
        self._forget(record)
        message.control.destroy()
        message.name.destroy()

    def _forget(self, record: KernelRecord) -> None:
        if self.kernels.pop(record.control.name, None) is None:
            return
        for wait in self._lock_waits.pop(record.control.name, ()):
            wait.done.set()
        self._changed.unpark_all()
        if not self.kernels and self.on_end is not None:
            self.on_end()

    # -- COPY_CALL copies -------------------------------------------------------------------

    def _copy(self, record: KernelRecord, message: m.MemoryObjectCopy) -> None:
        grant = self.grants.reserve(message.offset, message.length, exclusive=True)
        self._spawn(self._make_copy, record, message, grant)

    async def _make_copy(self, record: KernelRecord, message: m.MemoryObjectCopy, grant: Reservation) -> None:
        offset, length = message.offset, message.length
        async with grant:
            # Other kernels' changes are part of what was copied: they come back now, and the
            # pages go read-only, so any later change asks first (and the old page is saved).
            others = [r for r in self.kernels.values() if r is not record and r.ready and r.pagemap.writable(offset, length)]
            try:
                await self._lock_requests(self._lock_items(others, offset, length, VM_PROT_WRITE), MEMORY_OBJECT_RETURN_DIRTY, False)
            except LockTimeout as error:
                self.trace.line(f"{self.name} copy for {record.label}: {error}")
            copy = _Copy(next(_copy_ids), offset, length, record.page_size)
            try:
                copy.store = self.callbacks.copy_store(copy.id, length, record.page_size)
            except Exception as error:
                # The copy must be served all the same, or its task's first fault would wait
                # for ever: it keeps its pages in memory instead.
                log.exception("pager %s: copy_store raised for copy %d", self.name, copy.id)
                self.trace.line(f"{self.name}: copy_store raised {type(error).__name__}: {error}; copy {copy.id} keeps its pages in memory")
                copy.store = MemoryCopyStore(record.page_size)
            copy.pager = Pager(
                _CopyCallbacks(self, copy),
                name=f"{self.name}~{copy.id}",
                copy_strategy=MEMORY_OBJECT_COPY_DELAY,
                notify_on_evict=self.notify_on_evict,
                trace=self.trace,
                stats=self.stats,
                port=message.new_object,
            )
            copy.pager.on_end = lambda: self._copy_ended(copy)
            self.copies[copy.id] = copy
            self.trace.line(f"{self.name}: copy {copy.id} of {offset:#x}+{length} for {record.label}, served as {copy.pager.name}")
            assert self._nursery is not None
            await self._nursery.start(copy.pager.serve)
        self._changed.unpark_all()

    def _copy_ended(self, copy: _Copy) -> None:
        if self.copies.pop(copy.id, None) is None:
            return
        self.trace.line(f"{self.name}: copy {copy.id} ended")
        copy.pager.port.destroy()  # type: ignore[union-attr]
        copy.store.discard()  # type: ignore[union-attr]
        self._changed.unpark_all()

    async def _preserve(self, offset: int, length: int, *, asking: KernelRecord | None = None) -> None:
        """Before the range changes, every copy of it that has not saved its pages there yet
        saves them, as they are now (every kernel's changes brought back first).  `asking` is
        the kernel of a data_request for the range: it holds none of it, so it has no changes
        there to bring back (and it may be busy flushing, waiting for this very request)."""
        end = offset + length
        for copy in [c for c in self.copies.values() if c.offset < end and offset < c.offset + c.length]:
            page_size = copy.page_size
            low = max(offset, copy.offset)
            low -= (low - copy.offset) % page_size
            high = min(end, copy.offset + copy.length)
            missing = [o for o in range(low, high, page_size) if o - copy.offset not in copy.store.held]  # type: ignore[union-attr]
            if not missing:
                continue
            writers = [r for r in self.kernels.values() if r.ready and r is not asking and r.pagemap.writable(low, high - low)]
            await self._lock_requests(self._lock_items(writers, low, high - low, VM_PROT_WRITE), MEMORY_OBJECT_RETURN_DIRTY, False)
            for page_offset in missing:
                data = await self._read(page_offset, page_size, but=asking)
                await self._save(copy, page_offset - copy.offset, data if data is not None else bytes(page_size))
            self.trace.line(f"{self.name}: copy {copy.id} saved {len(missing)} page(s) from {low:#x} before they change")

    async def _save(self, copy: _Copy, offset: int, data: bytes) -> None:
        """Write an old page to the copy's store.  Anything the store raises fails the change
        that needed the save, as a PagerError (an OSError on a full disk, say): the change must
        get its answer, never wait for ever."""
        try:
            await copy.store.write(offset, data)  # type: ignore[union-attr]
        except PagerError:
            raise
        except Exception as error:
            log.exception("pager %s: copy %d could not save the page at %#x", self.name, copy.id, offset)
            raise PagerError(f"copy {copy.id} cannot save its old page at {offset:#x}: {type(error).__name__}: {error}", KERN_MEMORY_FAILURE) from error

    # -- verbs -------------------------------------------------------------------------------

    def ready(self, record: KernelRecord, may_cache: bool, copy_strategy: int) -> None:
        """memory_object_ready for one kernel (automatic, or the shell writing `ready`)."""
        record.may_cache = may_cache
        record.tell_copy_strategy(copy_strategy)
        if self._send(record, m.MemoryObjectReady(may_cache=may_cache, copy_strategy=copy_strategy)):
            record.ready = True
            self._changed.unpark_all()

    async def _lock_request(
        self,
        records: Iterable[KernelRecord],
        offset: int,
        length: int,
        should_return: int,
        should_flush: bool,
        lock_value: int,
    ) -> None:
        """memory_object_lock_request to each kernel over its pages of the range; wait for every
        lock_completed and for the writes of what came back."""
        items = [(record, *record.round(offset, length), lock_value) for record in records]
        await self._lock_requests(items, should_return, should_flush)

    async def _lock_requests(
        self, items: list[tuple[KernelRecord, int, int, int]], should_return: int, should_flush: bool, *, lock_timeout: float = LOCK_TIMEOUT
    ) -> None:
        """Send each (kernel, offset, size, lock_value) lock request, then wait for them all.

        While data may be on its way back, the kernel's range is marked as being revoked: a read
        of the store over it (by anyone) waits until the data has landed.  A kernel that does
        not answer within `lock_timeout` raises LockTimeout (a dead kernel's waits just end)."""
        waits = []
        for record, start, size, lock_value in items:
            wait = _LockWait(start, size, flush=should_flush, lock_value=lock_value, should_return=should_return)
            changing = _merge((page, page + record.page_size) for page in record.pagemap.writable(start, size))
            message = m.MemoryObjectLockRequest(
                offset=start,
                size=size,
                should_return=should_return,
                should_flush=should_flush,
                lock_value=lock_value,
                reply_to=self.port.make_send(),
            )
            self._lock_waits.setdefault(record.control.name, deque()).append(wait)
            if not self._send(record, message):
                continue
            if should_flush:
                record.pagemap.remove(start, size)
                # Requests of this kernel's for these pages may be what it needs to answer:
                # those waiting in line are served at once (_turn), and those being served at
                # once now are taken back after the answer, if they came in after the flush.
                for queued in self._queued:
                    if queued.kernel is record and queued.start < start + size and start < queued.end and queued.at_once is None:
                        queued.scope.cancel()
                        low, high = max(start, queued.start), min(start + size, queued.end)
                        queued.at_once = self._at_once_start(record, low, high - low)
                wait.served = [s for s in self._at_once if s.kernel is record and s.start < start + size and start < s.end]
            else:
                record.pagemap.restrict(start, size, lock_value)
            if should_return != MEMORY_OBJECT_RETURN_NONE:
                revocation = _Revocation(start, start + size, wait.done, record, changing)
                self.revoking.append(revocation)
                wait.revocation = revocation
            waits.append((record, wait))
        silent = []
        for record, wait in waits:
            with trio.move_on_after(lock_timeout) as scope:
                await wait.done.wait()
            if scope.cancelled_caught:
                self.trace.line(f"{self.name} gave up waiting for lock_completed from {record.label}")
                silent.append(record.label)
                wait.done.set()
            if wait.revocation is not None and wait.revocation in self.revoking:
                self.revoking.remove(wait.revocation)
        if silent:
            raise LockTimeout(f"no memory_object_lock_completed from {', '.join(silent)} within {lock_timeout:.0f} s")
        # Pages served at once to a kernel while it flushed them (_supply_at_once) may have come
        # in after the flush: the same request takes them back, so the range is gone from the
        # kernel when this returns, as the caller expects.
        again = []
        for record, wait in waits:
            for served in wait.served:
                await served.sent.wait()
                low, high = max(wait.offset, served.start), min(wait.offset + wait.length, served.end)
                if record.control.name in self.kernels and record.pagemap.held(low, high - low):
                    again.append((record, low, high - low, wait.lock_value))
        if again:
            await self._lock_requests(again, should_return, should_flush, lock_timeout=lock_timeout)

    def _lock_runs(self, record: KernelRecord, offset: int, length: int, lock_value: int) -> list[tuple[KernelRecord, int, int, int]]:
        """Lock requests that add `lock_value` to what a kernel holds of the range, run by run:
        locks replace each other in the kernel, so a page it may only read keeps its write lock."""
        start, size = record.round(offset, length)
        end = start + size
        items = []
        for run_offset, run_length, access, _ in record.pagemap.ranges():
            low, high = max(start, run_offset), min(end, run_offset + run_length)
            if low < high:
                keep = VM_PROT_NONE if access & VM_PROT_WRITE else VM_PROT_WRITE
                items.append((record, low, high - low, lock_value | keep))
        return items

    async def _wait_for_revocations(
        self, offset: int, length: int, *, but: KernelRecord | None = None, returning_only: bool = False
    ) -> None:
        """Until no data is on its way back over the range: from any kernel but `but`, and
        with `returning_only`, only where a kernel may have changed it."""
        end = offset + length

        def overlaps(revocation: _Revocation) -> bool:
            runs = revocation.changing if returning_only else [(revocation.start, revocation.end)]
            return any(start < end and offset < stop for start, stop in runs)

        while True:
            pending = [r for r in self.revoking if r.kernel is not but and overlaps(r)]
            if not pending:
                return
            for revocation in pending:
                await revocation.done.wait()
                if revocation in self.revoking:
                    self.revoking.remove(revocation)

    async def _revoke(self, offset: int, length: int, access: int, *, keep: KernelRecord | None) -> None:
        """Make the range safe to grant `access` to `keep` (None: the mount): for a write, every
        other kernel gives up its pages of it; for a read, every other writer gives back its
        changes and keeps a read-only copy."""
        others = [r for r in self.kernels.values() if r is not keep and r.ready]
        if access & VM_PROT_WRITE:
            # A kernel told copy=delay (or copy=temporary, which it copies the same way) may hold
            # a delayed copy that reads the range through its pages, cached or not: it is asked
            # too, so the copy takes the old pages first.  A kernel with no copy answers at once.
            holders = [r for r in others if r.pagemap.held(offset, length) or r.delayed_copies]
            await self._lock_request(holders, offset, length, MEMORY_OBJECT_RETURN_DIRTY, True, VM_PROT_NONE)
        else:
            writers = [r for r in others if r.pagemap.writable(offset, length)]
            await self._lock_requests(self._lock_items(writers, offset, length, VM_PROT_WRITE), MEMORY_OBJECT_RETURN_DIRTY, False)

    def _changed_data(self, kind: str, offset: int, length: int) -> None:
        if self.on_change is not None:
            self.on_change(kind, offset, length)

    # -- the mount's reads and writes --------------------------------------------------------

    async def read_through(self, offset: int, length: int, read: Callable[[], Any] | None = None) -> bytes:
        """Run `read` (of the store, for the mount; it may be async) once every kernel has given
        back what it changed in the range: a read of `data` shows what the tasks wrote.  Without
        `read`, the author's read_pages gives the bytes (zeros where it has none)."""
        if read is None:
            read = functools.partial(self._read_or_zeros, offset, length)
        if not len(self.grants) and not len(self.sequencer) and not self.revoking and not any(
            record.pagemap.held(offset, length) for record in self.kernels.values()
        ):
            # Nobody holds or is moving this range: the store is the truth (with what it could
            # not take over it).
            return self._over_read(offset, await _result(read()))
        async with self.grants.reserve(offset, length, exclusive=False):
            await self._revoke(offset, length, VM_PROT_READ, keep=None)
            await self._wait_for_revocations(offset, length)
            async with self.sequencer.reserve(offset, length, exclusive=False):
                return self._over_read(offset, await _result(read()))

    def _over_read(self, offset: int, data: bytes) -> bytes:
        """The unstored bytes over a read of the mount's (which may end short, at the end of the
        data: kept bytes beyond it stay out, the file's size says where it ends)."""
        if not self.unstored or not data:
            return data
        return self.unstored.overlay(offset, len(data), data)  # type: ignore[return-value]

    async def _catch_up(self) -> None:
        """Until every message already queued on the object port has been taken and its state
        change applied (or the message refused): a write from the mount must not overtake, say,
        a memory_object_copy a kernel sent before it.  serve wakes it after every message."""
        while self.port.port.queued:
            await self._changed.park()

    async def _read_or_zeros(self, offset: int, length: int) -> bytes:
        data = await self._call(self.callbacks.read_pages, offset, length)
        return data if data is not None else bytes(length)

    async def copy_contents(self, copy_id: int, offset: int, length: int) -> bytes:
        """What copy `copy_id`'s task reads in [offset, offset+length) of the copy, whole pages:
        its own pages (the child's changes brought back first), else the original's."""
        copy = self.copies[copy_id]
        assert copy.pager is not None and copy.store is not None

        async def own_or_original() -> bytes:
            pieces = []
            for page_offset in range(offset, offset + length, copy.page_size):
                if page_offset in copy.store.held:  # type: ignore[union-attr]
                    pieces.append(await copy.store.read(page_offset, copy.page_size))  # type: ignore[union-attr]
                else:
                    pieces.append(await self.read_through(copy.offset + page_offset, copy.page_size))
            return b"".join(pieces)

        return await copy.pager.read_through(offset, length, own_or_original)

    async def write_through(self, offset: int, length: int, write: Callable[[], T], *, outside_first: bool = False) -> T:
        """Run `write` (of the store, for the mount) once every kernel has given up the range
        (its changes written first): afterwards every task sees the new bytes.  With
        `outside_first` (a write that goes around the copies held outside the protocol: the
        mount's direct writes, which Linux's cache does not see), those copies are released
        first, as for a kernel's write grant, so none older than the write is written back
        over it later."""
        await self._catch_up()
        grant = self.grants.reserve(offset, length, exclusive=True)
        if outside_first and self.outside is not None:
            grant = await self._turn_with_no_outside_copies(grant, "a write around Linux's cache", offset, length)
        async with grant:
            await self._revoke(offset, length, VM_PROT_WRITE, keep=None)
            await self._preserve(offset, length)
            await self._wait_for_revocations(offset, length)
            async with self.sequencer.reserve(offset, length, exclusive=True):
                result = write()
                self.write_refusal = None  # the store took a write: kernels may write again
                self.unstored.discard(offset, length)  # older than what the store has now
                return result

    def _holding(self, offset: int, length: int, *, writable_only: bool) -> list[KernelRecord]:
        records = []
        for record in self.kernels.values():
            if not record.ready:
                continue
            held = record.pagemap.writable(offset, length) if writable_only else record.pagemap.held(offset, length)
            if held:
                records.append(record)
        return records

    async def sync(self, offset: int = 0, length: int | None = None) -> None:
        """Bring back every change kernels hold in the range (they keep read-only copies) and
        store it, with what the store could not take before.  Raises PagerError if some of it
        still cannot be stored (it stays in memory, shown on reads: nothing is lost)."""
        length = await self._length(offset, length)
        items = self._lock_items(self._holding(offset, length, writable_only=True), offset, length, VM_PROT_WRITE)
        await self._lock_requests(items, MEMORY_OBJECT_RETURN_DIRTY, False)
        await self._store_unstored(offset, length)
        if self.unstored.overlaps(offset, length):
            last = self.last_write_failure
            assert last is not None
            raise PagerError(f"{len(self.unstored)} returned bytes still cannot be stored (kept in memory): {last}", last.reason, last.errno)
        if not self.unstored:
            self.write_refusal = None  # whatever had to be stored was: kernels may write again

    async def sync_every_kernel(self, within: trio.CancelScope) -> list[tuple[str, list[int], int]]:
        """At unmount: every ready kernel returns its changes, as with `sync` over the whole
        object, but asked of every kernel, not only of those holding pages writable: its answer
        also means whatever it returned of its own accord before (pages kept from a lost
        manager) has arrived.  Kernels that have not answered when `within` (a cancel scope
        entered here: its deadline, or a cancel: no LOCK_TIMEOUT here) ends the wait are not
        waited for any more (their requests count as answered; what they return while their
        connection lasts is still taken).  Returns each one's label with the pages it held
        writable (it may have changed them) and its page size, for the caller to report."""
        records = [record for record in self.kernels.values() if record.ready]
        if not records:
            return []
        length = await self._length(0, None)
        writable = {record.label: record.pagemap.writable() for record in records}
        # Answers are matched to requests in order (_lock_completed): a kernel that answered
        # all of these has as many requests in line afterwards as before them.
        waiting_before = {record.label: len(self._lock_waits.get(record.control.name, ())) for record in records}
        with within:
            try:
                await self._lock_requests(
                    self._lock_items(records, 0, length, VM_PROT_WRITE), MEMORY_OBJECT_RETURN_DIRTY, False, lock_timeout=float("inf")
                )
            except LockTimeout:
                pass  # (not raised without a lock timeout; those that did not answer are named below)
        silent = [
            record
            for record in records
            if record.control.name in self.kernels and len(self._lock_waits.get(record.control.name, ())) > waiting_before[record.label]
        ]
        for record in silent:
            self.trace.line(f"{self.name} gave up waiting for {record.label} to return its changes")
            for wait in self._lock_waits.get(record.control.name, ()):
                wait.done.set()  # left in line: a late lock_completed still finds its request
        return [(record.label, writable[record.label], record.page_size) for record in silent]

    async def _store_unstored(self, offset: int, length: int | None) -> None:
        """Try again to store the kept bytes that overlap the range, whole pages at a time (the
        rest of a page read from the store), each in its place in the storage line."""
        for low, size in list(self.unstored.pages(offset, length)):
            async with self.sequencer.reserve(low, size, exclusive=True):
                if not self.unstored.overlaps(low, size):
                    continue  # a newer write replaced it meanwhile
                try:
                    base = await self._call(self.callbacks.read_pages, low, size)
                    if base is not None and len(base) != size:
                        raise _wrong_length(base, size)
                    await self._call(self.callbacks.write_pages, low, self.unstored.overlay(low, size, base))
                except PagerError as error:
                    self.last_write_failure = self.write_refusal = error
                    self.trace.line(f"{self.name} still cannot store {low:#x}+{size}: {error}")
                    continue
                self.unstored.discard(low, size)
                self.trace.line(f"{self.name} stored {low:#x}+{size}, kept in memory since a write failed")
                self._changed_data("stored", low, size)

    async def flush(self, offset: int = 0, length: int | None = None) -> None:
        """Changes come back and every kernel drops the range."""
        length = await self._length(offset, length)
        await self._lock_request(
            self._holding(offset, length, writable_only=False), offset, length, MEMORY_OBJECT_RETURN_DIRTY, True, VM_PROT_NONE
        )

    async def return_(self, offset: int = 0, length: int | None = None) -> None:
        """As flush, and precious pages come back too."""
        length = await self._length(offset, length)
        await self._lock_request(
            self._holding(offset, length, writable_only=False), offset, length, MEMORY_OBJECT_RETURN_ALL, True, VM_PROT_NONE
        )

    async def lock(self, offset: int, length: int, lock_value: int) -> None:
        """Forbid `lock_value` accesses to the range in every kernel until lifted with
        VM_PROT_NONE; a kernel that wants them waits (its data_unlock is held)."""
        self.manager_locks.pop((offset, length), None)
        if lock_value:
            self.manager_locks[(offset, length)] = lock_value
        should_return = MEMORY_OBJECT_RETURN_DIRTY if lock_value & VM_PROT_WRITE else MEMORY_OBJECT_RETURN_NONE
        if lock_value:
            async with self.grants.reserve(offset, length, exclusive=True):
                items = [item for record in self._holding(offset, length, writable_only=False) for item in self._lock_runs(record, offset, length, lock_value)]
                await self._lock_requests(items, should_return, False)
        for record in list(self.kernels.values()):
            held, record.pending_unlocks = record.pending_unlocks, []
            for unlock in held:
                self._data_unlock(record, unlock)

    def locks(self) -> list[LockState]:
        """The manager's locks (`lock`), the lock requests kernels have not answered yet, and
        the data_unlocks held by a manager lock, in that order (what the mount's `locks` shows)."""
        found = [LockState("manager", offset, length, prot) for (offset, length), prot in sorted(self.manager_locks.items())]
        now = time.monotonic()
        for control, waits in self._lock_waits.items():
            record = self.kernels.get(control)
            label = record.label if record is not None else str(control)
            for wait in waits:
                if not wait.done.is_set():
                    found.append(
                        LockState("request", wait.offset, wait.length, wait.lock_value, label, wait.flush, wait.should_return, now - wait.started)
                    )
        for record in self.kernels.values():
            for unlock in record.pending_unlocks:
                found.append(LockState("unlock", unlock.offset, unlock.length, unlock.desired_access, record.label))
        return found

    async def change_attributes(self, may_cache: bool, copy_strategy: int) -> None:
        """New attributes for later kernels and, with memory_object_change_attributes, for every
        kernel now; waits for each change_completed."""
        self.may_cache = may_cache
        self.copy_strategy = copy_strategy
        replies = []
        for record in [r for r in self.kernels.values() if r.ready]:
            reply = port_allocate(f"change_attributes reply {self.name}")
            message = m.MemoryObjectChangeAttributes(may_cache=may_cache, copy_strategy=copy_strategy, reply_to=reply.make_send_once())
            if self._send(record, message):
                record.may_cache = may_cache
                record.tell_copy_strategy(copy_strategy)
                replies.append((record, reply))
            else:
                reply.destroy()
        silent = []
        for record, reply in replies:
            with trio.move_on_after(LOCK_TIMEOUT) as scope:
                completed = await reply.receive()
                self.stats.received(completed.message)
                self.trace.message(record.label, self.name, completed.message)
            if scope.cancelled_caught:
                self.trace.line(f"{self.name} gave up waiting for change_completed from {record.label}")
                silent.append(record.label)
            reply.destroy()
        if silent:
            raise LockTimeout(f"no memory_object_change_completed from {', '.join(silent)} within {LOCK_TIMEOUT:.0f} s")

    async def offer_page(self, offset: int, data: bytes, *, precious: bool = False) -> int:
        """Supply data no kernel asked for, read-only, to every ready kernel whose pages it fits
        and that holds none of the range yet (a kernel ignores data it already holds); a writer
        elsewhere gives back its changes first.  Returns how many kernels got it."""
        length = len(data)
        offered = 0
        async with self.grants.reserve(offset, length, exclusive=False):
            await self._revoke(offset, length, VM_PROT_READ, keep=None)
            lock_value = VM_PROT_WRITE | self._manager_lock(offset, length)
            for record in [r for r in self.kernels.values() if r.ready]:
                if offset % record.page_size or length % record.page_size or record.pagemap.held(offset, length):
                    continue
                supply = m.MemoryObjectDataSupply(offset=offset, data=bytes(data), lock_value=lock_value, precious=precious, reply_to=None)
                if self._send(record, supply):
                    record.pagemap.grant(offset, length, VM_PROT_READ & ~lock_value, precious)
                    offered += 1
        return offered

    def destroy(self, reason: int) -> None:
        """memory_object_destroy at every kernel: their cached data is dropped, faults fail."""
        for record in list(self.kernels.values()):
            self._send(record, m.MemoryObjectDestroy(reason=reason))

    async def shutdown(self) -> None:
        """Bring everything back, tell every kernel to let go, and wait for their terminates."""
        try:
            await self.return_()
        except LockTimeout as error:
            # A kernel that does not answer is told to let go all the same.
            self.trace.line(f"{self.name} shutdown: {error}")
        await self.store_unstored()
        self.destroy(KERN_MEMORY_ERROR)
        with trio.move_on_after(LOCK_TIMEOUT):
            while self.kernels:
                await self._changed.park()

    async def store_unstored(self) -> int:
        """Before the pager goes: a last try to store what a failed write left in memory.
        Returns how many bytes are lost (traced and logged as such)."""
        await self._store_unstored(0, None)
        lost = len(self.unstored)
        if lost:
            self.trace.line(f"{self.name} LOST {lost} returned bytes the store could not take: {self.last_write_failure}")
            log.error("pager %s: %d returned bytes could not be stored and are lost", self.name, lost)
        return lost

    async def wait_for_change(self) -> None:
        """Until the pager handles another message (for watchers such as the mount)."""
        await self._changed.park()

    async def _length(self, offset: int, length: int | None) -> int:
        """`length`, or all of the object from `offset`: its extent or what kernels hold."""
        if length is not None:
            return length
        end = max([await self.callbacks.report_extent(), self.unstored.end()] + [r.pagemap.end() for r in self.kernels.values()])
        return max(0, end - offset)


_copy_ids = itertools.count(1)

_READ_IN_TASK, _READ_PLAIN, _READ_NEVER_SUSPENDS = range(3)


def _read_kind(function: Any) -> int:
    """How a read_pages function can run (Pager._read_kind)."""
    if not inspect.iscoroutinefunction(function):
        return _READ_PLAIN if callable(function) else _READ_IN_TASK
    code = getattr(function, "__code__", None)
    if not isinstance(code, types.CodeType):
        return _READ_IN_TASK
    # A coroutine suspends only at a yield of its own frame (every await, async for and async
    # with is one); with none in its code, it runs to its end the first time it is sent None.
    if any(instruction.opname in ("YIELD_VALUE", "YIELD_FROM") for instruction in dis.get_instructions(code)):
        return _READ_IN_TASK
    return _READ_NEVER_SUSPENDS


def _wrong_length(data: bytes, length: int) -> PagerError:
    return PagerError(f"read_pages returned {len(data)} bytes for {length}", KERN_MEMORY_FAILURE)


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) ranges as sorted runs, overlapping or adjacent ones merged."""
    runs: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if runs and start <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((start, end))
    return runs


def _gaps(start: int, end: int, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [start, end) outside sorted, disjoint `runs`."""
    gaps = []
    for low, high in runs:
        if start < low:
            gaps.append((start, min(low, end)))
        start = max(start, high)
    if start < end:
        gaps.append((start, end))
    return gaps


async def _result(value: Any) -> Any:
    """A callable's result, awaited if it is a coroutine (read_through takes either kind)."""
    return await value if inspect.isawaitable(value) else value


@dataclass(eq=False)
class _Copy:
    """A COPY_CALL copy of [offset, offset+length) of an object, in pages of `page_size`."""

    id: int
    offset: int
    length: int
    page_size: int
    store: CopyStore | None = None
    pager: Pager | None = None


class _CopyCallbacks(PagerCallbacks):
    """How a copy object is served: its own pages from its store, the others from the original
    (they have not changed since the copy: a change saves them first)."""

    def __init__(self, original: Pager, copy: _Copy) -> None:
        self.original = original
        self.copy = copy

    async def read_pages(self, offset: int, length: int) -> bytes:
        store = self.copy.store
        assert store is not None
        page_size = self.copy.page_size
        pieces = []
        for page_offset in range(offset, offset + length, page_size):
            if page_offset in store.held:
                pieces.append(await store.read(page_offset, page_size))
            else:
                # As the original is now (every kernel's changes brought back first: the
                # copying kernel's own changes before the copy are part of it).
                pieces.append(await self.original.read_through(self.copy.offset + page_offset, page_size))
        return b"".join(pieces)

    async def write_pages(self, offset: int, data: bytes) -> None:
        assert self.copy.store is not None
        await self.copy.store.write(offset, data)

    async def report_extent(self) -> int:
        return self.copy.length

"""The engine and the kernel's copy code where events cross: a fault while the engine waits for
its kernel, holes and copies, a fork while a page is on its way, copy=temporary, a refused
message during write_through, a copy store that fails.

Each test orders its events with gates (trio.Event) and trio.testing.wait_all_tasks_blocked,
never with time: with the `mock_clock` fixture time stands still, so a wait that only a timeout
would end (LOCK_TIMEOUT) shows as tasks still waiting once every task is blocked, and the test
fails instead of hanging."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import kernelsim
from fusepager.copies import MemoryCopyStore
from fusepager.pager import Pager, PagerCallbacks
from kernelsim import messages as m
from kernelsim.interface import (
    KERN_MEMORY_FAILURE,
    MEMORY_OBJECT_COPY_CALL,
    MEMORY_OBJECT_COPY_DELAY,
    MEMORY_OBJECT_COPY_NONE,
    MEMORY_OBJECT_COPY_TEMPORARY,
    VM_PROT_READ,
    VM_PROT_WRITE,
    KernMemoryError,
)
from kernelsim.ipc_port import port_allocate
from test_pager import PAGE, MemoryObject, served


class Scene:
    """Tasks started in a nursery one after the other, each run until every task waits."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.started: list[str] = []
        self.results: dict[str, object] = {}  # what each finished task returned or raised

    async def start(self, name: str, async_fn, *args) -> None:
        async def run() -> None:
            try:
                self.results[name] = await async_fn(*args)
            except Exception as error:
                self.results[name] = error

        self.started.append(name)
        self.nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()

    async def settle(self) -> None:
        """Every task started has finished once every task is blocked (nothing waits for ever),
        and none raised."""
        await trio.testing.wait_all_tasks_blocked()
        waiting = [name for name in self.started if name not in self.results]
        assert not waiting, f"still waiting once every task is blocked: {waiting}"
        for result in self.results.values():
            if isinstance(result, Exception):
                raise result


async def settle(async_fn, *args):
    """Run async_fn(*args) until every task is blocked; it must have finished by then."""
    async with trio.open_nursery() as nursery:
        scene = Scene(nursery)
        await scene.start("call", async_fn, *args)
        done = "call" in scene.results
        if not done:
            nursery.cancel_scope.cancel()
    assert done, f"{getattr(async_fn, '__name__', async_fn)} still waits once every task is blocked"
    result = scene.results["call"]
    if isinstance(result, Exception):
        raise result
    return result


async def squeeze(task) -> None:
    """Memory pressure in the task's kernel (a few frames): its clean pages of mapped objects
    are dropped, and its precious ones returned."""
    anonymous = task.vm_allocate(16 * PAGE)
    for page in range(16):
        await task.read(anonymous + page * PAGE, 1)


async def mapped(kernel, pager: Pager, size: int):
    """A new task of the kernel's mapping the pager's object: (task, address)."""
    task = await kernel.task_create()
    return task, await task.vm_map(pager.send_right(), size)


def drop_clean_page(kernel, offset: int) -> None:
    """The kernel drops its clean page at `offset` of the mapped object without a word, as
    memory pressure would (and only that page)."""
    (page,) = [o.pages[offset] for o in kernel.objects.by_pager.values() if offset in o.pages]
    assert not page.dirty and not page.precious
    kernel.objects.free_page(page)


def record_of(pager: Pager, host: str):
    (record,) = [r for r in pager.kernels.values() if r.host == host]
    return record


def trace_of(pager: Pager) -> str:
    return pager.trace.read(0, 1 << 20).decode()


# -- 1. requests served out of the grants line -----------------------------------------------


class SlowDisk(MemoryObject):
    """write_pages waits for `write_gate` while it is set to an Event: a slow disk."""

    def __init__(self, size: int = 64 * PAGE) -> None:
        super().__init__(size)
        self.write_gate: trio.Event | None = None

    async def write_pages(self, offset, data):
        if self.write_gate is not None:
            await self.write_gate.wait()
        await super().write_pages(offset, data)


@pytest.mark.parametrize("strategy", [MEMORY_OBJECT_COPY_NONE, MEMORY_OBJECT_COPY_DELAY], ids=["none", "delay"])
async def test_a_fault_while_sync_waits_for_its_kernel_is_granted_in_line_and_recorded(mock_clock, strategy):
    store = SlowDisk()
    store.put(0, bytes(2 * PAGE))
    async with served(store, ("k1", PAGE, 32), ("k2", PAGE, 32), copy_strategy=strategy) as (pager, [(k1, t1, a1), (k2, t2, a2)]):
        await t1.write(a1, b"page 0")
        store.write_gate = trio.Event()
        async with trio.open_nursery() as nursery:
            scene = Scene(nursery)
            await scene.start("sync", pager.sync)  # page 0 comes back from k1; storing it is slow
            await scene.start("write", t1.write, a1 + PAGE, b"k1 wrote page 1")  # meanwhile k1 faults
            store.write_gate.set()
            await scene.settle()
        # The page was granted for writing and the engine knows it: k2's read cleans k1 first,
        # and sync brings the change back.
        grant = record_of(pager, "k1").pagemap.get(PAGE)
        assert grant is not None and grant.access == VM_PROT_READ | VM_PROT_WRITE
        assert await t2.read(a2 + PAGE, 15) == b"k1 wrote page 1"
        await t1.write(a1 + PAGE, b"K1 WROTE PAGE 1")
        await pager.sync()
        assert store.data[PAGE : PAGE + 15] == b"K1 WROTE PAGE 1"


async def test_a_request_waiting_in_line_is_served_at_once_when_its_kernel_must_flush_the_page(mock_clock):
    """k1 (copy=delay) has a delayed copy lacking page 0 and no longer caches it.  Its read of
    page 0 waits in line behind k2's write grant; that grant flushes k1, whose copy must take
    page 0 first and so waits for k1's own request: the request is served at once, and taken
    back before k2 gets the page."""
    store = MemoryObject(2 * PAGE)
    store.put(0, b"old".ljust(2 * PAGE, b"\0"))
    specs = ("k1", PAGE, 4), ("k2", PAGE, 32), ("k3", PAGE, 32)
    async with served(store, *specs) as (pager, [(k1, t1, a1), (k2, t2, a2), (k3, t3, a3)]):
        await t1.read(a1, 1)
        child = await k1.task_create(t1)  # a delayed copy of the object
        await squeeze(t1)  # k1's pages of the object are dropped; the copy has none of its own
        store.read_gate = trio.Event()
        async with trio.open_nursery() as nursery:
            scene = Scene(nursery)
            await scene.start("k3 reads", t3.read, a3, 3)  # its grant waits in read_pages
            await scene.start("k2 writes", t2.write, a2, b"NEW")  # waits behind k3's
            await scene.start("k1 reads", t1.read, a1, 3)  # waits behind k2's
            store.read_gate.set()
            await scene.settle()
        assert scene.results["k1 reads"] in (b"old", b"NEW")  # k1's read and k2's write crossed
        assert "gave up waiting" not in trace_of(pager)
        assert await child.read(a1, 3) == b"old"
        # k1 holds nothing k2 may write: it reads k2's write
        assert await t1.read(a1, 3) == b"NEW"


async def test_a_request_dispatched_just_before_a_flush_of_its_kernel_is_served_at_once(mock_clock):
    """As above, but k1's request for page 0 is dispatched in the same stretch as the flush of
    k1, just before it: the request has its place in line behind k2's grant, which sends the
    flush, and its task has not run yet.  The flush must still find it and serve it at once,
    or k2's grant waits for k1, k1 for its request, and the request for k2's grant."""
    store = MemoryObject(2 * PAGE)
    store.put(0, b"old".ljust(2 * PAGE, b"\0"))
    async with served(store, ("k1", PAGE, 4), ("k2", PAGE, 32)) as (pager, [(k1, t1, a1), (_, t2, a2)]):
        await t1.read(a1, 1)
        child = await k1.task_create(t1)  # a delayed copy of the object
        await squeeze(t1)  # k1's pages of the object are dropped; the copy has none of its own
        record = record_of(pager, "k1")
        request_pages, lock_requests = pager._request_pages, pager._lock_requests
        held: list[tuple] = []
        released: list[tuple] = []

        def hold_k1s_request(kernel, offset, length, access) -> None:
            # k1's next request is held back as it is dispatched ...
            if kernel is record and not held:
                held.append((kernel, offset, length, access))
                return
            request_pages(kernel, offset, length, access)

        def dispatch_it_then_flush(items, should_return, should_flush, **options):
            # ... and handed to the engine right before the flush of k1 is sent, in the flushing
            # task, with no checkpoint between: the request's task cannot have run.  (Before
            # the flush is registered, too: a request dispatched after that is served at once
            # by _request_pages itself.)
            if should_flush and held and not released and any(item[0] is record for item in items):
                released.append(held[0])
                request_pages(*held[0])
            return lock_requests(items, should_return, should_flush, **options)

        pager._request_pages = hold_k1s_request
        pager._lock_requests = dispatch_it_then_flush
        async with trio.open_nursery() as nursery:
            scene = Scene(nursery)
            await scene.start("k1 reads", t1.read, a1, 3)  # its request is held
            assert held and held[0][1] == 0 and not released
            await scene.start("k2 writes", t2.write, a2, b"NEW")  # its grant flushes k1
            await scene.settle()
        assert released, "the flush of k1 never came"
        assert not pager._queued  # the request left the queue the flushes look in
        assert scene.results["k1 reads"] in (b"old", b"NEW")  # k1's read and k2's write crossed
        assert "gave up waiting" not in trace_of(pager)
        assert await child.read(a1, 3) == b"old"
        # k1 holds nothing k2 may write: it reads k2's write
        assert await t1.read(a1, 3) == b"NEW"


async def test_two_kernels_whose_copies_need_the_same_page_do_not_wait_for_each_other(mock_clock):
    store = MemoryObject(2 * PAGE)
    store.put(0, b"old".ljust(2 * PAGE, b"\0"))
    async with served(store, ("k1", PAGE, 4), ("k3", PAGE, 4)) as (pager, [(k1, t1, a1), (k3, t3, a3)]):
        child1, child3 = await k1.task_create(t1), await k3.task_create(t3)
        await squeeze(t1)
        await squeeze(t3)

        def write() -> None:
            store.data[0:3] = b"NEW"

        # Both kernels are flushed, and each one's copy pages page 0 in again.
        await settle(pager.write_through, 0, 3, write)
        assert "gave up waiting" not in trace_of(pager)
        assert await child1.read(a1, 3) == b"old" and await child3.read(a3, 3) == b"old"
        assert await t1.read(a1, 3) == b"NEW" and await t3.read(a3, 3) == b"NEW"


async def test_kernels_whose_copies_need_a_page_wait_only_for_changes_to_that_page(mock_clock):
    """k1 and k3 each have a delayed copy lacking page 0, no longer cache page 0, and may have
    changed pages 1 and 2 respectively.  A write over pages 0-2 flushes both: each one's copy
    pages page 0 in, and that read waits only for changes to page 0 coming back, not for the
    other kernel's answer (which waits for its own read of page 0)."""
    store = MemoryObject(3 * PAGE)
    store.put(0, b"old".ljust(PAGE, b"\0") * 3)
    async with served(store, ("k1", PAGE, 32), ("k3", PAGE, 32)) as (pager, [(k1, t1, a1), (k3, t3, a3)]):
        child1, child3 = await k1.task_create(t1), await k3.task_create(t3)
        await t1.write(a1 + PAGE, b"k1")
        await t3.write(a3 + 2 * PAGE, b"k3")
        drop_clean_page(k1, 0)
        drop_clean_page(k3, 0)

        def write() -> None:
            store.data[0:3] = b"NEW"

        await settle(pager.write_through, 0, 3 * PAGE, write)
        assert "gave up waiting" not in trace_of(pager)
        assert bytes(store.data[PAGE : PAGE + 2]) == b"k1" and bytes(store.data[2 * PAGE : 2 * PAGE + 2]) == b"k3"
        for child, address in ((child1, a1), (child3, a3)):
            assert [await child.read(address + page * PAGE, 3) for page in range(3)] == [b"old"] * 3
        assert await t1.read(a1, 3) == b"NEW" and await t3.read(a3, 3) == b"NEW"


async def test_only_the_pages_a_kernel_is_flushing_are_served_out_of_line(mock_clock):
    """k1 asks for pages 0-3 in one request while waiting in line; a flush of page 0 reaches it
    (its copy needs page 0 first).  Page 0 is served at once; pages 1-3 keep to the line, so
    k2's change to page 2 comes back before k1 gets the page."""
    store = MemoryObject(4 * PAGE)
    store.put(0, bytes(4 * PAGE))
    pager = Pager(store, name="obj")
    async with trio.open_nursery() as nursery:
        await nursery.start(pager.serve)
        async with kernelsim.boot("k1", PAGE, 32, cluster_pages=4) as k1, kernelsim.boot("k2", PAGE, 32) as k2, kernelsim.boot("k3", PAGE, 32) as k3:
            (t1, a1), (t2, a2), (t3, a3) = [await mapped(kernel, pager, 4 * PAGE) for kernel in (k1, k2, k3)]
            child = await k1.task_create(t1)  # a delayed copy; k1 reads pages 0-3 in
            await t2.write(a2 + 2 * PAGE, b"NEW")  # k1's copy takes page 2 first; k2 may write it
            for offset in (0, PAGE, 3 * PAGE):
                drop_clean_page(k1, offset)
            store.read_gate = trio.Event()
            async with trio.open_nursery() as inner:
                scene = Scene(inner)
                await scene.start("k3 reads", t3.read, a3, 1)  # its grant of page 0 waits in read_pages
                await scene.start("k1 reads", t1.read, a1, 1)  # asks for pages 0-3, waits behind k3's
                await scene.start("flush", pager.flush, 0, PAGE)  # k1's copy needs page 0 first
                store.read_gate.set()
                await scene.settle()
            assert await t1.read(a1 + 2 * PAGE, 3) == b"NEW"
            assert await child.read(a1 + 2 * PAGE, 3) == bytes(3)
        nursery.cancel_scope.cancel()


# -- 2. holes and copies ---------------------------------------------------------------------


async def test_a_hole_read_after_a_copy_call_fork_is_saved_for_the_copy_first(mock_clock):
    store = MemoryObject(2 * PAGE)  # all holes
    async with served(store, ("k1", PAGE, 32), copy_strategy=MEMORY_OBJECT_COPY_CALL) as (pager, [(kernel, parent, address)]):
        child = await kernel.task_create(parent)  # page 1 is not resident
        assert await parent.read(address + PAGE, 4) == bytes(4)  # data_unavailable: writable
        await parent.write(address + PAGE, b"AFTER THE FORK")  # no data_unlock needed
        assert await child.read(address + PAGE, 14) == bytes(14)
        (copy,) = pager.copies.values()
        assert f"copy {copy.id} saved 1 page(s) from 0x1000" in trace_of(pager)


async def test_a_hole_read_by_another_kernel_lets_delayed_copies_take_the_page_first(mock_clock):
    store = MemoryObject(PAGE)  # a hole
    async with served(store, ("k1", PAGE, 4), ("k2", PAGE, 32)) as (pager, [(k1, parent, a1), (k2, other, a2)]):
        child = await k1.task_create(parent)  # a delayed copy: k1 reads the hole in
        assert await other.read(a2, 4) == bytes(4)  # a writable zero-filled page for k2
        await other.write(a2, b"k2 AFTER the fork")
        await squeeze(parent)  # k1 drops its clean zero-filled page
        assert await child.read(a1, 17) == bytes(17)
        assert await parent.read(a1, 17) == b"k2 AFTER the fork"


# -- 3. a COPY_CALL fork while a page is on its way -------------------------------------------


class Gated(MemoryObject):
    """unlock_pages waits for `unlock_gate` while it is set to an Event."""

    def __init__(self, size: int = 64 * PAGE) -> None:
        super().__init__(size)
        self.unlock_gate: trio.Event | None = None

    async def unlock_pages(self, offset, length, access):
        if self.unlock_gate is not None:
            await self.unlock_gate.wait()


async def test_a_page_that_arrives_after_a_copy_call_fork_comes_write_locked(mock_clock):
    store = MemoryObject(2 * PAGE)
    store.put(0, b"original".ljust(2 * PAGE, b"\0"))
    async with served(store, ("k1", PAGE, 32), copy_strategy=MEMORY_OBJECT_COPY_CALL) as (pager, [(kernel, parent, address)]):
        await parent.read(address + PAGE, 1)  # page 0 is not resident
        store.read_gate = trio.Event()
        async with trio.open_nursery() as nursery:
            scene = Scene(nursery)
            await scene.start("write", parent.write, address, b"during")  # its page-in waits
            child = await kernel.task_create(parent)  # the fork, while page 0 is on its way
            store.read_gate.set()
            await scene.settle()
        await parent.write(address, b"AFTER!!!")  # after the fork
        assert await child.read(address, 8) == b"original"
        assert await parent.read(address, 8) == b"AFTER!!!"


async def test_an_unlock_answered_after_a_copy_call_fork_leaves_the_page_write_locked(mock_clock):
    store = Gated(2 * PAGE)
    store.put(0, b"original".ljust(2 * PAGE, b"\0"))
    async with served(store, ("k1", PAGE, 32), copy_strategy=MEMORY_OBJECT_COPY_CALL) as (pager, [(kernel, parent, address)]):
        await parent.read(address, 1)  # page 0 resident, write-locked
        store.unlock_gate = trio.Event()
        async with trio.open_nursery() as nursery:
            scene = Scene(nursery)
            await scene.start("write", parent.write, address, b"during")  # its data_unlock waits
            child = await kernel.task_create(parent)  # the fork, while the unlock is on its way
            store.unlock_gate.set()
            await scene.settle()
        await parent.write(address, b"AFTER!!!")
        assert await child.read(address, 8) == b"original"
        assert await parent.read(address, 8) == b"AFTER!!!"


# -- 4. copy=temporary ------------------------------------------------------------------------


async def test_copy_temporary_kernels_are_asked_before_a_change_as_copy_delay_ones(mock_clock):
    store = MemoryObject(PAGE)
    store.put(0, b"old".ljust(PAGE, b"\0"))
    specs = ("k1", PAGE, 4), ("k2", PAGE, 32)
    options = {"copy_strategy": MEMORY_OBJECT_COPY_TEMPORARY, "notify_on_evict": True}
    async with served(store, *specs, **options) as (pager, [(k1, parent, a1), (k2, other, a2)]):
        child = await k1.task_create(parent)  # copied on write, as for copy=delay
        await squeeze(parent)  # k1's precious page 0 comes back: the engine forgets it
        await trio.testing.wait_all_tasks_blocked()
        assert len(record_of(pager, "k1").pagemap) == 0
        await other.write(a2, b"NEW")
        assert await child.read(a1, 3) == b"old"
        assert await parent.read(a1, 3) == b"NEW"


# -- 5. write_through after a refused or failed message ----------------------------------------


class BytesObject(PagerCallbacks):
    def __init__(self) -> None:
        self.data = bytearray(PAGE)

    async def read_pages(self, offset, length):
        return bytes(self.data[offset : offset + length])

    async def write_pages(self, offset, data):
        self.data[offset : offset + len(data)] = data

    async def report_extent(self):
        return len(self.data)


async def _write_through_after(message_for) -> tuple[Pager, BytesObject]:
    store = BytesObject()
    pager = Pager(store, name="obj")
    async with trio.open_nursery() as nursery:
        await nursery.start(pager.serve)

        def write() -> None:
            store.data[0:5] = b"hello"

        async def send_then_write() -> None:
            # No checkpoint between the two: write_through finds the message queued, and waits
            # until serve has taken it.
            pager.send_right().send(message_for(pager))
            await pager.write_through(0, 5, write)

        await settle(send_then_write)
        nursery.cancel_scope.cancel()
    assert store.data[:5] == b"hello"
    return pager, store


async def test_write_through_catches_up_with_a_refused_message(mock_clock):
    stranger = port_allocate("not a control port of this pager")
    request = m.MemoryObjectDataRequest(control=stranger.make_send(), offset=0, length=PAGE, desired_access=VM_PROT_READ)
    pager, _ = await _write_through_after(lambda pager: request)
    assert "refused: memory_object_data_request from a control port" in trace_of(pager)


async def test_write_through_catches_up_with_a_message_whose_handling_failed(mock_clock):
    def message_for(pager: Pager) -> m.Message:
        def broken(record, message):
            raise RuntimeError("a bug in a handler")

        pager._init = broken  # the handler of memory_object_init raises
        control, name = port_allocate("control"), port_allocate("name")
        return m.MemoryObjectInit(control=control.make_send(), name=name.make_send(), page_size=PAGE)

    pager, _ = await _write_through_after(message_for)
    assert "INTERNAL ERROR while handling memory_object_init" in trace_of(pager)


# -- 6. a copy store that fails ---------------------------------------------------------------


async def test_a_copy_store_that_cannot_be_made_leaves_the_copy_in_memory(mock_clock):
    class DiskFull(MemoryObject):
        def copy_store(self, copy_id, length, page_size):
            raise OSError(28, "No space left on device")

    store = DiskFull(2 * PAGE)
    store.put(0, bytes(2 * PAGE))
    async with served(store, ("k1", PAGE, 32), copy_strategy=MEMORY_OBJECT_COPY_CALL) as (pager, [(kernel, parent, address)]):
        await parent.write(address, b"before")
        child = await kernel.task_create(parent)
        await settle(parent.write, address, b"AFTER!")
        assert await settle(child.read, address, 6) == b"before"
        assert "copy_store raised OSError: [Errno 28] No space left on device; copy" in trace_of(pager)
        (copy,) = pager.copies.values()
        assert isinstance(copy.store, MemoryCopyStore) and copy.store.held == {0}


async def test_a_copy_store_write_that_raises_fails_the_change_instead_of_leaving_it_waiting(mock_clock):
    class FullStore(MemoryCopyStore):
        async def write(self, offset, data):
            raise OSError(28, "No space left on device")

    class DiskFull(MemoryObject):
        def copy_store(self, copy_id, length, page_size):
            return FullStore(page_size)

    store = DiskFull(2 * PAGE)
    store.put(0, bytes(2 * PAGE))
    async with served(store, ("k1", PAGE, 32), copy_strategy=MEMORY_OBJECT_COPY_CALL) as (pager, [(kernel, parent, address)]):
        await parent.write(address, b"before")
        child = await kernel.task_create(parent)
        with pytest.raises(KernMemoryError) as failure:
            await settle(parent.write, address, b"AFTER!")  # the old page cannot be saved
        assert failure.value.reason == KERN_MEMORY_FAILURE
        (copy,) = pager.copies.values()
        assert f"copy {copy.id} cannot save its old page at 0x0: OSError: [Errno 28] No space left on device" in trace_of(pager)
        assert await settle(child.read, address, 6) == b"before"
        assert await settle(parent.read, address, 6) == b"before"

"""Copies held outside the protocol (outside.py): the engine grants no kernel write access over
a range Linux may hold, and the bookkeeping of what Linux may hold.

The engine tests use a simulated page cache that behaves as Linux's does towards the mount: it
reads pages through `read_through` (noting them as the store is read), keeps dirty pages, and,
told to drop its pages, writes each dirty page back *whole* through `write_through` (the write
waits in the grants line like any write of `data`) before dropping everything.  Events are
ordered with trio.testing.wait_all_tasks_blocked under `mock_clock`, never with time, so a
deadlock shows as a task still waiting once every task is blocked.  The same scenario through
the real mount, a kernel process and an mmapping program is in test_linux_copies.py.
"""

from __future__ import annotations

import functools

import trio
import trio.testing

from fusepager.outside import PageCacheCopies
from fusepager.pager import Pager
from kernelsim.interface import VM_PROT_READ, VM_PROT_WRITE
from test_engine_races import Scene, record_of, settle, trace_of
from test_pager import PAGE, MemoryObject, served


class SimulatedPageCache:
    """Linux's page cache of one object's `data`, as the mount sees it (see the module doc)."""

    def __init__(self, pager: Pager, store: MemoryObject, nursery: trio.Nursery) -> None:
        self.pager = pager
        self.store = store
        self.pages: dict[int, bytearray] = {}
        self.dirty: set[int] = set()
        self.written_back: list[tuple[int, bytes]] = []
        self.copies = PageCacheCopies(self.drop, nursery.start_soon)
        pager.outside = self.copies

    async def page(self, offset: int) -> bytearray:
        if offset not in self.pages:

            def read_store() -> bytes:
                self.copies.note(offset, PAGE)  # as the store is read, in the pager's line
                return bytes(self.store.data[offset : offset + PAGE])

            self.pages[offset] = bytearray(await self.pager.read_through(offset, PAGE, read_store))
        return self.pages[offset]

    async def store_bytes(self, offset: int, data: bytes) -> None:
        """A program's store into its shared mapping: the page is read first, then dirty."""
        base = offset - offset % PAGE
        page = await self.page(base)
        page[offset - base : offset - base + len(data)] = data
        self.dirty.add(base)

    async def msync(self, base: int) -> None:
        """The page written back whole, as Linux writes it."""
        if base in self.dirty:
            self.dirty.discard(base)
            data = bytes(self.pages[base])
            self.written_back.append((base, data))
            await self.pager.write_through(base, PAGE, lambda: self.store.put(base, data))

    async def drop(self) -> None:
        """FUSE's inode invalidation: every dirty page written back, then every page dropped."""
        for base in sorted(self.dirty):
            await self.msync(base)
        self.pages.clear()


async def test_a_kernel_may_write_a_page_linux_holds_dirty_only_after_linux_wrote_it_back(mock_clock):
    """The issue's scenario in the engine: Linux dirties bytes 0-8 of page 1, a kernel writes
    +200 of it, Linux writes bytes 0-5 again and msyncs.  The kernel's write waits until Linux
    has written back and dropped its page (the write-back goes through the grants line while
    the kernel's grant waits: no deadlock), and nothing the kernel wrote is undone."""
    store = MemoryObject(4 * PAGE)
    store.put(0, bytes(4 * PAGE))
    async with served(store, ("k1", PAGE, 32)) as (pager, [(k1, t1, a1)]):
        async with trio.open_nursery() as nursery:
            linux = SimulatedPageCache(pager, store, nursery)
            await linux.store_bytes(PAGE, b"AAAAAAAAA")
            await settle(t1.write, a1 + PAGE + 200, b"KKK")
            # Linux let go of the page before the kernel could write it ...
            assert linux.written_back == [(PAGE, b"AAAAAAAAA".ljust(PAGE, b"\0"))]
            assert PAGE not in linux.pages and not linux.copies.may_hold(PAGE, PAGE)
            # ... asked as the protocol asks: the page came write-locked, the kernel asked to
            # unlock it, and only then got write access.
            trace = trace_of(pager)
            assert "memory_object_data_unlock" in trace
            assert record_of(pager, "k1").pagemap.get(PAGE).access == VM_PROT_READ | VM_PROT_WRITE
            await linux.store_bytes(PAGE, b"BBBBBB")  # a new read: the kernel is cleaned first
            await linux.msync(PAGE)
            nursery.cancel_scope.cancel()
        assert store.data[PAGE : PAGE + 9] == b"BBBBBBAAA"
        assert store.data[PAGE + 200 : PAGE + 203] == b"KKK"
        assert await t1.read(a1 + PAGE + 200, 3) == b"KKK"


async def test_a_hole_linux_holds_goes_to_a_reading_kernel_write_locked(mock_clock):
    """memory_object_data_unavailable would leave the zero-filled page writable in the kernel
    while Linux holds the page: it goes as zeros, write-locked, and a write asks first."""
    store = MemoryObject(4 * PAGE)  # all holes
    async with served(store, ("k1", PAGE, 32)) as (pager, [(k1, t1, a1)]):
        async with trio.open_nursery() as nursery:
            linux = SimulatedPageCache(pager, store, nursery)
            await linux.store_bytes(2 * PAGE, b"linux")  # Linux holds the hole, dirty
            assert await settle(t1.read, a1 + 2 * PAGE, 5) == bytes(5)
            assert record_of(pager, "k1").pagemap.get(2 * PAGE).access == VM_PROT_READ
            assert "memory_object_data_unavailable" not in trace_of(pager)
            await settle(t1.write, a1 + 2 * PAGE + 100, b"kernel")
            assert linux.written_back and 2 * PAGE not in linux.pages
            nursery.cancel_scope.cancel()
        assert await t1.read(a1 + 2 * PAGE, 5) == b"linux"
        await pager.sync()
        assert store.data[2 * PAGE : 2 * PAGE + 5] == b"linux"
        assert store.data[2 * PAGE + 100 : 2 * PAGE + 106] == b"kernel"


async def test_a_kernel_writing_elsewhere_does_not_wait_for_linux(mock_clock):
    """Only the range Linux may hold costs a release: a write to another page is granted at
    once, with no drop of Linux's pages."""
    store = MemoryObject(4 * PAGE)
    store.put(0, bytes(4 * PAGE))
    async with served(store, ("k1", PAGE, 32)) as (pager, [(k1, t1, a1)]):
        async with trio.open_nursery() as nursery:
            linux = SimulatedPageCache(pager, store, nursery)
            await linux.store_bytes(0, b"linux")
            await settle(t1.write, a1 + 3 * PAGE, b"far away")
            assert linux.copies.drops == 0 and 0 in linux.dirty and "memory_object_data_unlock" not in trace_of(pager)
            nursery.cancel_scope.cancel()


async def test_linux_reading_a_page_a_kernel_writes_takes_the_kernels_write_access_first(mock_clock):
    """The other direction: a kernel holds the page writable; Linux's read cleans it first and
    leaves it read-only, so no kernel writes what Linux now holds."""
    store = MemoryObject(4 * PAGE)
    store.put(0, bytes(4 * PAGE))
    async with served(store, ("k1", PAGE, 32)) as (pager, [(k1, t1, a1)]):
        async with trio.open_nursery() as nursery:
            linux = SimulatedPageCache(pager, store, nursery)
            await t1.write(a1 + PAGE + 10, b"kernel")
            assert (await linux.page(PAGE))[10:16] == b"kernel"
            assert record_of(pager, "k1").pagemap.get(PAGE).access == VM_PROT_READ
            nursery.cancel_scope.cancel()


async def test_a_write_around_linuxs_cache_has_linux_let_go_of_the_range_first(mock_clock):
    """A direct write of `data` does not reach Linux's cached page: were the page kept, a
    program dirtying another byte of it later would write the old bytes back over the write."""
    store = MemoryObject(4 * PAGE)
    store.put(0, bytes(4 * PAGE))
    async with served(store, ("k1", PAGE, 32)) as (pager, _):
        async with trio.open_nursery() as nursery:
            linux = SimulatedPageCache(pager, store, nursery)
            await linux.store_bytes(PAGE, b"dirty")  # dirty, not yet written back
            await linux.page(2 * PAGE)  # clean
            direct = functools.partial(pager.write_through, outside_first=True)
            await settle(direct, 2 * PAGE + 100, 6, lambda: store.put(2 * PAGE + 100, b"direct"))
            assert linux.pages == {} and linux.written_back == [(PAGE, b"dirty".ljust(PAGE, b"\0"))]
            await linux.store_bytes(2 * PAGE, b"later")  # read again: with the direct write
            await linux.msync(2 * PAGE)
            nursery.cancel_scope.cancel()
        assert store.data[2 * PAGE : 2 * PAGE + 5] == b"later"
        assert store.data[2 * PAGE + 100 : 2 * PAGE + 106] == b"direct"


# -- the bookkeeping -------------------------------------------------------------------------


class Drops:
    """A drop function whose drops wait for `gate` (when set) and count themselves."""

    def __init__(self) -> None:
        self.started = 0
        self.gate: trio.Event | None = None

    async def __call__(self) -> None:
        self.started += 1
        if self.gate is not None:
            await self.gate.wait()


async def test_a_drop_forgets_what_was_noted_before_it_started_and_keeps_what_came_during_it(mock_clock):
    drops = Drops()
    async with trio.open_nursery() as nursery:
        copies = PageCacheCopies(drops, nursery.start_soon)
        assert not copies.may_hold()
        copies.note(0, PAGE)
        copies.note(PAGE, PAGE)  # merged with the first
        assert copies.may_hold(PAGE + 5, 1) and not copies.may_hold(2 * PAGE, PAGE) and copies.may_hold()
        drops.gate = trio.Event()
        scene = Scene(nursery)
        await scene.start("release", copies.release, 0, PAGE)
        assert drops.started == 1
        copies.note(3 * PAGE, PAGE)  # read while the drop is under way: it may have missed it
        drops.gate.set()
        await scene.settle()
        assert not copies.may_hold(0, 3 * PAGE) and copies.may_hold(3 * PAGE, 1)
        assert drops.started == 1
        await copies.release(3 * PAGE, PAGE)  # a new drop
        assert drops.started == 2 and not copies.may_hold()


async def test_a_release_during_a_drop_that_started_before_its_note_waits_for_another(mock_clock):
    drops = Drops()
    async with trio.open_nursery() as nursery:
        copies = PageCacheCopies(drops, nursery.start_soon)
        copies.note(0, PAGE)
        drops.gate = trio.Event()
        scene = Scene(nursery)
        await scene.start("first", copies.release, 0, PAGE)
        copies.note(PAGE, PAGE)
        await scene.start("second", copies.release, PAGE, PAGE)
        assert drops.started == 1  # one drop at a time
        drops.gate.set()
        await scene.settle()
        assert drops.started == 2 and not copies.may_hold()


async def test_changes_drop_linuxs_pages_in_the_background_only_when_it_may_hold_some(mock_clock):
    drops = Drops()
    async with trio.open_nursery() as nursery:
        copies = PageCacheCopies(drops, nursery.start_soon)
        copies.changed()  # nothing noted: nothing to drop, and Linux's cache is current
        await trio.testing.wait_all_tasks_blocked()
        assert drops.started == 0 and copies.current
        copies.note(0, PAGE)
        drops.gate = trio.Event()
        copies.changed()
        await trio.testing.wait_all_tasks_blocked()
        assert drops.started == 1 and not copies.current
        copies.changed()  # during the drop, with nothing read since it started: it suffices
        drops.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert drops.started == 1 and copies.current and not copies.may_hold()
        drops.gate = trio.Event()
        copies.note(0, PAGE)
        copies.changed()
        await trio.testing.wait_all_tasks_blocked()
        copies.note(PAGE, PAGE)  # read during the drop, then changed: another drop follows
        copies.changed()
        drops.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert drops.started == 3 and copies.current and not copies.may_hold()


def test_runs_merge_what_touches_and_answer_overlaps():
    from fusepager.outside import Runs

    runs = Runs()
    for start, end in [(10, 20), (30, 40), (20, 25), (50, 60), (45, 52), (0, 5)]:
        runs.add(start, end)
    assert list(runs) == [(0, 5), (10, 25), (30, 40), (45, 60)]
    runs.add(5, 45)
    assert list(runs) == [(0, 60)]
    assert runs.overlaps(59, 61) and not runs.overlaps(60, 70) and runs.overlaps(0, None) and not runs.overlaps(60, None)
    sparse = Runs()
    for page in range(0, 1 << 20, 2):  # a program touching every other page of a large mapping
        sparse.add(page * 4096, page * 4096 + 4096)
    assert len(sparse) == 1 << 19
    assert sparse.overlaps(4096 * 4, 4096 * 4 + 1) and not sparse.overlaps(4096 * 5, 4096 * 6) and sparse.overlaps(4096 * 5, 4096 * 6 + 1)


async def test_quiet_waits_for_the_drop_under_way(mock_clock):
    drops = Drops()
    async with trio.open_nursery() as nursery:
        copies = PageCacheCopies(drops, nursery.start_soon)
        await copies.quiet()  # nothing under way: at once
        copies.note(0, PAGE)
        drops.gate = trio.Event()
        scene = Scene(nursery)
        await scene.start("release", copies.release, 0, PAGE)
        await scene.start("quiet", copies.quiet)
        assert copies.dropping and "quiet" not in scene.results
        drops.gate.set()
        await scene.settle()
        assert not copies.dropping

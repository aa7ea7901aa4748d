"""Returned pages the store cannot take (a full disk) are kept by the pager and served back:
the Unstored ranges against a byte model, then the engine with real kernels whose store fails."""

from __future__ import annotations

import errno

from hypothesis import given
from hypothesis import strategies as st

from fusepager.pager import PagerError
from fusepager.unstored import Unstored
from kernelsim.interface import KERN_MEMORY_FAILURE
from test_pager import PAGE, MemoryObject, served

SPAN = 64


@st.composite
def operations(draw):
    ops = []
    for _ in range(draw(st.integers(0, 30))):
        offset = draw(st.integers(0, SPAN - 1))
        length = draw(st.integers(1, SPAN - offset))
        if draw(st.booleans()):
            ops.append(("keep", offset, bytes(draw(st.binary(min_size=length, max_size=length))), draw(st.sampled_from([1, 4, 8]))))
        else:
            ops.append(("discard", offset, length))
    return ops


@given(operations(), st.binary(min_size=SPAN, max_size=SPAN))
def test_kept_bytes_show_over_the_store_and_later_ones_win(ops, store):
    unstored = Unstored()
    kept: list[int | None] = [None] * SPAN  # the model: the kept byte at each offset, if any
    for op in ops:
        if op[0] == "keep":
            _, offset, data, page_size = op
            unstored.keep(offset, data, page_size)
            kept[offset : offset + len(data)] = list(data)
        else:
            _, offset, length = op
            unstored.discard(offset, length)
            kept[offset : offset + length] = [None] * length
    expected = bytes(store[i] if kept[i] is None else kept[i] for i in range(SPAN))
    assert unstored.overlay(0, SPAN, store) == expected
    assert len(unstored) == sum(byte is not None for byte in kept)
    assert bool(unstored) == any(byte is not None for byte in kept)
    for low in range(0, SPAN - 6, 7):  # sub-ranges, and holes that stay holes unless bytes are kept
        shown = unstored.overlay(low, 7, None)
        if any(byte is not None for byte in kept[low : low + 7]):
            assert shown == bytes(0 if byte is None else byte for byte in kept[low : low + 7])
        else:
            assert shown is None
    # The ranges to store again cover every kept byte, in whole pages, sorted and apart.
    pages = list(unstored.pages())
    covered = set()
    for offset, length in pages:
        covered.update(range(offset, offset + length))
    assert all(i in covered for i in range(SPAN) if kept[i] is not None)
    assert all(a[0] + a[1] < b[0] for a, b in zip(pages, pages[1:]))


class FullDisk(MemoryObject):
    """A store whose writes fail with ENOSPC while `full`."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False

    async def write_pages(self, offset, data):
        if self.full:
            self.calls.append(("refused", offset, len(data)))
            raise PagerError("no space left on device", KERN_MEMORY_FAILURE, errno.ENOSPC)
        await super().write_pages(offset, data)


async def test_returned_pages_the_store_refuses_are_served_back_and_stored_by_the_next_sync():
    store = FullDisk()
    store.put(0, b"s" * (8 * PAGE))
    async with served(store, ("k1", PAGE, 32), ("k2", 4 * PAGE, 32)) as (pager, [(_, t1, a1), (_, t2, a2)]):
        await t1.write(a1 + PAGE, b"one")
        await t1.write(a1 + 2 * PAGE + 100, b"two")
        store.full = True
        try:
            await pager.sync()
        except PagerError as error:
            assert error.errno == errno.ENOSPC
        else:
            raise AssertionError("a sync whose writes failed said all was well")
        await pager.flush()  # k1 lets its pages go: the pager has the only copy
        assert store.data[PAGE : PAGE + 3] == b"sss"
        assert len(pager.unstored) == 2 * PAGE
        # Served back: to the kernel that wrote them, to another kernel (whose 16 KiB page is
        # the store's bytes with the kept ones over them), and to the mount's reads.
        assert await t1.read(a1 + PAGE, 3) == b"one"
        assert await t2.read(a2 + 2 * PAGE + 100, 3) == b"two"
        assert await t2.read(a2, 3) == b"sss"
        assert (await pager.read_through(PAGE, PAGE))[:3] == b"one"
        # A write through the mount replaces part of them; the store takes it (space for a
        # moment), and afterwards shows it, not the older kept bytes.
        store.full = False
        await pager.write_through(PAGE + 1, 1, lambda: store.put(PAGE + 1, b"N"))
        store.full = True
        assert (await pager.read_through(PAGE, PAGE))[:3] == b"oNe"
        # Still full: the sync fails and keeps them; space returns: the sync stores them.
        try:
            await pager.sync()
        except PagerError:
            pass
        else:
            raise AssertionError("a sync that could not store the kept bytes said all was well")
        assert pager.unstored
        store.full = False
        await pager.sync()
        assert not pager.unstored
        assert store.data[PAGE : PAGE + 3] == b"oNe" and store.data[2 * PAGE + 100 : 2 * PAGE + 103] == b"two"
        assert store.data[PAGE + 3 : 2 * PAGE + 100] == b"s" * (PAGE + 97)  # the rest of the pages as they were
        assert await t2.read(a2 + PAGE, 3) == b"oNe"


async def test_a_later_stored_return_wins_over_kept_bytes_and_what_cannot_be_stored_at_the_end_is_reported():
    store = FullDisk()
    async with served(store, ("k1", PAGE, 32)) as (pager, [(_, task, address)]):
        await task.write(address, b"old")
        store.full = True
        await pager.flush()
        assert await task.read(address, 3) == b"old"
        store.full = False
        await pager.write_through(10 * PAGE, 1, lambda: store.put(10 * PAGE, b"x"))  # kernels may write again
        await task.write(address, b"new")
        await pager.flush()  # stored this time: the kept "old" is gone
        assert not pager.unstored and store.data[:3] == b"new"
        assert await task.read(address, 3) == b"new"
        await task.write(address + PAGE, b"last")
        store.full = True
        await pager.flush()
        assert await pager.store_unstored() == PAGE
        assert "LOST 4096 returned bytes" in pager.trace.read(0, 1 << 20).decode()


async def test_initial_data_a_full_disk_refuses_is_kept_and_paged_back(tmp_path, monkeypatch):
    """A kernel pages anonymous memory out to the default manager (memory_object_data_initialize)
    while the temporaries' disk is full: the data is kept, paged back in, and stored by a sync."""
    import trio

    import kernelsim
    from fusepager import default_pager

    full = {"now": True}

    class FullTemporary(default_pager.TemporaryCallbacks):
        async def write_pages(self, offset, data):
            if full["now"]:
                raise PagerError("writing temporary data: No space left on device", KERN_MEMORY_FAILURE, errno.ENOSPC)
            await super().write_pages(offset, data)

    monkeypatch.setattr(default_pager, "TemporaryCallbacks", FullTemporary)
    default = default_pager.DefaultManager(tmp_path / "default")
    async with trio.open_nursery() as nursery:
        await nursery.start(default.run)
        async with kernelsim.boot("k1", PAGE, 8) as kernel:
            kernel.vm_set_default_memory_manager(default.send_right())
            task = await kernel.task_create()
            address = task.vm_allocate(32 * PAGE)
            for page in range(32):  # 8 frames: most of it pages out, none of it can be stored
                await task.write(address + page * PAGE, bytes([page + 1]) * PAGE)
            for page in range(32):  # paged back in: from what the pager kept
                assert await task.read(address + page * PAGE, PAGE) == bytes([page + 1]) * PAGE
            (temporary,) = default.temporaries.values()
            assert not temporary.callbacks.written and temporary.pager.unstored
            assert "could not store initial data" in default.trace.read(0, 1 << 20).decode()
            full["now"] = False
            await temporary.pager.sync()
            assert not temporary.pager.unstored and temporary.callbacks.written
            for page in sorted(temporary.callbacks.written):
                assert await temporary.callbacks.read_pages(page, PAGE) == bytes([page // PAGE + 1]) * PAGE
            task.vm_deallocate(address, 32 * PAGE)
        nursery.cancel_scope.cancel()

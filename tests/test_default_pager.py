"""The default memory manager, in process: memory_object_create, data_initialize, paging back."""

from __future__ import annotations

import trio

import kernelsim
from fusepager.default_pager import DefaultManager, TemporaryCallbacks

PAGE = 4096


async def test_vm_set_default_memory_manager_returns_the_old_port_and_a_null_port_only_reads(tmp_path):
    first, second = DefaultManager(tmp_path / "a"), DefaultManager(tmp_path / "b")
    kernel = kernelsim.Kernel("k1")
    assert kernel.vm_set_default_memory_manager(first.send_right()) is None
    assert kernel.vm_set_default_memory_manager(None) == first.send_right()
    assert kernel.vm_set_default_memory_manager(second.send_right()) == first.send_right()
    assert kernel.vm_set_default_memory_manager(None) == second.send_right()


async def test_data_initialize_is_ignored_where_data_exists(tmp_path):
    temporary = TemporaryCallbacks(tmp_path / "data", 4 * PAGE, PAGE)
    assert await temporary.read_pages(0, PAGE) is None  # never written: unavailable
    await temporary.initialize_pages(0, b"a" * (2 * PAGE))
    await temporary.write_pages(PAGE, b"b" * PAGE)
    await temporary.initialize_pages(0, b"c" * (3 * PAGE))  # only page 2 is new
    assert await temporary.read_pages(0, 3 * PAGE) == b"a" * PAGE + b"b" * PAGE + b"c" * PAGE
    assert await temporary.read_pages(3 * PAGE, PAGE) is None
    temporary.close()
    assert not (tmp_path / "data").exists()


async def test_anonymous_memory_pages_out_to_the_default_manager_and_comes_back(tmp_path):
    default = DefaultManager(tmp_path / "default")
    async with trio.open_nursery() as nursery:
        await nursery.start(default.run)
        async with kernelsim.boot("k1", PAGE, 8) as kernel:
            kernel.vm_set_default_memory_manager(default.send_right())
            task = await kernel.task_create()
            address = task.vm_allocate(32 * PAGE)
            for page in range(32):
                await task.write(address + page * PAGE, bytes([page + 1]) * PAGE)
            for page in range(32):
                assert await task.read(address + page * PAGE, PAGE) == bytes([page + 1]) * PAGE
            assert kernel.resident.peak <= 8 and kernel.stats.creates == 1
            (temporary,) = default.temporaries.values()
            assert temporary.callbacks.written  # pages went there
            text = default.trace.read(0, 1 << 20).decode()
            assert "memory_object_create(" in text and "memory_object_data_initialize(" in text
            assert "memory_object_data_request(" in text
            task.vm_deallocate(address, 32 * PAGE)
            with trio.fail_after(5):
                while default.temporaries:
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

"""Several kernels, with different page sizes, mapping one memory object."""

from __future__ import annotations

import trio

import kernelsim
from kernelsim import messages as m
from managers import TestManager

SIZES = {"k4": 4096, "k16": 16384, "k8": 8192}


async def test_each_kernel_inits_with_its_own_ports_and_page_size_and_keeps_to_its_pages():
    manager = TestManager(size=1 << 20)
    manager.fill_pattern()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run)
        async with (
            kernelsim.boot("k4", SIZES["k4"], 64, cluster_pages=3) as k4,
            kernelsim.boot("k16", SIZES["k16"], 64, cluster_pages=2) as k16,
            kernelsim.boot("k8", SIZES["k8"], 64) as k8,
        ):
            kernels = [k4, k16, k8]
            tasks = [await kernel.task_create() for kernel in kernels]
            addresses = [await task.vm_map(manager.send_right(), 256 * 1024) for task in tasks]
            # odd offsets and lengths that straddle every kernel's pages
            for start, length in [(0, 1), (5000, 30000), (16383, 2), (100000, 70000), (250000, 12144)]:
                for task, address in zip(tasks, addresses):
                    assert await task.read(address + start, length) == manager.pattern(start, length)
            inits = manager.messages(m.MemoryObjectInit)
            assert sorted(init.page_size for init in inits) == sorted(SIZES.values())
            assert len({init.control for init in inits}) == 3
            assert len({init.name for init in inits}) == 3
            page_size_of = {init.control: init.page_size for init in inits}
            for message in manager.messages():
                if isinstance(message, (m.MemoryObjectDataRequest, m.MemoryObjectDataUnlock)):
                    page_size = page_size_of[message.control]
                    assert message.offset % page_size == 0
                    assert message.length % page_size == 0 and message.length > 0
            # each kernel's requests are its own: its control port names it
            for kernel in kernels:
                (init,) = [init for init in inits if init.page_size == kernel.page_size]
                assert kernel.objects.lookup_control(init.control.name) is not None
                # the manager can tell which kernel a control port leads to
                assert init.control.host == init.name.host == kernel.name
        nursery.cancel_scope.cancel()


async def test_two_kernels_terminate_independently():
    manager = TestManager()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run)
        async with kernelsim.boot("a", 4096, 16) as a, kernelsim.boot("b", 16384, 16) as b:
            task_a, task_b = await a.task_create(), await b.task_create()
            address_a = await task_a.vm_map(manager.send_right(), 65536)
            address_b = await task_b.vm_map(manager.send_right(), 65536)
            await task_a.write(address_a, b"from a")
            await task_b.read(address_b, 1)
            task_a.vm_deallocate(address_a, 65536)
            terminate = await manager.wait_for(m.MemoryObjectTerminate)
            init_a = next(i for i in manager.messages(m.MemoryObjectInit) if i.page_size == 4096)
            assert terminate.control.port is init_a.control.port
            assert manager.backing[:6] == b"from a"
            # b still works and reads what a returned
            b_control = next(i for i in manager.messages(m.MemoryObjectInit) if i.page_size == 16384).control
            kernelsim.calls.memory_object_lock_request(b_control, 0, 16384, should_flush=True)
            assert await task_b.read(address_b, 6) == b"from a"
        nursery.cancel_scope.cancel()

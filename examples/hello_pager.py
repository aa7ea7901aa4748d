#!/usr/bin/env python3
"""A first external memory manager, and a task that faults its pages in.

Run it:  ./scripts/demo        (or: .venv/bin/python examples/hello_pager.py)

The manager below is the whole protocol a pager needs to serve reads and writes: it answers
memory_object_init with memory_object_ready, each memory_object_data_request with
memory_object_data_supply, keeps what comes back in memory_object_data_return, and lets go of
the ports memory_object_terminate hands back.  Every message is printed as it goes by.
"""

from __future__ import annotations

import argparse

import trio

import kernelsim
from kernelsim import calls
from kernelsim import messages as m
from kernelsim.interface import MEMORY_OBJECT_COPY_DELAY, VM_PROT_NONE

OBJECT_SIZE = 64 * 1024


def say(who: str, text: str) -> None:
    print(f"  {who:<8} {text}", flush=True)


class HelloPager:
    """Serves one memory object whose bytes live in a bytearray."""

    def __init__(self) -> None:
        self.port = kernelsim.port_allocate("hello object")
        self.data = bytearray(OBJECT_SIZE)
        for offset in range(0, OBJECT_SIZE, 4096):
            line = f"page {offset // 4096:2} of the hello object\n".encode()
            self.data[offset : offset + len(line)] = line

    async def serve(self) -> None:
        async for received in self.port:
            message = received.message
            say("manager", f"<- #{received.seqno} {message.describe()}")
            if isinstance(message, m.MemoryObjectInit):
                calls.memory_object_ready(message.control, may_cache=False, copy_strategy=MEMORY_OBJECT_COPY_DELAY)
                say("manager", "-> memory_object_ready(may_cache=0 copy_strategy=delay)")
            elif isinstance(message, m.MemoryObjectDataRequest):
                chunk = bytes(self.data[message.offset : message.offset + message.length])
                calls.memory_object_data_supply(message.control, message.offset, chunk, lock_value=VM_PROT_NONE)
                say("manager", f"-> memory_object_data_supply(offset={message.offset:#x} data=<{len(chunk)} bytes>)")
            elif isinstance(message, m.MemoryObjectDataReturn):
                self.data[message.offset : message.offset + len(message.data)] = message.data
                say("manager", f"   stored {len(message.data)} returned bytes at {message.offset:#x}")
            elif isinstance(message, m.MemoryObjectTerminate):
                message.control.destroy()
                message.name.destroy()
                say("manager", "   released the control and name ports: the kernel is done with us")


async def main(page_size: int, cluster_pages: int) -> None:
    pager = HelloPager()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pager.serve)
        async with kernelsim.boot("k1", page_size=page_size, memory_pages=64, cluster_pages=cluster_pages) as kernel:
            print(f"kernel k1: {page_size}-byte pages, 64 page frames, clusters of {cluster_pages} page(s)")
            task = await kernel.task_create(name="hello")
            address = await task.vm_map(pager.port.make_send(), OBJECT_SIZE)
            say("task", f"vm_map of the hello object at {address:#x} ({OBJECT_SIZE} bytes)")

            for page in (0, 2):
                text = await task.read(address + page * 4096, 26)
                say("task", f"read {text!r}")
                await trio.testing.wait_all_tasks_blocked()

            await task.write(address + 4096, b"PAGE  1 rewritten by task")
            say("task", f"write at {address + 4096:#x}")
            say("task", f"read {await task.read(address + 4096, 26)!r}")

            region = task.vm_region(address)
            say("task", f"vm_region: {region.size} bytes, offset {region.offset}, name port {region.name.name}")
            task.vm_deallocate(address, OBJECT_SIZE)
            say("task", "vm_deallocate: the last mapping goes, dirty pages go home")
            await trio.testing.wait_all_tasks_blocked()
            print(f"kernel k1 stats: {kernel.stats.as_dict()}")
        nursery.cancel_scope.cancel()
    assert pager.data[4096:4121] == b"PAGE  1 rewritten by task"
    print("the manager's copy of page 1 now reads:", bytes(pager.data[4096:4121]))


if __name__ == "__main__":
    import trio.testing  # noqa: F401  (wait_all_tasks_blocked keeps the printout in order)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--page-size", type=int, default=4096, help="the kernel's page size (default 4096)")
    parser.add_argument("--cluster", type=int, default=1, help="pages per data_request (default 1)")
    args = parser.parse_args()
    trio.run(main, args.page_size, args.cluster)

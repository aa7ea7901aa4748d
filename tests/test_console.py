"""The kernel console: commands a line, answers a line, against a kernel and a manager."""

from __future__ import annotations

import re

import trio

import kernelsim
from kernelsim.console import Console
from managers import TestManager

PAGE = 4096


async def run(commands: list[str], manager: TestManager | None = None) -> list[str]:
    manager = manager or TestManager()
    manager.fill_pattern()

    async def resolve(name: str):
        if name != "obj":
            raise ValueError(f"no object {name!r}")
        return manager.send_right()

    answers = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run)
        async with kernelsim.boot("k1", PAGE, 64) as kernel:
            console = Console(kernel, resolve)
            for command in commands:
                answers.append(await console.execute(command))
        nursery.cancel_scope.cancel()
    return answers


async def test_map_read_write_region_unmap():
    answers = await run(
        [
            "map obj 64K",
            "read obj+4096 4",
            "write obj+10 hi\\tthere",
            "read obj+10 8 text",
            "writehex 0x10020 cafe",
            "read 65568 2",
            "fill obj+8192 3 0x41",
            "read obj+8192 3 text",
            "region obj+4096",
            "unmap obj",
            "read 0x10000 1",
        ]
    )
    assert answers[0] == "ok map obj 0x10000 65536"
    assert answers[1] == "ok read 0x11000 4 02020202"  # the manager's pattern for page 1
    assert answers[2] == "ok write 0x1000a 8"
    assert answers[3] == "ok read 0x1000a 8 'hi\\tthere'"
    assert answers[4] == "ok write 0x10020 2" and answers[5] == "ok read 0x10020 2 cafe"
    assert answers[7] == "ok read 0x12000 3 'AAA'"
    assert re.fullmatch(r"ok region 0x10000 65536 prot=rw- max=rwx inherit=copy shared=0 offset=0 name=\d+", answers[8])
    assert answers[9] == "ok unmap 0x10000 65536"
    assert answers[10].startswith("error KERN_INVALID_ADDRESS")


async def test_errors_are_one_line_and_say_why():
    answers = await run(
        [
            "frob",
            "map nothing 4K",
            "map obj",
            "map obj 4K prot=q",
            "read obj 4",
            "map obj 16K prot=r max=r",
            "write obj+1 x",
            "map obj 4K",
            "protect obj 4K rw",
            "read obj 99999999999",
            "writehex obj zz",
            "task t9",
        ]
    )
    assert answers[0] == "error unknown command 'frob' (try 'help')"
    assert answers[1].startswith("error no object 'nothing'")
    assert answers[2].startswith("error usage: map")
    assert answers[3].startswith("error bad protection 'q'")
    assert answers[4] == "error no mapping named 'obj' in task t1"
    assert answers[5] == "ok map obj 0x10000 16384"
    assert answers[6].startswith("error KERN_PROTECTION_FAILURE")
    assert answers[7].startswith("error task t1 already maps 'obj'")
    assert answers[8].startswith("error KERN_PROTECTION_FAILURE")  # beyond the maximum r
    assert answers[9].startswith("error read of 99999999999 bytes")
    assert answers[10].startswith("error bad hex")
    assert answers[11].startswith("error no task 't9'")
    assert all("\n" not in answer for answer in answers)


async def test_fork_and_tasks_share_inherited_memory():
    answers = await run(
        [
            "map obj 8K inherit=share",
            "write obj parent",
            "fork child",
            "tasks",
            "task child",
            "read obj 6 text",
            "write obj+6 +child",
            "task t1",
            "read obj 12 text",
            "stat",
            "help",
        ]
    )
    assert answers[2] == "ok fork child"
    assert answers[3] == "ok tasks *t1 child"
    assert answers[5] == "ok read 0x10000 6 'parent'"
    assert answers[8] == "ok read 0x10000 12 'parent+child'"
    assert answers[9].startswith("ok stat kernel=k1 page_size=4096 resident=") and "faults=" in answers[9]
    assert answers[10].startswith("ok help\n# commands")

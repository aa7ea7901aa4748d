"""Issue 14, defect 1: an error nobody expected, met while serving one request, one message
or one command, stays with it.  The daemon, the other kernels' sessions and the kernel go on.

The cases that ended a process are fixed where they enter (tests/test_input_ranges.py,
tests/test_ctl_writes.py); these tests stand for the bugs not found yet.  Each makes a real
piece of the system meet an exception its handler does not expect, the way a bug would:
a request for a file handle the mount never gave, a port whose server raises, a name
resolver that fails.
"""

from __future__ import annotations

import errno
import inspect

import pyfuse3
import pytest
import trio
import trio.testing

import kernelsim
from fusepager.fs import PagerFS
from fusepager.manager import FileManager
from fusepager.store import FileStore
from kernelsim import messages as m
from kernelsim.console import Console
from kernelsim.ipc_port import port_allocate
from kernelsim.transport import Connection


def test_every_request_handler_of_the_mount_is_guarded():
    handlers = [name for name, value in vars(PagerFS).items() if name in vars(pyfuse3.Operations) and inspect.iscoroutinefunction(value)]
    assert len(handlers) >= 20
    unguarded = [name for name in handlers if not getattr(vars(PagerFS)[name], "guarded", False)]
    assert unguarded == []


async def test_an_unexpected_error_in_a_request_answers_eio_and_is_traced(tmp_path):
    """pyfuse3 ends its main loop for any exception but FUSEError (handlers.pxi): before the
    guard, this KeyError would have unmounted everything."""
    (tmp_path / "store").mkdir()
    store = FileStore(tmp_path / "store")
    try:
        operations = PagerFS(FileManager(store))
        for call in (operations.read(12345, 0, 10), operations.write(12345, 0, b"sync\n"), operations.readdir(12345, 0, None)):
            with pytest.raises(pyfuse3.FUSEError) as answered:
                await call
            assert answered.value.errno == errno.EIO
        lines = operations.trace.read(0, 1 << 20).decode().splitlines()
        assert [line.split(" ", 1)[1].split(":")[0] for line in lines] == [
            "mount INTERNAL ERROR in read",
            "mount INTERNAL ERROR in write",
            "mount INTERNAL ERROR in readdir",
        ]
        assert "KeyError(12345)" in lines[0]
        # A refusal it means to make is still its own errno, not EIO.
        with pytest.raises(pyfuse3.FUSEError) as answered:
            await operations.mkdir(pyfuse3.ROOT_INODE, b"x", 0o755, None)
        assert answered.value.errno == errno.EROFS
    finally:
        store.close()


async def test_a_port_server_that_raises_ends_only_its_connection(nursery):
    """A message from a peer is delivered to a port whose server has a bug: that connection
    closes with the reason, and another connection to the same process carries on."""

    def buggy_server(port, message):
        raise RuntimeError("a bug in the name service")

    buggy = port_allocate("buggy name service")
    buggy.set_kobject(buggy_server)
    working = port_allocate("working name service")

    async def answer(port):
        async for received in port:
            received.message.reply.send(m.NetnameLookUpReply(return_code=0, port=None))

    nursery.start_soon(answer, working)
    sides = []
    for bootstrap in (buggy, working):
        near, far = trio.testing.memory_stream_pair()
        manager_side = Connection(near, local_name="manager", bootstrap=bootstrap)
        kernel_side = Connection(far, local_name="k1")
        nursery.start_soon(manager_side.run)
        await nursery.start(kernel_side.run)
        sides.append((manager_side, kernel_side))
    (bad_manager, bad_kernel), (good_manager, good_kernel) = sides

    reply = port_allocate("reply")
    bad_kernel.peer_bootstrap.send(m.NetnameLookUp(name=b"x", reply=reply.make_send_once()))
    with trio.fail_after(10):
        await bad_manager.closed.wait()
        await bad_kernel.closed.wait()
    assert bad_manager.close_reason.startswith("internal error: RuntimeError('a bug in the name service')")

    good_kernel.peer_bootstrap.send(m.NetnameLookUp(name=b"x", reply=reply.make_send_once()))
    with trio.fail_after(10):
        assert (await reply.receive()).message.return_code == 0
    assert not good_manager.closed.is_set()
    good_manager.close()
    good_kernel.close()


async def test_a_console_command_that_meets_a_bug_answers_an_error_and_the_kernel_goes_on():
    async def resolve(name: str):
        raise RuntimeError("a bug in the resolver")

    async with kernelsim.boot("k1", 4096, 16) as kernel:
        console = Console(kernel, resolve)
        answer = await console.execute("map obj 4K")
        assert answer == "error internal error in map: RuntimeError('a bug in the resolver') (see the log)"
        assert (await console.execute("allocate anon 8K")).startswith("ok allocate anon")
        assert (await console.execute("write anon+10 still here")).startswith("ok write")
        assert (await console.execute("read anon+10 10 text")).endswith("'still here'")

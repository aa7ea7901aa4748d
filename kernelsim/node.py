"""A kernel in a process of its own: `kernelsim run --connect ADDR --name k1 ...`.

The node connects to a manager (`fusepager mount` listens), finds memory objects by name with
the manager's name service, and runs the console's commands from a script or its standard
input.  If the manager goes away, the faults on its objects fail at once (its ports die with
the connection); the node keeps the pages its tasks had changed, tries to reconnect a bounded
number of times, and when an object of the same name is mapped again from a manager that came
back, returns those pages to it first: nothing a task wrote is lost.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import trio

from .console import Console, serve_stdin
from .interface import KERN_SUCCESS
from .ipc_port import SendRight, port_allocate
from .kernel import Kernel, boot
from .messages import NetnameLookUp
from .transport import Address, Connection

RECONNECT_DELAY = 0.5
RESOLVE_WAIT = 5.0  # how long `map` waits for a manager being reconnected to


class NodeError(Exception):
    """The node cannot run; the message says why."""


def say(text: str) -> None:
    """An information line: '#' first, so that a program reading answers can skip it."""
    print(f"# {text}", flush=True)


class Node:
    def __init__(self, kernel: Kernel, address: Address, retries: int) -> None:
        self.kernel = kernel
        self.address = address
        self.retries = retries
        self.connection: Connection | None = None
        self.connected = trio.Event()
        self.gave_up = False
        self.ending = False  # hanging up for good: a closed connection is not lost

    async def keep_connected(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and after a loss reconnect, up to `retries` attempts in a row."""
        started = False
        while True:
            async with trio.open_nursery() as nursery:
                connection = None
                for attempt in range(1, self.retries + 1):
                    connection = await self._attempt(nursery, attempt)
                    if connection is not None:
                        break
                    await trio.sleep(RECONNECT_DELAY)
                if connection is None:
                    say(f"gave up reaching the manager at {self.address} after {self.retries} attempts; mapped objects of it fail")
                    self.gave_up = True
                    self.connected.set()  # wake whoever waits for a connection: there will be none
                    if not started:
                        task_status.started()
                    return
                self.connection = connection
                self.connected.set()
                say(f"connected to manager {connection.peer_name} at {self.address}")
                if not started:
                    task_status.started()
                    started = True
                await connection.closed.wait()
            self.connection = None
            if self.ending:
                return
            self.connected = trio.Event()
            say(f"lost the manager at {self.address} ({connection.close_reason}); reconnecting")

    async def hang_up(self, timeout: float) -> None:
        """The end: the connection closed cleanly (Connection.hang_up), and no reconnecting."""
        self.ending = True
        if self.connection is not None:
            await self.connection.hang_up(timeout)

    async def _attempt(self, nursery: trio.Nursery, attempt: int) -> Connection | None:
        """One connection attempt: a greeted connection running in `nursery`, or None."""
        try:
            stream = await self.address.connect()
        except OSError as error:
            say(f"cannot reach the manager at {self.address} ({error.strerror or error}); attempt {attempt}/{self.retries}")
            return None
        connection = Connection(stream, local_name=self.kernel.name, on_log=say)
        nursery.start_soon(connection.run)
        await connection.settled.wait()
        if not connection.greeted:
            say(f"the manager at {self.address} did not greet us ({connection.close_reason}); attempt {attempt}/{self.retries}")
            return None
        return connection

    async def resolve(self, name: str) -> SendRight:
        """The memory object called `name` at the manager (netname_look_up)."""
        if self.connection is None and not self.gave_up:
            # Reconnecting: worth a short wait rather than an error.
            with trio.move_on_after(RESOLVE_WAIT):
                await self.connected.wait()
        connection = self.connection
        if connection is None or connection.peer_bootstrap is None:
            raise ValueError(f"not connected to a manager (at {self.address})")
        reply = port_allocate(f"{self.kernel.name} lookup reply")
        try:
            connection.peer_bootstrap.send(NetnameLookUp(name=name.encode(), reply=reply.make_send_once()))
            with trio.move_on_after(10):
                answer = (await reply.receive()).message
                if answer.return_code != KERN_SUCCESS or answer.port is None:
                    raise ValueError(f"no object {name!r} at the manager")
                return answer.port
            raise ValueError(f"the manager did not answer the lookup of {name!r}")
        finally:
            reply.destroy()


async def _script_lines(path: str) -> AsyncIterator[str]:
    with open(path) as script:
        for line in script:
            yield line


async def run(
    address: Address,
    name: str,
    page_size: int,
    memory_pages: int,
    cluster_pages: int,
    script: str | None,
    retries: int,
) -> None:
    async with boot(name, page_size, memory_pages, cluster_pages=cluster_pages) as kernel:
        node = Node(kernel, address, retries)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.keep_connected)
            if node.gave_up:
                raise NodeError(f"cannot reach the manager at {address}")
            console = Console(kernel, node.resolve)
            say(f"kernel {name}: {page_size}-byte pages, {memory_pages} frames; commands: help")
            if script is None or script == "-":
                prompt = (lambda: f"{name}:{console.current.name if console.current else 't1'}> ") if sys.stdin.isatty() else None
                await serve_stdin(console.execute, prompt=prompt)
            else:
                async for line in _script_lines(script):
                    answer = await console.execute(line)
                    if answer:
                        print(answer, flush=True)
            # The end: the kernel gives its objects back (changed pages, terminate), and the
            # node waits until that has reached the manager before it hangs up, cleanly.
            kernel.shutdown()
            await node.hang_up(10)
            nursery.cancel_scope.cancel()

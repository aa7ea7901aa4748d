"""A kernel in a process of its own: `kernelsim run --connect ADDR --name k1 ...`.

The node connects to a manager (`fusepager mount` listens), finds memory objects by name with
the manager's name service, and runs the console's commands from a script or its standard
input.  If the manager goes away, the faults on its objects fail at once (its ports die with
the connection); the node keeps the pages its tasks had changed and tries to reconnect for as
long as it takes (backing off to a try every RECONNECT_MAX_DELAY seconds).  When a manager
serves the address again, the node looks each such object up by name and returns the kept
pages to it (memory_object_init, data_return); mapping the object again does the same.  At
the end of its commands it waits for a manager if it still keeps pages: nothing a task wrote
is lost.  Only the first connection has a bounded number of attempts (--retries), so that a
wrong address is said soon.
"""

from __future__ import annotations

import math
import sys
from collections.abc import AsyncIterator, Callable

import trio

from .console import Console, serve_stdin
from .interface import KERN_SUCCESS, KernError, MachSendInvalidDest
from .ipc_port import SendRight, port_allocate
from .kernel import Kernel, boot
from .manager_wait import FAULT_WARNING
from .messages import NetnameLookUp
from .transport import Address, Connection

RECONNECT_DELAY = 0.5
"""Between the first connection's attempts (there are --retries of them)."""
RECONNECT_FIRST_DELAY = 0.1
RECONNECT_MAX_DELAY = 2.0
"""After losing its manager the node tries again and again, for as long as it takes, first
quickly, then backing off to this many seconds between tries."""
REMIND_EVERY = 60.0
"""While no manager answers, the node says so again this often."""
RESOLVE_WAIT = 5.0  # how long `map` waits for a manager being reconnected to


class NodeError(Exception):
    """The node cannot run; the message says why."""


class NoSuchObject(ValueError):
    """The manager has no memory object of that name (netname_look_up said so)."""


def say(text: str) -> None:
    """An information line: '#' first, so that a program reading answers can skip it."""
    print(f"# {text}", flush=True)


class Node:
    def __init__(self, kernel: Kernel, address: Address, retries: int) -> None:
        self.kernel = kernel
        self.address = address
        self.retries = retries  # attempts at the first connection; 0: for as long as it takes
        self.connection: Connection | None = None
        self.connected = trio.Event()
        self.gave_up = False
        self.ending = False  # hanging up for good: a closed connection is not lost
        self._returning = trio.Lock()  # one pass over the kept pages at a time

    async def keep_connected(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (up to `retries` attempts: a wrong address is said soon), then stay
        connected: after losing the manager, try again with no limit, backing off to
        RECONNECT_MAX_DELAY between tries, and give a manager that comes back the changed
        pages kept since the loss (`return_kept`).  There is no deadline: the kept pages are
        the store's, and only a manager of the store can take them."""
        started = False
        while True:
            async with trio.open_nursery() as nursery:
                connection = await (self._reconnect(nursery) if started else self._connect_first(nursery))
                if connection is None:
                    say(f"gave up reaching the manager at {self.address} after {self.retries} attempts")
                    self.gave_up = True
                    self.connected.set()  # wake whoever waits for a connection: there will be none
                    task_status.started()
                    return
                self.connection = connection
                self.connected.set()
                say(f"connected to manager {connection.peer_name} at {self.address}")
                if not started:
                    task_status.started()
                    started = True
                if self.kernel.orphans:
                    # Not cancelled when the connection goes: a pass that has taken kept pages
                    # puts back what it could not send (Kernel.return_orphans).
                    nursery.start_soon(self.return_kept)
                await connection.closed.wait()
                self.connection = None
                if self.ending:
                    return
                self.connected = trio.Event()
                kept = self._kept_text()
                say(f"lost the manager at {self.address} ({connection.close_reason}); reconnecting" + (f"; keeping {kept}" if kept else ""))

    async def hang_up(self, timeout: float) -> None:
        """The end: the connection closed cleanly (Connection.hang_up), and no reconnecting."""
        self.ending = True
        if self.connection is not None:
            await self.connection.hang_up(timeout)

    async def _connect_first(self, nursery: trio.Nursery) -> Connection | None:
        attempt = 0
        while not self.retries or attempt < self.retries:
            attempt += 1
            connection = await self._attempt(nursery, f"attempt {attempt}/{self.retries or 'unlimited'}")
            if connection is not None:
                return connection
            await trio.sleep(RECONNECT_DELAY)
        return None

    async def _reconnect(self, nursery: trio.Nursery) -> Connection:
        """Try until a manager answers at the address, saying so now and then."""
        delay = RECONNECT_FIRST_DELAY
        lost_at = trio.current_time()
        next_word = lost_at
        attempt = 0
        while True:
            attempt += 1
            now = trio.current_time()
            quiet = now < next_word
            if not quiet:
                next_word = now + REMIND_EVERY
            connection = await self._attempt(
                nursery, f"attempt {attempt}, {now - lost_at:.0f} s since the loss; trying again every {RECONNECT_MAX_DELAY:g} s at most", quiet=quiet
            )
            if connection is not None:
                return connection
            await trio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)

    async def _attempt(self, nursery: trio.Nursery, which: str, *, quiet: bool = False) -> Connection | None:
        """One connection attempt: a greeted connection running in `nursery`, or None."""
        try:
            stream = await self.address.connect()
        except OSError as error:
            if not quiet:
                say(f"cannot reach the manager at {self.address} ({error.strerror or error}); {which}")
            return None
        # A data_return the connection could not write before closing goes back to the kernel's
        # kept pages, for the next manager.
        connection = Connection(stream, local_name=self.kernel.name, on_log=say, on_undelivered=self.kernel.keep_undelivered)
        nursery.start_soon(connection.run)
        await connection.settled.wait()
        if not connection.greeted:
            if not quiet:
                say(f"the manager at {self.address} did not greet us ({connection.close_reason}); {which}")
            return None
        return connection

    def _kept_text(self) -> str:
        """'N changed pages of NAME, ...' for the pages kept from a lost manager ('' if none)."""
        return ", ".join(f"{len(pages)} changed pages of {name}" for name, pages in sorted(self.kernel.orphans.items()) if pages)

    async def return_kept(self) -> set[str]:
        """One pass over the objects whose changed pages were kept since a manager was lost:
        each is looked up by name at the manager now connected, and its pages go back to it
        (memory_object_init, then a data_return of each).  What cannot go stays kept; returns
        the names the manager said it has no object of."""
        unknown: set[str] = set()
        async with self._returning:
            for name in sorted(self.kernel.orphans):
                count = len(self.kernel.orphans.get(name, ()))
                if not count:
                    continue
                connection = self.connection
                try:
                    pager = await self.resolve(name)
                    try:
                        returned = await self.kernel.return_kept_pages(name, pager)
                    finally:
                        pager.deallocate()
                except NoSuchObject as error:
                    unknown.add(name)
                    say(f"still keeping {count} changed pages of {name}: {error}")
                    continue
                except (ValueError, KernError) as error:
                    say(f"still keeping {count} changed pages of {name}: {error}")
                    continue
                peer = connection.peer_name if connection is not None else "?"
                left = len(self.kernel.orphans.get(name, ()))
                say(f"returned {returned} changed pages of {name}, kept since the manager was lost, to manager {peer}" + (f"; {left} still kept" if left else ""))
        return unknown

    async def return_kept_before_exit(self) -> None:
        """At the end of the commands: changed pages kept from a lost manager must reach a
        manager of the store before the kernel goes, so wait for one (interrupt to drop them)."""
        if not self.kernel.orphans:
            return
        say(f"keeping {self._kept_text()} for the manager at {self.address}: waiting for it before exiting (interrupt to drop them)")
        while self.kernel.orphans:
            if self.connection is None or self.connection.closed.is_set():
                await self.connected.wait()
                if self.gave_up:
                    break
                continue
            unknown = await self.return_kept()
            if set(self.kernel.orphans) <= unknown:
                break  # the manager is there and has no such objects: nobody will take them
            if self.kernel.orphans:
                await trio.sleep(RECONNECT_MAX_DELAY)  # it did not answer in time: ask again
        if self.kernel.orphans:
            say(f"dropping {self._kept_text()}: no manager of the store took them")

    async def resolve(self, name: str) -> SendRight:
        """The memory object called `name` at the manager (netname_look_up)."""
        if self.connection is None and not self.gave_up:
            # Reconnecting: worth a short wait rather than an error.
            with trio.move_on_after(RESOLVE_WAIT):
                await self.connected.wait()
        connection = self.connection
        if connection is None or connection.peer_bootstrap is None:
            raise ValueError(f"not connected to a manager (at {self.address}); reconnecting")
        reply = port_allocate(f"{self.kernel.name} lookup reply")
        try:
            try:
                connection.peer_bootstrap.send(NetnameLookUp(name=name.encode(), reply=reply.make_send_once()))
            except MachSendInvalidDest:
                raise ValueError(f"lost the manager at {self.address} while looking up {name!r}; reconnecting") from None
            with trio.move_on_after(10):
                answer = (await reply.receive()).message
                if answer.return_code != KERN_SUCCESS or answer.port is None:
                    raise NoSuchObject(f"no object {name!r} at the manager")
                return answer.port
            raise ValueError(f"the manager did not answer the lookup of {name!r}")
        finally:
            reply.destroy()


class Commands:
    """Standard input's commands, run one after the other, in order, by one worker; but `stat`
    is answered at once, even while an earlier command waits (for a stopped manager, say):
    it only reads the kernel's counters, and shows which faults wait and for how long."""

    def __init__(self, console: Console, prompt: Callable[[], str] | None = None) -> None:
        self.console = console
        self.prompt = prompt  # on a terminal: shown when the worker is ready for more
        self._send, self._receive = trio.open_memory_channel[str](math.inf)
        self._queued = 0

    async def take(self, line: str) -> str:
        """For serve_stdin: the answer to `stat`; every other line is queued ('' here)."""
        if line.strip() == "stat":
            return await self.console.execute(line)
        self._queued += 1
        self._send.send_nowait(line)
        return ""

    def end(self) -> None:
        """No more lines: the worker finishes those queued, then returns."""
        self._send.close()

    async def work(self) -> None:
        self._show_prompt()
        async with self._receive:
            async for line in self._receive:
                answer = await self.console.execute(line)
                self._queued -= 1
                if answer:
                    print(answer, flush=True)
                if not self._queued:
                    self._show_prompt()

    def _show_prompt(self) -> None:
        if self.prompt is not None:
            print(self.prompt(), end="", flush=True)


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
    *,
    fault_warning: float = FAULT_WARNING,
    fault_timeout: float | None = None,
) -> None:
    async with boot(
        name, page_size, memory_pages, cluster_pages=cluster_pages, fault_warning=fault_warning, fault_timeout=fault_timeout
    ) as kernel:
        kernel.on_warning = lambda text: say(f"warning: {text}")
        node = Node(kernel, address, retries)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.keep_connected)
            if node.gave_up:
                raise NodeError(f"cannot reach the manager at {address}")
            console = Console(kernel, node.resolve)
            say(f"kernel {name}: {page_size}-byte pages, {memory_pages} frames; commands: help")
            if script is None or script == "-":
                prompt = (lambda: f"{name}:{console.current.name if console.current else 't1'}> ") if sys.stdin.isatty() else None
                commands = Commands(console, prompt)
                async with trio.open_nursery() as workers:
                    workers.start_soon(commands.work)
                    await serve_stdin(commands.take)
                    commands.end()
            else:
                async for line in _script_lines(script):
                    answer = await console.execute(line)
                    if answer:
                        print(answer, flush=True)
            # The end: pages kept from a lost manager go back to one first; then the kernel gives
            # its objects back (changed pages, terminate), and the node waits until that has
            # reached the manager before it hangs up, cleanly.
            await node.return_kept_before_exit()
            kernel.shutdown()
            await node.hang_up(10)
            nursery.cancel_scope.cancel()

"""The daemon's last steps with its kernels: their changes come back before it goes.

At unmount (fusermount3 -u, `fusepager umount`, SIGTERM, Ctrl-C) the FUSE loop has stopped,
but the pagers and the connections to kernel processes still run.  Before anything closes:

1. `gather_changes`: every kernel, in the daemon or in a process of its own, is asked to
   return what its tasks changed in every object (memory_object_lock_request with
   MEMORY_OBJECT_RETURN_DIRTY over the whole object; `Pager.sync_every_kernel`), and the
   daemon waits for each memory_object_lock_completed, for at most a bounded time.  A kernel
   that does not answer (stopped, hung) is named, with the object and the pages it held
   writable, in the trace and the daemon's log: those pages stay with it, and a kernel process
   returns them to the next daemon serving the store.
2. `hang_up_kernels`: each kernel process's connection is closed cleanly (it reads the end of
   the stream, keeps trying to reconnect, and faults on the daemon's objects fail at once).

Then the daemon's own kernels shut down and the store closes (mount.serve).
"""

from __future__ import annotations

import logging

import trio

from .manager import FileManager, display_name

log = logging.getLogger("fusepager.unmount")

RETURN_WAIT = 10.0
"""Seconds the daemon waits at unmount for kernels to return their changes (--unmount-wait)."""
HANG_UP_WAIT = 5.0
"""Seconds a kernel process has to close its side of the connection at the end."""


def _ranges(pages: list[int], page_size: int) -> str:
    """Page offsets as OFFSET+LENGTH runs of adjacent pages ('0x0+8192 0x10000+4096')."""
    runs: list[list[int]] = []
    for page in sorted(pages):
        if runs and page == runs[-1][1]:
            runs[-1][1] += page_size
        else:
            runs.append([page, page + page_size])
    return " ".join(f"{start:#x}+{end - start}" for start, end in runs) or "none"


async def gather_changes(manager: FileManager, timeout: float, stop_waiting: trio.Event | None = None) -> list[str]:
    """Every kernel returns its changes to every object, all objects at once, within `timeout`
    seconds (or until `stop_waiting` is set); the lines naming what did not come back (also
    traced and logged).  A `timeout` of 0 asks nothing."""
    missing: list[str] = []
    if timeout <= 0:
        # --unmount-wait 0: kernel processes keep their changes for the next daemon; the
        # daemon's own kernels still return theirs as they shut down.
        manager.trace.line("manager: unmounting without asking kernels for their changes (--unmount-wait 0)")
        log.warning("unmount: kernel processes were not asked for their changes (--unmount-wait 0); they keep them for the next daemon")
        return missing

    started = trio.current_time()
    deadline = started + timeout
    scopes: list[trio.CancelScope] = []

    async def one(name: bytes) -> None:
        pager = manager.pagers.get(name)
        if pager is None:
            return
        scope = trio.CancelScope(deadline=deadline)
        scopes.append(scope)
        for label, pages, page_size in await pager.sync_every_kernel(scope):
            missing.append(
                f"unmount: kernel {label} did not return its changes to object {display_name(name)} "
                f"{'before the wait was cut short' if stop_waiting is not None and stop_waiting.is_set() else f'within {trio.current_time() - started:.0f} s'} "
                f"(pages it held writable: {_ranges(pages, page_size)}); they stay with it until a daemon serves this store again"
            )

    if manager.pagers:
        manager.trace.line(f"manager: unmounting; every kernel returns its changes (waiting {timeout:g} s at most)")
    async def cut_short() -> None:
        if stop_waiting is not None:
            await stop_waiting.wait()
            for scope in scopes:
                scope.cancel()

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as syncs:
            nursery.start_soon(cut_short)
            for name in list(manager.pagers):
                syncs.start_soon(one, name)
        nursery.cancel_scope.cancel()
    for line in missing:
        manager.trace.line(line)
        log.warning("%s", line)
    return missing


async def hang_up_kernels(manager: FileManager, timeout: float = HANG_UP_WAIT) -> None:
    """Close every kernel process's connection cleanly (and at once where it does not follow)."""
    async with trio.open_nursery() as nursery:
        for connection in list(manager.connections):
            nursery.start_soon(connection.hang_up, timeout)
    for connection in list(manager.connections):
        connection.close("the daemon is unmounting")

"""Running a mount: the daemon's life from pyfuse3.init to a clean unmount.

`serve()` mounts a FileStore, runs its pagers, optional in-process kernels and their console,
and unmounts in order when the mount is unmounted (fusermount3 -u, `fusepager umount`) or the
process gets SIGINT or SIGTERM: first the FUSE loop stops; then every kernel, in the daemon or
in a process of its own, returns its changes while the connections are still open (a bounded
wait; who did not is reported, see unmounting.py); then the kernel processes are hung up on,
the daemon's own kernels shut down, and the store is closed.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import subprocess
import threading
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

import kernelsim
from kernelsim.console import Console, serve_stdin
from kernelsim.interface import KernError
from kernelsim.kernel import check_configuration as check_kernel_configuration
from kernelsim.transport import UNIX_PATH_MAX, Address, Connection

from .fs import PagerFS
from .manager import FileManager
from .store import FileStore, StoreError
from .trace import TRACE_KEEP, TRACE_SEGMENT, Trace
from .unmounting import RETURN_WAIT, gather_changes, hang_up_kernels

log = logging.getLogger("fusepager.mount")

UNMOUNT_WAIT = 30.0
READAHEAD_KB = 1024
"""Linux reads ahead this much of `data`: FUSE then reads in 1 MiB requests instead of 128 KiB
ones, which is most of what sequential reads through the mount cost."""


class MountError(Exception):
    """The mount cannot be made or unmade; the message says why and what to do."""


@dataclass(frozen=True)
class KernelSpec:
    """An in-process kernel: NAME:PAGE_SIZE[:MEMORY_PAGES[:CLUSTER_PAGES]]."""

    name: str
    page_size: int
    memory_pages: int = 1024
    cluster_pages: int = 1

    @classmethod
    def parse(cls, text: str) -> KernelSpec:
        parts = text.split(":")
        if not 2 <= len(parts) <= 4 or not parts[0]:
            raise ValueError(f"kernel {text!r}: use NAME:PAGE_SIZE[:MEMORY_PAGES[:CLUSTER_PAGES]], e.g. k1:4096:256")
        try:
            numbers = [int(part, 0) for part in parts[1:]]
        except ValueError:
            raise ValueError(f"kernel {text!r}: page size, memory and cluster must be numbers") from None
        spec = cls(parts[0], *numbers)
        try:
            # Refused here, with the option named, rather than when the kernel boots.
            check_kernel_configuration(spec.page_size, spec.memory_pages, spec.cluster_pages)
        except KernError as error:
            raise ValueError(f"kernel {text!r}: {error}") from None
        return spec


# -- the state of a mount point --------------------------------------------------------------


def mount_entry(mountpoint: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(fstype, source) of what is mounted exactly at `mountpoint`, from /proc/mounts."""
    target = os.path.abspath(mountpoint)
    found = None
    with open("/proc/mounts") as mounts:
        for line in mounts:
            source, point, fstype, *_ = line.split()
            if point.encode().decode("unicode_escape") == target:
                found = (fstype, source)
    return found


def mount_state(mountpoint: str | os.PathLike[str]) -> str:
    """'free', 'mounted' (a live FUSE mount), 'stale' (its daemon is gone) or 'other'."""
    entry = mount_entry(mountpoint)
    if entry is None:
        return "free"
    if not entry[0].startswith("fuse"):
        return "other"
    try:
        os.stat(mountpoint)
    except OSError as error:
        # A FUSE connection whose daemon died answers ENOTCONN (or ECONNABORTED once aborted).
        if error.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return "stale"
        raise
    return "mounted"


def check_mountpoint(mountpoint: str) -> None:
    state = mount_state(mountpoint) if os.path.lexists(mountpoint) or mount_entry(mountpoint) else "missing"
    if state == "missing":
        raise MountError(f"mount point {mountpoint} does not exist: mkdir -p {mountpoint}")
    if state == "stale":
        raise MountError(
            f"{mountpoint} is a stale FUSE mount: the daemon that served it is gone.\n"
            f"Clear it with:  fusepager umount {mountpoint}   (or: fusermount3 -u {mountpoint})"
        )
    if state in ("mounted", "other"):
        raise MountError(f"{mountpoint} is already a mount point; unmount it first: fusepager umount {mountpoint}")
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory")


ANSWER_WAIT = 5.0
"""Seconds `unmount` waits for the daemon to answer a stat of its mount point."""


class _NoAnswer(Exception):
    """The daemon did not answer in time (stopped, or hung)."""


def _answered(call, timeout: float):
    """`call()`'s result, or _NoAnswer if it has not returned within `timeout` seconds.  It runs
    in a thread of its own: a request to a stopped daemon waits for ever, and only this
    process's exit ends that wait."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as error:  # handed to the caller below
            box["error"] = error

    thread = threading.Thread(target=run, name="ask the daemon", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise _NoAnswer
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


def unmount(mountpoint: str, *, wait: float = UNMOUNT_WAIT) -> str:
    """Unmount a fusepager mount (live or stale) and wait for its daemon to finish; a message."""
    try:
        state = _answered(lambda: mount_state(mountpoint), ANSWER_WAIT)
    except _NoAnswer:
        # Our stat waits in the mount, so only a lazy unmount can take it away now.
        result = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, text=True)
        if result.returncode != 0:
            raise MountError(f"fusermount3 -u -z {mountpoint} failed: {result.stderr.strip()}") from None
        return (
            f"unmounted {mountpoint}; its daemon does not answer (stopped or hung: see its state with ps), "
            "and finishes once it runs again"
        )
    if state == "free":
        raise MountError(f"{mountpoint} is not mounted")
    if state == "other":
        raise MountError(f"{mountpoint} is not a FUSE mount; not touching it")
    pid = None
    if state == "mounted":
        try:
            pid = int(_answered(lambda: os.getxattr(mountpoint, "user.fusepager.pid"), ANSWER_WAIT))
        except (OSError, ValueError, _NoAnswer):
            pid = None
    result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if result.returncode != 0 and state == "stale":
        result = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        raise MountError(f"fusermount3 -u {mountpoint} failed: {result.stderr.strip()}")
    if pid is None:
        return f"unmounted {mountpoint}" + (" (it was stale)" if state == "stale" else "")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not _running(pid):
            return f"unmounted {mountpoint}; daemon {pid} finished"
        time.sleep(0.05)
    return f"unmounted {mountpoint}; daemon {pid} is still finishing (kill it with: kill {pid})"


def _running(pid: int) -> bool:
    """Whether process `pid` still runs: a zombie (finished, not yet reaped by its parent, such
    as a script that started the daemon and has not waited for it yet) has finished."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def set_readahead(mountpoint: str, kilobytes: int) -> None:
    """Set the mount's read-ahead through its backing device in sysfs (libfuse offers no
    option for it).  The device number comes from /proc/self/mountinfo: a stat of the mount
    point would ask this very process, which is not serving yet."""
    target = os.path.abspath(mountpoint)
    device = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[4].encode().decode("unicode_escape") == target:
                device = fields[2]
    if device is None:
        log.warning("read-ahead left as it is: %s not found in /proc/self/mountinfo", target)
        return
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as setting:
            setting.write(str(kilobytes))
    except OSError as error:
        log.warning("read-ahead left as it is (%s): %s", device, error.strerror)


# -- the daemon ------------------------------------------------------------------------------


class KernelConsoles:
    """The in-process kernels' consoles on one input: `KERNEL COMMAND`, or just `COMMAND`
    when there is one kernel.  Answers are prefixed with the kernel's name."""

    def __init__(self, consoles: dict[str, Console]) -> None:
        self.consoles = consoles

    async def execute(self, line: str) -> str:
        words = line.split(maxsplit=1)
        if not words or words[0].startswith("#"):
            return ""
        if words[0] in self.consoles:
            name, rest = words[0], words[1] if len(words) > 1 else "help"
        elif len(self.consoles) == 1:
            name, rest = next(iter(self.consoles)), line
        else:
            return f"error begin the line with a kernel: {' '.join(self.consoles)}"
        answer = await self.consoles[name].execute(rest)
        return "\n".join(f"{name} {part}" if not part.startswith("#") else part for part in answer.split("\n"))


async def serve(
    store_path: str,
    mountpoint: str,
    *,
    fuse_options: set[str] | None = None,
    kernels: list[KernelSpec] | None = None,
    console: bool = False,
    debug: bool = False,
    readahead_kb: int = READAHEAD_KB,
    default_manager: bool = True,
    listen: Address | None = None,
    unmount_wait: float = RETURN_WAIT,
    on_ready=None,
    trace_size: int = TRACE_SEGMENT,
    trace_keep: int = TRACE_KEEP,
) -> None:
    """Mount, serve until unmounted or signalled, then shut down in order: every kernel
    returns its changes (for `unmount_wait` seconds at most), the kernel processes are hung up
    on, the daemon's own kernels shut down, the store closes."""
    check_mountpoint(mountpoint)
    try:
        store = FileStore(store_path)
    except StoreError as error:
        raise MountError(f"store {store_path}: {error}") from None
    listeners: list[trio.SocketListener] = []
    if listen is not None:
        # Before mounting: a daemon that cannot take kernels must not leave a mount behind.
        try:
            listeners = await listen.listeners()
        except OSError as error:
            store.close()
            raise MountError(f"cannot listen on {listen}: {error.strerror or error}") from None
    try:
        # The trace lives in the store (STORE/trace/trace, trace.1, ...): the mount shows it.
        trace = Trace(Path(store_path) / "trace", segment_size=trace_size, keep=trace_keep)
    except (OSError, ValueError) as error:
        _close_listeners(listeners, listen)
        store.close()
        raise MountError(f"store {store_path}: cannot keep the trace in {Path(store_path) / 'trace'}: {error}") from None
    manager = FileManager(store, trace)
    operations = PagerFS(manager)
    options = set(pyfuse3.default_options) | {"fsname=fusepager", "subtype=fusepager"} | (fuse_options or set())
    if debug:
        options.add("debug")
    try:
        pyfuse3.init(operations, mountpoint, options)
    except RuntimeError as error:
        _close_listeners(listeners, listen)
        store.close()
        raise MountError(f"cannot mount {mountpoint}: {error} (is /dev/fuse there, and fuse3 installed?)") from None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            async with AsyncExitStack() as stack:
                booted = {}
                for spec in kernels or []:
                    kernel = await stack.enter_async_context(
                        kernelsim.boot(spec.name, spec.page_size, spec.memory_pages, cluster_pages=spec.cluster_pages)
                    )
                    if default_manager:
                        kernel.vm_set_default_memory_manager(manager.default.send_right())
                    booted[spec.name] = kernel
                manager.trace.line(
                    f"manager serving store {os.path.abspath(store_path)} at {os.path.abspath(mountpoint)}"
                    + (f" with kernels {' '.join(booted)}" if booted else "")
                )
                async def when_serving() -> None:
                    # Linux applies its FUSE_INIT settings (read-ahead among them) when the
                    # daemon answers FUSE_INIT: ours must come after, and "mounted" after that.
                    await operations.initialized.wait()
                    set_readahead(mountpoint, readahead_kb)
                    if console and booted:
                        consoles = KernelConsoles({name: Console(kernel, manager.resolve) for name, kernel in booted.items()})
                        nursery.start_soon(serve_stdin, consoles.execute)
                    if on_ready is not None:
                        on_ready()

                accepting = trio.CancelScope()
                if listeners:
                    nursery.start_soon(_accept_kernels, listeners, manager, nursery, accepting)
                    manager.trace.line(f"manager: kernels connect to {listen}")

                stopping = _Stopping()
                nursery.start_soon(_watch_signals, stopping, operations)
                with stopping.fuse:
                    nursery.start_soon(when_serving)
                    await pyfuse3.main()
                # The FUSE loop has stopped (the mount is gone, or goes at pyfuse3.close); the
                # pagers and the kernels' connections still run.  No new kernel comes in, and
                # every kernel, in this process or not, returns its changes before anything
                # closes; then the kernel processes are hung up on.
                stopping.unmounting = True
                # Nobody serves Linux's write-backs any more: a drop of its cache would wait for
                # ever (the kernels' returns below would start some).
                operations.stop_serving()
                accepting.cancel()
                _close_listeners(listeners, listen)
                await gather_changes(manager, unmount_wait, stopping.stop_waiting)
                await hang_up_kernels(manager)
                manager.trace.line("manager: unmounting; the daemon's own kernels shut down and return their pages")
            # The kernels are down: what they returned is queued for the pagers.  Let it land.
            with trio.move_on_after(UNMOUNT_WAIT):
                await manager.idle()
                await manager.store_unstored()
            nursery.cancel_scope.cancel()
    finally:
        _close_listeners(listeners, listen)
        manager.close()
        pyfuse3.close(unmount=True)


def _close_listeners(listeners: list[trio.SocketListener], listen: Address | None) -> None:
    """Stop listening and remove the socket file, once (the list is emptied): removing it again
    later could remove the socket of a daemon started since on the same store."""
    if listen is not None and listeners:
        listen.remove()
    for listener in listeners:
        listener.socket.close()
    listeners.clear()


MAX_KERNEL_CONNECTIONS = 64
PAGE_CACHE_WAIT = 70.0
"""Seconds a signalled daemon keeps serving while a drop of Linux's cache is under way (its
write-backs may wait for kernels' lock_completed, up to the engine's 30 s lock timeout)."""


def default_listen(store_path: str) -> Address:
    """STORE/fusepager.sock; where that path is too long for a Unix socket, a short one in /tmp
    named after the store, so a manager restarted on the same store listens at the same place."""
    path = os.path.join(os.path.abspath(store_path), "fusepager.sock")
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        digest = hashlib.sha256(os.fsencode(os.path.abspath(store_path))).hexdigest()[:16]
        path = f"/tmp/fusepager-{digest}.sock"
    return Address("unix", path=path)


async def _accept_kernels(
    listeners: list[trio.SocketListener], manager: FileManager, home: trio.Nursery, accepting: trio.CancelScope
) -> None:
    """Each kernel process that connects gets a connection whose bootstrap port is the name
    service; its objects' control ports come through it as proxies.  The connections live in
    `home`, so that cancelling `accepting` (at unmount) stops new ones and leaves those open
    for the kernels to return their changes."""

    async def serve(stream: trio.abc.Stream) -> None:
        if len(manager.connections) >= MAX_KERNEL_CONNECTIONS:
            # Each connection may buffer up to a frame: their number must be bounded too.
            manager.trace.line(f"manager: refused a connection: {MAX_KERNEL_CONNECTIONS} are open already")
            await stream.aclose()
            return
        connection = Connection(stream, local_name="fusepager", bootstrap=manager.name_service, on_log=manager.trace.line)
        manager.connections.add(connection)
        try:
            await connection.run()
        except Exception:
            log.exception("connection from a kernel failed")
        finally:
            manager.connections.discard(connection)

    with accepting:
        await trio.serve_listeners(serve, listeners, handler_nursery=home)


class _Stopping:
    """How the daemon stops: `fuse` is cancelled to stop the FUSE loop (a signal),
    `stop_waiting` set to stop waiting for kernels at unmount (a signal then)."""

    def __init__(self) -> None:
        self.fuse = trio.CancelScope()
        self.stop_waiting = trio.Event()
        self.unmounting = False  # the FUSE loop has stopped: the kernels are being waited for


async def _watch_signals(stopping: _Stopping, operations: PagerFS) -> None:
    """SIGINT or SIGTERM unmounts; one more while kernels are returning their changes stops
    waiting for them (what they did not return stays with them, and is reported)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for number in signals:
            name = signal.Signals(number).name
            if not stopping.unmounting:
                log.warning("got %s: unmounting", name)
                # A drop of Linux's cache under way waits for write-backs this loop serves:
                # stopping now would leave it (and the program whose pages it writes back)
                # stuck for good.
                with trio.move_on_after(PAGE_CACHE_WAIT):
                    await operations.page_cache_quiet()
                stopping.unmounting = True
                stopping.fuse.cancel()
            else:
                log.warning("got %s while unmounting: not waiting any more for kernels to return their changes", name)
                stopping.stop_waiting.set()


def daemon_log_path(store_path: str) -> Path:
    return Path(store_path) / "fusepager.log"

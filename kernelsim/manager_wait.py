"""Faults waiting for their memory manager: said, shown, and (if asked) given up.

Mach waits for a manager as long as it takes: a fault that sent memory_object_data_request (or
data_unlock, or waits for memory_object_ready) sleeps until the answer comes.  A manager that
is stopped (SIGSTOP, a debugger, a swapped-out host) then hangs its kernel's tasks with no
word.  So every such wait goes through `wait_for_manager`, which

- records the fault in `kernel.waiting_faults` (the console's `stat` lists them, with how long
  each has waited);
- has the kernel warn (`Kernel.warn`) once a fault has waited `kernel.fault_warning` seconds,
  naming the object, the offset and the manager, and again when the answer finally comes;
- with `kernel.fault_timeout` set, fails the fault after that many seconds with a
  KernMemoryError (KERN_MEMORY_ERROR) in the task instead of waiting on.  The request stays
  out: if the answer comes later, the page is there for the next fault.

The warnings come from one watchdog task per kernel (`fault_watchdog`, started by `boot`), so a
fault pays only for a set insertion, and for a deadline when there is a timeout.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .interface import KERN_MEMORY_ERROR, KernInvalidArgument, KernMemoryError

if TYPE_CHECKING:
    from .kernel import Kernel
    from .vm_object import VMObject

FAULT_WARNING = 5.0
"""Seconds a fault waits for its manager before the kernel says so (0: never)."""
MAX_WAIT_SETTING = 7 * 24 * 3600.0
"""The longest fault warning or timeout accepted: a week (more is surely a mistake)."""
WATCHDOG_INTERVAL = 0.5
"""How often the watchdog looks at the waiting faults (at most: shorter warnings look sooner)."""


def check_wait_setting(seconds: float | None, what: str, *, zero_allowed: bool) -> float | None:
    """`seconds` if it is a sane setting for `what` (None passes: no setting); otherwise
    KernInvalidArgument saying what is accepted."""
    if seconds is None:
        return None
    accepted = f"from 0 to {MAX_WAIT_SETTING:.0f} (a week)" if zero_allowed else f"above 0, at most {MAX_WAIT_SETTING:.0f} (a week)"
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise KernInvalidArgument(f"{what} {seconds!r} is not a number of seconds: give one {accepted}", seconds=seconds)
    if seconds < 0 or (seconds == 0 and not zero_allowed) or seconds > MAX_WAIT_SETTING:
        raise KernInvalidArgument(f"{what} {seconds!r} s is out of range: give a number of seconds {accepted}", seconds=seconds)
    return float(seconds)


def manager_name(object: VMObject) -> str:
    """Who serves the object, as a person would name it: the manager process's name for a
    kernel in a process of its own, else the memory object port's label."""
    port = object.pager.port if object.pager is not None else None
    if port is None:
        return "no manager"
    return port.host or port.label or f"port {port.name}"


def object_name(object: VMObject) -> str:
    """The name a task mapped the object by, if any, else the kernel's label for it."""
    return object.tag or object.label


@dataclass(eq=False)
class WaitingFault:
    """A fault waiting for its manager's answer."""

    object: VMObject
    offset: int
    waiting_for: str  # the call the manager has not answered: memory_object_data_request, ...
    started: float = field(default_factory=trio.current_time)
    warned: bool = False

    def waited(self, now: float | None = None) -> float:
        return (trio.current_time() if now is None else now) - self.started

    def describe(self, now: float | None = None) -> str:
        return (
            f"object {object_name(self.object)} offset {self.offset:#x}: waiting {self.waited(now):.1f} s for "
            f"manager {manager_name(self.object)} to answer {self.waiting_for}"
        )


async def wait_for_manager(object: VMObject, offset: int, waiting_for: str, wait: Callable[[], Awaitable[object]]) -> None:
    """Run `wait()` (a wait for the manager's answer) as a waiting fault: listed, warned about,
    and failed with KernMemoryError after `kernel.fault_timeout` seconds if that is set."""
    kernel = object.kernel
    fault = WaitingFault(object, offset, waiting_for)
    kernel.waiting_faults.add(fault)
    try:
        if kernel.fault_timeout is None:
            await wait()
        else:
            with trio.move_on_at(fault.started + kernel.fault_timeout) as scope:
                await wait()
            if scope.cancelled_caught:
                kernel.stats.fault_timeouts += 1
                kernel.warn(f"fault failed after {kernel.fault_timeout:g} s (the fault timeout): {fault.describe()}")
                raise KernMemoryError(
                    offset,
                    KERN_MEMORY_ERROR,
                    f"no answer from manager {manager_name(object)} to {waiting_for} within {kernel.fault_timeout:g} s "
                    f"(object {object_name(object)})",
                )
        if fault.warned:
            # Whoever heard of the wait hears of its end too.
            how = "was answered" if object.alive else f"ended ({object.death_message})"
            kernel.warn(f"the fault on object {object_name(object)} offset {offset:#x} {how} after {fault.waited():.1f} s")
    finally:
        kernel.waiting_faults.discard(fault)


async def fault_watchdog(kernel: Kernel) -> None:
    """Warn about each fault that has waited `kernel.fault_warning` seconds, once."""
    while True:
        warning = kernel.fault_warning
        await trio.sleep(min(WATCHDOG_INTERVAL, warning / 4) if warning else WATCHDOG_INTERVAL)
        if not warning or not kernel.waiting_faults:
            continue
        now = trio.current_time()
        for fault in sorted(kernel.waiting_faults, key=lambda fault: fault.started):
            if not fault.warned and fault.waited(now) >= warning:
                fault.warned = True
                kernel.warn(f"fault still waiting: {fault.describe(now)}")


def waiting_report(kernel: Kernel) -> list[str]:
    """One line per waiting fault, the longest waiting first (for `stat`)."""
    now = trio.current_time()
    return [fault.describe(now) for fault in sorted(kernel.waiting_faults, key=lambda fault: fault.started)]

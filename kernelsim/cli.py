"""The `kernelsim` command."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from functools import partial

from . import __version__, messages

DESCRIPTION = """\
kernelsim: a simulated Mach kernel that maps memory objects into simulated tasks and pages them
in and out through external memory managers, speaking the GNU Mach External Memory Management
protocol (memory_object_init, memory_object_data_request, memory_object_data_supply, ...).

Kernels are used from Python (see README.md and docs/architecture.md):

    async with kernelsim.boot("k1", page_size=4096, memory_pages=256) as kernel:
        task = await kernel.task_create()
        address = await task.vm_map(object_port.make_send(), 16 * 4096)
        data = await task.read(address, 100)
"""

EPILOG = """\
examples:
  kernelsim run --connect unix:/srv/store/fusepager.sock --name k1 --page-size 16384
                                  a kernel in this process, connected to a fusepager mount,
                                  taking console commands on stdin (map hello 64K, read hello 16)
  kernelsim run --connect tcp:127.0.0.1:7000 --name k2 script.txt
                                  the same, running the commands of script.txt
  kernelsim messages              every EMM message kind with its GNU Mach number and fields
  kernelsim messages --direction manager-to-kernel
  python examples/hello_pager.py  a task faulting pages from a small manager, narrated
"""

DIRECTIONS = {
    "kernel-to-manager": messages.KERNEL_TO_MANAGER,
    "manager-to-kernel": messages.MANAGER_TO_KERNEL,
}


def _field_text(cls: type[messages.Message]) -> str:
    hints = typing.get_type_hints(cls)
    integers = messages.integer_types(cls)
    parts = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if field.name in integers:
            kind = integers[field.name].name  # kern_return_t, vm_offset_t: says which values fit
        else:
            kind = getattr(hint, "__name__", None) or str(hint).replace("kernelsim.ipc_port.", "")
        parts.append(f"{field.name}: {kind}")
    return ", ".join(parts)


def list_messages(direction: str | None) -> None:
    kinds = DIRECTIONS[direction] if direction else sorted(messages.MESSAGE_TYPES.values(), key=lambda c: c.msg_id)
    print(f"{'id':>5}  {'message':<36} fields")
    for cls in kinds:
        print(f"{cls.msg_id:>5}  {cls.mach_name:<36} {_field_text(cls)}")


MAX_RETRIES = 1_000_000

HELP_EPILOG = """\
console commands (one a line; 'help' lists them all):
  map NAME SIZE          map the manager's object NAME     read WHERE LEN [text]
  write WHERE TEXT       writehex WHERE HEX                 fork [NAME]   task NAME
  copy WHERE SIZE WHERE  protect WHERE SIZE PROT            region WHERE  stat   sync

stat answers at once, even while an earlier command waits for its manager: the counters, then
faults_waiting=N longest_wait=SECONDS, then a line '# fault object NAME offset OFFSET: waiting
S s for manager MANAGER to answer CALL' for each fault waiting.
"""


def _run(args: argparse.Namespace) -> int:
    import trio

    from .interface import KernError
    from .manager_wait import FAULT_WARNING
    from .node import NodeError, run
    from .transport import Address

    try:
        address = Address.parse(args.connect)
    except ValueError as error:
        print(f"kernelsim run: {error}", file=sys.stderr)
        return 2
    if not 0 <= args.retries <= MAX_RETRIES:
        print(f"kernelsim run: --retries {args.retries}: give 0 (no limit) to {MAX_RETRIES}", file=sys.stderr)
        return 2
    try:
        fault_warning = _seconds(args.fault_warning, "--fault-warning", zero_allowed=True)
        fault_timeout = _seconds(args.fault_timeout, "--fault-timeout", zero_allowed=False)
    except ValueError as error:
        print(f"kernelsim run: {error}", file=sys.stderr)
        return 2
    if args.script not in (None, "-") and not os.path.isfile(args.script):
        print(f"kernelsim run: {args.script}: no such script", file=sys.stderr)
        return 2
    try:
        trio.run(
            partial(run, fault_warning=FAULT_WARNING if fault_warning is None else fault_warning, fault_timeout=fault_timeout),
            address, args.name, args.page_size, args.memory, args.cluster, args.script, args.retries,
        )  # fmt: skip
    except KeyboardInterrupt:
        return 130
    except (KernError, NodeError, BaseExceptionGroup) as error:
        reason = _expected(error, (KernError, NodeError))
        if reason is None:
            raise
        print(f"kernelsim run: {reason}", file=sys.stderr)
        return 1
    return 0


def _seconds(text: str | None, option: str, *, zero_allowed: bool) -> float | None:
    """A number of seconds given on the command line, range-checked (manager_wait); None if
    the option was not given.  ValueError with what is accepted otherwise."""
    from .interface import KernInvalidArgument
    from .manager_wait import MAX_WAIT_SETTING, check_wait_setting

    if text is None:
        return None
    accepted = f"from 0 to {MAX_WAIT_SETTING:.0f} (a week)" if zero_allowed else f"above 0, at most {MAX_WAIT_SETTING:.0f} (a week)"
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{option} {text!r}: not a number of seconds (give one {accepted})") from None
    try:
        return check_wait_setting(seconds, option.lstrip("-").replace("-", " "), zero_allowed=zero_allowed)
    except KernInvalidArgument:
        raise ValueError(f"{option} {text!r}: give a number of seconds {accepted}") from None


def _expected(error: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """`error` if it is one of `kinds`, or the first such inside an exception group."""
    if isinstance(error, kinds):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _expected(inner, kinds)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kernelsim",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kernelsim {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    listing = commands.add_parser("messages", help="list the protocol's message kinds with their numbers and fields")
    listing.add_argument("--direction", choices=sorted(DIRECTIONS), help="only the messages going one way")
    node = commands.add_parser(
        "run",
        help="run a kernel connected to a manager, driven by console commands",
        description="""\
Run a kernel in this process, connected to a manager (`fusepager mount` listens: see the
address on its 'mounted' line), taking console commands from SCRIPT or standard input.
Each command gets one answer line starting with 'ok' or 'error'; lines starting with '#'
are information (connecting, losing the manager, reconnecting).

At the end of the commands the kernel returns the pages its tasks changed, then exits. If
the manager goes (unmounted, killed), faults on its objects fail at once (KERN_MEMORY_ERROR),
the changed pages are kept, and the kernel reconnects for as long as it takes (a try every 2 s
at most): when a manager serves the address again, the kept pages go back to it, and mapping
an object again (unmap NAME, map NAME SIZE) works.  With kept pages and no manager at the end
of the commands, it waits for one before exiting (interrupt it to drop them).

A fault waits for its manager's answer as long as it takes (as on Mach); after
--fault-warning seconds the kernel prints a '# warning:' line naming the object, the offset
and the manager, and `stat` lists the waiting faults.  With --fault-timeout S a fault that
waited S seconds fails instead with KERN_MEMORY_ERROR (an 'error' answer naming the offset).""",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    node.add_argument("--connect", required=True, metavar="ADDR", help="the manager: unix:PATH or tcp:HOST:PORT")
    node.add_argument("--name", required=True, help="the kernel's name (its directory in the mount's kernels/)")
    node.add_argument("--page-size", type=int, default=4096, help="a power of two, at least 4096 (default 4096)")
    node.add_argument("--memory", type=int, default=1024, metavar="PAGES", help="page frames (default 1024)")
    node.add_argument("--cluster", type=int, default=1, metavar="PAGES", help="pages per data request (default 1)")
    node.add_argument(
        "--retries", type=int, default=10,
        help="attempts at the first connection before giving up (default 10, every half second; 0: no limit); "
        "once connected, a lost manager is tried again with no limit",
    )  # fmt: skip
    node.add_argument(
        "--fault-warning", metavar="S", default=None,
        help="warn about a fault that has waited S seconds for its manager (default 5; 0: never)",
    )  # fmt: skip
    node.add_argument(
        "--fault-timeout", metavar="S", default=None,
        help="fail a fault that has waited S seconds for its manager with KERN_MEMORY_ERROR "
        "(default: wait as long as it takes, as Mach does)",
    )  # fmt: skip
    node.add_argument("script", nargs="?", help="a file of commands, or - (the default) for standard input")
    args = parser.parse_args(argv)
    if args.command == "messages":
        list_messages(args.direction)
        return 0
    if args.command == "run":
        return _run(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

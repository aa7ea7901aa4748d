"""The `kernelsim` command."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

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
    parts = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        kind = getattr(hint, "__name__", None) or str(hint).replace("kernelsim.ipc_port.", "")
        parts.append(f"{field.name}: {kind}")
    return ", ".join(parts)


def list_messages(direction: str | None) -> None:
    kinds = DIRECTIONS[direction] if direction else sorted(messages.MESSAGE_TYPES.values(), key=lambda c: c.msg_id)
    print(f"{'id':>5}  {'message':<36} fields")
    for cls in kinds:
        print(f"{cls.msg_id:>5}  {cls.mach_name:<36} {_field_text(cls)}")


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
    args = parser.parse_args(argv)
    if args.command == "messages":
        list_messages(args.direction)
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

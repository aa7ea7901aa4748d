"""The manager's side of the control-port calls, one function per routine of mach.defs.

These are what MIG's user stubs are to a C memory manager: they build the typed message and
send it to the kernel's control port.  All but `memory_object_get_attributes` are
simpleroutines: they return as soon as the message is sent and the kernel reports nothing back
except through the reply ports the protocol names.
"""

from __future__ import annotations

from .interface import MEMORY_OBJECT_RETURN_NONE, VM_PROT_NONE
from .ipc_port import PortRight, SendRight, port_allocate
from .messages import (
    MemoryObjectChangeAttributes,
    MemoryObjectDataError,
    MemoryObjectDataSupply,
    MemoryObjectDataUnavailable,
    MemoryObjectDestroy,
    MemoryObjectGetAttributes,
    MemoryObjectGetAttributesReply,
    MemoryObjectLockRequest,
    MemoryObjectReady,
)


def memory_object_ready(control: SendRight, may_cache: bool, copy_strategy: int) -> None:
    control.send(MemoryObjectReady(may_cache=may_cache, copy_strategy=copy_strategy))


def memory_object_data_supply(
    control: SendRight,
    offset: int,
    data: bytes,
    lock_value: int = VM_PROT_NONE,
    precious: bool = False,
    reply_to: PortRight | None = None,
) -> None:
    control.send(
        MemoryObjectDataSupply(
            offset=offset, data=bytes(data), lock_value=lock_value, precious=precious, reply_to=reply_to
        )
    )


def memory_object_data_unavailable(control: SendRight, offset: int, size: int) -> None:
    control.send(MemoryObjectDataUnavailable(offset=offset, size=size))


def memory_object_data_error(control: SendRight, offset: int, size: int, error_value: int) -> None:
    control.send(MemoryObjectDataError(offset=offset, size=size, error_value=error_value))


def memory_object_lock_request(
    control: SendRight,
    offset: int,
    size: int,
    should_return: int = MEMORY_OBJECT_RETURN_NONE,
    should_flush: bool = False,
    lock_value: int = VM_PROT_NONE,
    reply_to: PortRight | None = None,
) -> None:
    control.send(
        MemoryObjectLockRequest(
            offset=offset,
            size=size,
            should_return=should_return,
            should_flush=should_flush,
            lock_value=lock_value,
            reply_to=reply_to,
        )
    )


def memory_object_change_attributes(
    control: SendRight, may_cache: bool, copy_strategy: int, reply_to: PortRight | None = None
) -> None:
    control.send(MemoryObjectChangeAttributes(may_cache=may_cache, copy_strategy=copy_strategy, reply_to=reply_to))


def memory_object_destroy(control: SendRight, reason: int) -> None:
    control.send(MemoryObjectDestroy(reason=reason))


async def memory_object_get_attributes(control: SendRight) -> MemoryObjectGetAttributesReply:
    """A routine: waits for the kernel's reply (object_ready, may_cache, copy_strategy)."""
    reply_port = port_allocate("get_attributes reply")
    try:
        control.send(MemoryObjectGetAttributes(reply=reply_port.make_send_once()))
        received = await reply_port.receive()
        return received.message
    finally:
        reply_port.destroy()

"""Every message of the External Memory Management protocol, one typed class each.

Numbered as GNU Mach numbers them: `memory_object.defs` (subsystem 2200: kernel → manager, on
the memory object port), `memory_object_default.defs` (2250: kernel → default manager),
`mach.defs` (subsystem 2000: the manager → kernel calls on a control port) and `notify.defs`
(MACH_NOTIFY_FIRST = 0100).  The port a message is sent to is not a field, as in Mach it is the
header's destination; the receiver learns it from `ReceivedMessage.port`.

Each message encodes to bytes and decodes back (`codec`), so the transport of [5/8] can carry
it between processes; ports travel as names that the transport translates.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Annotated, ClassVar

from .interface import (
    COPY_STRATEGY_NAMES,
    KERN_RETURN_T,
    MEMORY_OBJECT_COPY_STRATEGY_T,
    MEMORY_OBJECT_RETURN_T,
    NATURAL_T,
    VM_OFFSET_T,
    VM_PROT_T,
    VM_SIZE_T,
    IntegerType,
    kern_return_name,
    prot_str,
)
from .ipc_port import PortRight, ReceiveRight, SendOnceRight, SendRight

MESSAGE_TYPES: dict[int, type[Message]] = {}

# Each integer field is declared with its interface type, as in the .defs files: the type says
# which values are valid (`interface.IntegerType`), and `codec` refuses any other.
kern_return_t = Annotated[int, KERN_RETURN_T]
vm_offset_t = Annotated[int, VM_OFFSET_T]
vm_size_t = Annotated[int, VM_SIZE_T]
vm_prot_t = Annotated[int, VM_PROT_T]
memory_object_copy_strategy_t = Annotated[int, MEMORY_OBJECT_COPY_STRATEGY_T]
memory_object_return_t = Annotated[int, MEMORY_OBJECT_RETURN_T]
mach_port_mscount_t = Annotated[int, NATURAL_T]
mach_port_name_t = Annotated[int, NATURAL_T]


@dataclass(frozen=True, slots=True)
class Message:
    msg_id: ClassVar[int] = 0
    mach_name: ClassVar[str] = ""

    def __init_subclass__(cls) -> None:
        if "msg_id" in cls.__dict__:
            # dataclass(slots=True) builds the class twice; the second build replaces the first.
            known = MESSAGE_TYPES.get(cls.msg_id)
            if known is not None and known.__qualname__ != cls.__qualname__:
                raise TypeError(f"message id {cls.msg_id} used by {known.__name__} and {cls.__name__}")
            MESSAGE_TYPES[cls.msg_id] = cls

    def rights(self) -> list[PortRight]:
        """The port rights this message carries."""
        return [value for value in (getattr(self, name) for name in _field_names(type(self))) if isinstance(value, PortRight)]

    def destroy_rights(self) -> None:
        """Release what a message that is never received carried (mach_msg_destroy)."""
        for right in self.rights():
            right.deallocate()

    def describe(self) -> str:
        """One line for a trace: `memory_object_data_request(control=17 offset=0x0 ...)`."""
        parts = [f"{name}={_show(name, getattr(self, name))}" for name in _field_names(type(self))]
        return f"{self.mach_name}({' '.join(parts)})"


@functools.cache
def integer_types(cls: type[Message]) -> dict[str, IntegerType]:
    """The interface type of each integer field of a message kind, by field name."""
    hints = typing.get_type_hints(cls, include_extras=True)
    found = {}
    for name in _field_names(cls):
        hint = hints[name]
        if typing.get_origin(hint) is Annotated:
            base, *extras = typing.get_args(hint)
            found.update({name: extra for extra in extras if base is int and isinstance(extra, IntegerType)})
        elif hint is int:
            raise TypeError(f"{cls.__name__}.{name}: an integer field needs its interface type (vm_offset_t, ...)")
    return found


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    # dataclasses.fields() builds its answer anew at each call: too slow for every message.
    return tuple(field.name for field in dataclasses.fields(cls))


def _show(field_name: str, value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, PortRight):
        return str(value.name)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, bool):
        return "1" if value else "0"
    if field_name in ("desired_access", "lock_value"):
        return prot_str(value)  # type: ignore[arg-type]
    if field_name == "copy_strategy":
        return COPY_STRATEGY_NAMES.get(value, str(value))  # type: ignore[arg-type]
    if field_name == "should_return":
        return {0: "none", 1: "dirty", 2: "all"}.get(value, str(value))  # type: ignore[arg-type]
    if field_name in ("reason", "result", "error_value", "return_code"):
        return kern_return_name(value)  # type: ignore[arg-type]
    if field_name in ("offset", "error_offset"):
        return f"{value:#x}"
    return str(value)


# --- memory_object.defs: kernel → manager, on the memory object port ---------------------------


@dataclass(frozen=True, slots=True)
class MemoryObjectInit(Message):
    msg_id = 2200
    mach_name = "memory_object_init"
    control: SendRight
    name: SendRight
    page_size: vm_size_t


@dataclass(frozen=True, slots=True)
class MemoryObjectTerminate(Message):
    """The kernel is done with the object; it hands back every right to control and name."""

    msg_id = 2201
    mach_name = "memory_object_terminate"
    control: ReceiveRight
    name: ReceiveRight


@dataclass(frozen=True, slots=True)
class MemoryObjectCopy(Message):
    msg_id = 2202
    mach_name = "memory_object_copy"
    old_control: SendRight
    offset: vm_offset_t
    length: vm_size_t
    new_object: ReceiveRight


@dataclass(frozen=True, slots=True)
class MemoryObjectDataRequest(Message):
    msg_id = 2203
    mach_name = "memory_object_data_request"
    control: SendRight
    offset: vm_offset_t
    length: vm_size_t
    desired_access: vm_prot_t


@dataclass(frozen=True, slots=True)
class MemoryObjectDataUnlock(Message):
    msg_id = 2204
    mach_name = "memory_object_data_unlock"
    control: SendRight
    offset: vm_offset_t
    length: vm_size_t
    desired_access: vm_prot_t


@dataclass(frozen=True, slots=True)
class MemoryObjectLockCompleted(Message):
    """Sent on the reply port of a lock request, once all its actions are done."""

    msg_id = 2206
    mach_name = "memory_object_lock_completed"
    control: SendRight
    offset: vm_offset_t
    length: vm_size_t


@dataclass(frozen=True, slots=True)
class MemoryObjectSupplyCompleted(Message):
    msg_id = 2207
    mach_name = "memory_object_supply_completed"
    control: SendRight
    offset: vm_offset_t
    length: vm_size_t
    result: kern_return_t
    error_offset: vm_offset_t


@dataclass(frozen=True, slots=True)
class MemoryObjectDataReturn(Message):
    msg_id = 2208
    mach_name = "memory_object_data_return"
    control: SendRight
    offset: vm_offset_t
    data: bytes
    dirty: bool
    kernel_copy: bool


@dataclass(frozen=True, slots=True)
class MemoryObjectChangeCompleted(Message):
    """No control port: the change may have terminated the object (see memory_object.defs)."""

    msg_id = 2209
    mach_name = "memory_object_change_completed"
    may_cache: bool
    copy_strategy: memory_object_copy_strategy_t


# --- memory_object_default.defs: kernel → default memory manager -----------------------------


@dataclass(frozen=True, slots=True)
class MemoryObjectCreate(Message):
    msg_id = 2250
    mach_name = "memory_object_create"
    new_object: ReceiveRight
    new_object_size: vm_size_t
    new_control: SendRight
    new_name: SendRight
    new_page_size: vm_size_t


@dataclass(frozen=True, slots=True)
class MemoryObjectDataInitialize(Message):
    msg_id = 2251
    mach_name = "memory_object_data_initialize"
    control: SendRight
    offset: vm_offset_t
    data: bytes


# --- mach.defs: manager → kernel, on the control port ----------------------------------------


@dataclass(frozen=True, slots=True)
class MemoryObjectDataUnavailable(Message):
    msg_id = 2039
    mach_name = "memory_object_data_unavailable"
    offset: vm_offset_t
    size: vm_size_t


@dataclass(frozen=True, slots=True)
class MemoryObjectGetAttributes(Message):
    msg_id = 2040
    mach_name = "memory_object_get_attributes"
    reply: SendOnceRight


@dataclass(frozen=True, slots=True)
class MemoryObjectGetAttributesReply(Message):
    msg_id = 2140
    mach_name = "memory_object_get_attributes_reply"
    return_code: kern_return_t
    object_ready: bool
    may_cache: bool
    copy_strategy: memory_object_copy_strategy_t


@dataclass(frozen=True, slots=True)
class MemoryObjectLockRequest(Message):
    msg_id = 2044
    mach_name = "memory_object_lock_request"
    offset: vm_offset_t
    size: vm_size_t
    should_return: memory_object_return_t
    should_flush: bool
    lock_value: vm_prot_t
    reply_to: PortRight | None


@dataclass(frozen=True, slots=True)
class MemoryObjectDataError(Message):
    msg_id = 2090
    mach_name = "memory_object_data_error"
    offset: vm_offset_t
    size: vm_size_t
    error_value: kern_return_t


@dataclass(frozen=True, slots=True)
class MemoryObjectDestroy(Message):
    msg_id = 2092
    mach_name = "memory_object_destroy"
    reason: kern_return_t


@dataclass(frozen=True, slots=True)
class MemoryObjectDataSupply(Message):
    msg_id = 2093
    mach_name = "memory_object_data_supply"
    offset: vm_offset_t
    data: bytes
    lock_value: vm_prot_t
    precious: bool
    reply_to: PortRight | None


@dataclass(frozen=True, slots=True)
class MemoryObjectReady(Message):
    msg_id = 2094
    mach_name = "memory_object_ready"
    may_cache: bool
    copy_strategy: memory_object_copy_strategy_t


@dataclass(frozen=True, slots=True)
class MemoryObjectChangeAttributes(Message):
    msg_id = 2095
    mach_name = "memory_object_change_attributes"
    may_cache: bool
    copy_strategy: memory_object_copy_strategy_t
    reply_to: PortRight | None


# --- notify.defs -----------------------------------------------------------------------------

MACH_NOTIFY_FIRST = 0o100


@dataclass(frozen=True, slots=True)
class MachNotifyNoSenders(Message):
    msg_id = MACH_NOTIFY_FIRST + 0o6
    mach_name = "mach_notify_no_senders"
    mscount: mach_port_mscount_t


@dataclass(frozen=True, slots=True)
class MachNotifyDeadName(Message):
    msg_id = MACH_NOTIFY_FIRST + 0o10
    mach_name = "mach_notify_dead_name"
    name: mach_port_name_t


# --- netname.defs: finding a memory object by name --------------------------------------------
# Mach's network name server looked ports up by name across hosts; a kernel in another process
# finds a manager's objects the same way (the manager offers the service at the connection's
# start, see `transport`).


@dataclass(frozen=True, slots=True)
class NetnameLookUp(Message):
    msg_id = 1041
    mach_name = "netname_look_up"
    name: bytes
    reply: SendOnceRight


@dataclass(frozen=True, slots=True)
class NetnameLookUpReply(Message):
    msg_id = 1141
    mach_name = "netname_look_up_reply"
    return_code: kern_return_t
    port: SendRight | None


# The kinds of message by direction, for servers that check what they are sent.
KERNEL_TO_MANAGER = (
    MemoryObjectInit,
    MemoryObjectTerminate,
    MemoryObjectCopy,
    MemoryObjectDataRequest,
    MemoryObjectDataUnlock,
    MemoryObjectLockCompleted,
    MemoryObjectSupplyCompleted,
    MemoryObjectDataReturn,
    MemoryObjectChangeCompleted,
    MemoryObjectCreate,
    MemoryObjectDataInitialize,
)
MANAGER_TO_KERNEL = (
    MemoryObjectDataUnavailable,
    MemoryObjectGetAttributes,
    MemoryObjectLockRequest,
    MemoryObjectDataError,
    MemoryObjectDestroy,
    MemoryObjectDataSupply,
    MemoryObjectReady,
    MemoryObjectChangeAttributes,
)

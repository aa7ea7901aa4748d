"""The kernel's interface definitions: constants and errors, as GNU Mach's include/mach/*.h.

Managers (fusepager and anything a user writes) import this module and `messages`; they never
reach into the kernel's internals.  Values are GNU Mach's, so a trace reads like one from Mach.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# --- vm_prot.h -------------------------------------------------------------------------------

VM_PROT_NONE = 0x0
VM_PROT_READ = 0x1
VM_PROT_WRITE = 0x2
VM_PROT_EXECUTE = 0x4
VM_PROT_DEFAULT = VM_PROT_READ | VM_PROT_WRITE
VM_PROT_ALL = VM_PROT_READ | VM_PROT_WRITE | VM_PROT_EXECUTE

# --- vm_inherit.h ----------------------------------------------------------------------------

VM_INHERIT_SHARE = 0
VM_INHERIT_COPY = 1
VM_INHERIT_NONE = 2
VM_INHERIT_DEFAULT = VM_INHERIT_COPY

# --- memory_object.h -------------------------------------------------------------------------

MEMORY_OBJECT_COPY_NONE = 0
MEMORY_OBJECT_COPY_CALL = 1
MEMORY_OBJECT_COPY_DELAY = 2
MEMORY_OBJECT_COPY_TEMPORARY = 3

MEMORY_OBJECT_RETURN_NONE = 0
MEMORY_OBJECT_RETURN_DIRTY = 1
MEMORY_OBJECT_RETURN_ALL = 2

# --- std_types.h, machine/vm_types.h: how wide each integer of the interface is ------------


@dataclass(frozen=True)
class IntegerType:
    """A C integer type of the interface and the values it can hold.  A message field of this
    type travels as a little-endian i64 (see `codec`), but only these values are valid: a
    kern_return_t is a signed 32-bit int whatever the wire has room for.  Whatever brings an
    integer in from outside (a console command, a line written to the mount, a frame from a
    peer) checks it against its type where it enters."""

    name: str
    low: int
    high: int

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.low <= value <= self.high

    def describe(self) -> str:
        return f"{self.name} ({self.low}..{self.high})"


INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
KERN_RETURN_T = IntegerType("kern_return_t", INT32_MIN, INT32_MAX)
VM_PROT_T = IntegerType("vm_prot_t", INT32_MIN, INT32_MAX)
MEMORY_OBJECT_COPY_STRATEGY_T = IntegerType("memory_object_copy_strategy_t", INT32_MIN, INT32_MAX)
MEMORY_OBJECT_RETURN_T = IntegerType("memory_object_return_t", INT32_MIN, INT32_MAX)
# vm_offset_t and vm_size_t are unsigned and as wide as an address (64 bits here); the wire
# carries them as i64, so the top half of the range is not representable and never valid.
VM_OFFSET_T = IntegerType("vm_offset_t", 0, (1 << 63) - 1)
VM_SIZE_T = IntegerType("vm_size_t", 0, (1 << 63) - 1)
NATURAL_T = IntegerType("natural_t", 0, (1 << 32) - 1)

# --- port.h ----------------------------------------------------------------------------------

MACH_PORT_NULL = 0

# Right dispositions as they travel in a message (message.h).  A right arrives as one of the
# three PORT_* kinds whatever disposition the sender used (MAKE_SEND arrives as PORT_SEND).
MACH_MSG_TYPE_MOVE_RECEIVE = 16
MACH_MSG_TYPE_MOVE_SEND = 17
MACH_MSG_TYPE_MOVE_SEND_ONCE = 18
MACH_MSG_TYPE_COPY_SEND = 19
MACH_MSG_TYPE_MAKE_SEND = 20
MACH_MSG_TYPE_MAKE_SEND_ONCE = 21
MACH_MSG_TYPE_PORT_RECEIVE = MACH_MSG_TYPE_MOVE_RECEIVE
MACH_MSG_TYPE_PORT_SEND = MACH_MSG_TYPE_MOVE_SEND
MACH_MSG_TYPE_PORT_SEND_ONCE = MACH_MSG_TYPE_MOVE_SEND_ONCE


# --- kern_return.h ---------------------------------------------------------------------------


class KernReturn(enum.IntEnum):
    KERN_SUCCESS = 0
    KERN_INVALID_ADDRESS = 1
    KERN_PROTECTION_FAILURE = 2
    KERN_NO_SPACE = 3
    KERN_INVALID_ARGUMENT = 4
    KERN_FAILURE = 5
    KERN_RESOURCE_SHORTAGE = 6
    KERN_NOT_RECEIVER = 7
    KERN_NO_ACCESS = 8
    KERN_MEMORY_FAILURE = 9
    KERN_MEMORY_ERROR = 10
    KERN_ALREADY_IN_SET = 11
    KERN_NOT_IN_SET = 12
    KERN_NAME_EXISTS = 13
    KERN_ABORTED = 14
    KERN_INVALID_NAME = 15
    KERN_INVALID_TASK = 16
    KERN_INVALID_RIGHT = 17
    KERN_INVALID_VALUE = 18
    KERN_UREFS_OVERFLOW = 19
    KERN_INVALID_CAPABILITY = 20
    KERN_RIGHT_EXISTS = 21
    KERN_INVALID_HOST = 22
    KERN_MEMORY_PRESENT = 23
    KERN_WRITE_PROTECTION_FAILURE = 24
    KERN_TERMINATED = 26


KERN_SUCCESS = KernReturn.KERN_SUCCESS
KERN_INVALID_ADDRESS = KernReturn.KERN_INVALID_ADDRESS
KERN_PROTECTION_FAILURE = KernReturn.KERN_PROTECTION_FAILURE
KERN_NO_SPACE = KernReturn.KERN_NO_SPACE
KERN_INVALID_ARGUMENT = KernReturn.KERN_INVALID_ARGUMENT
KERN_FAILURE = KernReturn.KERN_FAILURE
KERN_RESOURCE_SHORTAGE = KernReturn.KERN_RESOURCE_SHORTAGE
KERN_NOT_RECEIVER = KernReturn.KERN_NOT_RECEIVER
KERN_NO_ACCESS = KernReturn.KERN_NO_ACCESS
KERN_MEMORY_FAILURE = KernReturn.KERN_MEMORY_FAILURE
KERN_MEMORY_ERROR = KernReturn.KERN_MEMORY_ERROR
KERN_ALREADY_IN_SET = KernReturn.KERN_ALREADY_IN_SET
KERN_NOT_IN_SET = KernReturn.KERN_NOT_IN_SET
KERN_NAME_EXISTS = KernReturn.KERN_NAME_EXISTS
KERN_ABORTED = KernReturn.KERN_ABORTED
KERN_INVALID_NAME = KernReturn.KERN_INVALID_NAME
KERN_INVALID_TASK = KernReturn.KERN_INVALID_TASK
KERN_INVALID_RIGHT = KernReturn.KERN_INVALID_RIGHT
KERN_INVALID_VALUE = KernReturn.KERN_INVALID_VALUE
KERN_UREFS_OVERFLOW = KernReturn.KERN_UREFS_OVERFLOW
KERN_INVALID_CAPABILITY = KernReturn.KERN_INVALID_CAPABILITY
KERN_RIGHT_EXISTS = KernReturn.KERN_RIGHT_EXISTS
KERN_INVALID_HOST = KernReturn.KERN_INVALID_HOST
KERN_MEMORY_PRESENT = KernReturn.KERN_MEMORY_PRESENT
KERN_WRITE_PROTECTION_FAILURE = KernReturn.KERN_WRITE_PROTECTION_FAILURE
KERN_TERMINATED = KernReturn.KERN_TERMINATED

# mach_msg's own send errors (message.h), raised when a send cannot be queued.
MACH_SEND_INVALID_DEST = 0x10000003
MACH_SEND_INVALID_RIGHT = 0x10000007
MACH_RCV_IN_SET = 0x1000400A
MACH_RCV_PORT_DIED = 0x10004009


def prot_str(prot: int) -> str:
    """`rw-` style, as vm_region and the mount's `pages` files show protections."""
    return (
        ("r" if prot & VM_PROT_READ else "-")
        + ("w" if prot & VM_PROT_WRITE else "-")
        + ("x" if prot & VM_PROT_EXECUTE else "-")
    )


COPY_STRATEGY_NAMES = {
    MEMORY_OBJECT_COPY_NONE: "none",
    MEMORY_OBJECT_COPY_CALL: "call",
    MEMORY_OBJECT_COPY_DELAY: "delay",
    MEMORY_OBJECT_COPY_TEMPORARY: "temporary",
}


def kern_return_name(code: int) -> str:
    try:
        return KernReturn(code).name
    except ValueError:
        return f"kern_return {code}"


# --- errors ----------------------------------------------------------------------------------


class KernError(Exception):
    """A kern_return_t other than KERN_SUCCESS, with the values that caused it."""

    code: KernReturn = KernReturn.KERN_FAILURE

    def __init__(self, message: str, **values: object) -> None:
        self.values = values
        for key, value in values.items():
            setattr(self, key, value)
        super().__init__(f"{self.code.name}: {message}")


class KernInvalidAddress(KernError):
    code = KernReturn.KERN_INVALID_ADDRESS

    def __init__(self, address: int, message: str = "no mapping at this address") -> None:
        super().__init__(f"{message} (address {address:#x})", address=address)


class KernProtectionFailure(KernError):
    code = KernReturn.KERN_PROTECTION_FAILURE

    def __init__(self, address: int, requested: int, allowed: int) -> None:
        super().__init__(
            f"access {prot_str(requested)} at {address:#x} but the mapping allows {prot_str(allowed)}",
            address=address,
            requested=requested,
            allowed=allowed,
        )


class KernNoSpace(KernError):
    code = KernReturn.KERN_NO_SPACE

    def __init__(self, address: int | None, size: int, message: str = "no room in the address space") -> None:
        where = "anywhere" if address is None else f"at {address:#x}"
        super().__init__(f"{message}: {size:#x} bytes {where}", address=address, size=size)


class KernInvalidArgument(KernError):
    code = KernReturn.KERN_INVALID_ARGUMENT

    def __init__(self, message: str, **values: object) -> None:
        super().__init__(message, **values)


class KernResourceShortage(KernError):
    code = KernReturn.KERN_RESOURCE_SHORTAGE

    def __init__(self, message: str, **values: object) -> None:
        super().__init__(message, **values)


class KernMemoryError(KernError):
    """A memory access failed because the object's manager could not or would not supply it.

    `offset` is the offset in the memory object, `reason` the kern_return_t the manager gave
    (`memory_object_data_error`, `memory_object_destroy`) or the kernel's own when the manager
    died or the object was terminated.
    """

    code = KernReturn.KERN_MEMORY_ERROR

    def __init__(self, offset: int, reason: int, message: str) -> None:
        super().__init__(
            f"{message} (object offset {offset:#x}, reason {kern_return_name(reason)})",
            offset=offset,
            reason=reason,
        )


class KernMemoryPresent(KernError):
    code = KernReturn.KERN_MEMORY_PRESENT

    def __init__(self, offset: int) -> None:
        super().__init__(f"data already present at offset {offset:#x}", offset=offset)


class KernInvalidRight(KernError):
    code = KernReturn.KERN_INVALID_RIGHT

    def __init__(self, message: str, **values: object) -> None:
        super().__init__(message, **values)


class KernInvalidName(KernError):
    code = KernReturn.KERN_INVALID_NAME

    def __init__(self, message: str, **values: object) -> None:
        super().__init__(message, **values)


class MachSendInvalidDest(Exception):
    """mach_msg refused a send because the destination port is dead (MACH_SEND_INVALID_DEST)."""

    code = MACH_SEND_INVALID_DEST

    def __init__(self, port_name: int) -> None:
        self.port_name = port_name
        super().__init__(f"MACH_SEND_INVALID_DEST: port {port_name} is dead")


class MachRcvPortDied(Exception):
    """A receive was waiting on a port whose receive right was destroyed (MACH_RCV_PORT_DIED)."""

    code = MACH_RCV_PORT_DIED

    def __init__(self, port_name: int) -> None:
        self.port_name = port_name
        super().__init__(f"MACH_RCV_PORT_DIED: port {port_name} was destroyed")

"""Messages to bytes and back.

A message body is its id (u32) followed by its fields in declaration order:

    int            i64, little-endian; only the values of the field's interface type are valid
                   (a kern_return_t is a signed 32-bit int, a vm_offset_t 0..2**63-1)
    bool           u8, 0 or 1
    bytes          u32 length, then the bytes (at most MAX_DATA)
    port right     u8 disposition (0 for a null port, else MACH_MSG_TYPE_PORT_*), u64 name

Ports are written as names: `encode` asks the caller's `name_of` for each right and `decode`
asks `right_for` to turn (disposition, name) back into a right, so whoever carries the bytes
(the transport of [5/8]) decides what a name means on each side.  `decode` trusts nothing: a
short buffer, trailing bytes, an unknown id, a bad disposition or boolean, an over-long data
field, all raise `MessageFormatError`.
"""

from __future__ import annotations

import dataclasses
import struct
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from .interface import MACH_MSG_TYPE_PORT_RECEIVE, MACH_MSG_TYPE_PORT_SEND, MACH_MSG_TYPE_PORT_SEND_ONCE
from .interface import IntegerType
from .ipc_port import PortRight, ReceiveRight, SendOnceRight, SendRight
from .messages import MESSAGE_TYPES, Message, integer_types

MAX_DATA = 64 * 1024 * 1024
"""The largest data field a message may carry (a cluster of pages, a supply, a return)."""

_ID = struct.Struct("<I")
_INT = struct.Struct("<q")
_BOOL = struct.Struct("<B")
_LEN = struct.Struct("<I")
_PORT = struct.Struct("<BQ")

NameOf = Callable[[PortRight], int]
RightFor = Callable[[int, int], PortRight]


class MessageFormatError(ValueError):
    """The bytes are not a well-formed message."""


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    kind: str  # "int", "bool", "bytes", "port"
    dispositions: frozenset[int] = frozenset()
    optional: bool = False
    integer_type: IntegerType | None = None


_PORT_KINDS: dict[type, frozenset[int]] = {
    ReceiveRight: frozenset({MACH_MSG_TYPE_PORT_RECEIVE}),
    SendRight: frozenset({MACH_MSG_TYPE_PORT_SEND}),
    SendOnceRight: frozenset({MACH_MSG_TYPE_PORT_SEND_ONCE}),
    # A polymorphic reply port, as MIG's MAKE_SEND_ONCE|polymorphic.
    PortRight: frozenset({MACH_MSG_TYPE_PORT_SEND, MACH_MSG_TYPE_PORT_SEND_ONCE}),
}


@cache
def _layout(cls: type[Message]) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    integers = integer_types(cls)
    fields = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        optional = False
        args = typing.get_args(hint)
        if args and type(None) in args:
            optional = True
            (hint,) = [arg for arg in args if arg is not type(None)]
        if hint is bool:
            fields.append(_Field(field.name, "bool"))
        elif hint is int:
            fields.append(_Field(field.name, "int", integer_type=integers[field.name]))
        elif hint is bytes:
            fields.append(_Field(field.name, "bytes"))
        elif hint in _PORT_KINDS:
            fields.append(_Field(field.name, "port", _PORT_KINDS[hint], optional))
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: no wire encoding for {hint!r}")
    return tuple(fields)


def _check_integer(mach_name: str, field: _Field, value: object) -> None:
    kind = field.integer_type
    assert kind is not None
    if value not in kind:
        raise MessageFormatError(f"{mach_name}.{field.name}: {value!r} is not a valid {kind.describe()}")


def encode(message: Message, name_of: NameOf) -> bytes:
    """The message's bytes; each port right becomes `name_of(right)`."""
    return b"".join(encode_parts(message, name_of))


def encode_parts(message: Message, name_of: NameOf) -> list[bytes]:
    """The message's bytes as pieces to be written one after the other (`encode` joins them):
    a data field is its own piece, the message's own bytes, not a copy."""
    parts = [_ID.pack(message.msg_id)]
    for field in _layout(type(message)):
        value = getattr(message, field.name)
        if field.kind == "int":
            _check_integer(message.mach_name, field, value)
            parts.append(_INT.pack(value))
        elif field.kind == "bool":
            parts.append(_BOOL.pack(1 if value else 0))
        elif field.kind == "bytes":
            if len(value) > MAX_DATA:
                raise MessageFormatError(f"{message.mach_name}.{field.name}: {len(value)} bytes exceeds {MAX_DATA}")
            parts.append(_LEN.pack(len(value)))
            parts.append(bytes(value))
        elif value is None:
            parts.append(_PORT.pack(0, 0))
        else:
            parts.append(_PORT.pack(value.kind, name_of(value)))
    return parts


def decode(data: bytes | bytearray | memoryview, right_for: RightFor) -> Message:
    """The message in `data`; each port (disposition, name) becomes `right_for(...)`."""
    view = memoryview(data)
    if len(view) < _ID.size:
        raise MessageFormatError(f"{len(view)} bytes is too short for a message id")
    (msg_id,) = _ID.unpack_from(view, 0)
    cls = MESSAGE_TYPES.get(msg_id)
    if cls is None:
        raise MessageFormatError(f"unknown message id {msg_id}")
    position = _ID.size
    values: dict[str, object] = {}

    def take(size: int, what: str) -> memoryview:
        nonlocal position
        if position + size > len(view):
            raise MessageFormatError(f"{cls.mach_name}: truncated in {what}")
        chunk = view[position : position + size]
        position += size
        return chunk

    for field in _layout(cls):
        if field.kind == "int":
            (value,) = _INT.unpack(take(_INT.size, field.name))
            _check_integer(cls.mach_name, field, value)
            values[field.name] = value
        elif field.kind == "bool":
            (flag,) = _BOOL.unpack(take(_BOOL.size, field.name))
            if flag not in (0, 1):
                raise MessageFormatError(f"{cls.mach_name}.{field.name}: boolean byte {flag}")
            values[field.name] = bool(flag)
        elif field.kind == "bytes":
            (length,) = _LEN.unpack(take(_LEN.size, field.name))
            if length > MAX_DATA:
                raise MessageFormatError(f"{cls.mach_name}.{field.name}: {length} bytes exceeds {MAX_DATA}")
            values[field.name] = bytes(take(length, field.name))
        else:
            disposition, name = _PORT.unpack(take(_PORT.size, field.name))
            if disposition == 0:
                if not field.optional:
                    raise MessageFormatError(f"{cls.mach_name}.{field.name}: null port where a right is required")
                values[field.name] = None
            elif disposition not in field.dispositions:
                raise MessageFormatError(f"{cls.mach_name}.{field.name}: port disposition {disposition} not allowed")
            else:
                values[field.name] = right_for(disposition, name)
    if position != len(view):
        raise MessageFormatError(f"{cls.mach_name}: {len(view) - position} trailing bytes")
    return cls(**values)  # type: ignore[arg-type]

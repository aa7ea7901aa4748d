"""Every message kind: its GNU Mach number, its bytes and back, and refusal of bad bytes."""

from __future__ import annotations

import dataclasses
import struct
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernelsim import PortRight, ReceiveRight, SendOnceRight, SendRight, port_allocate
from kernelsim import messages as m
from kernelsim.codec import MAX_DATA, MessageFormatError, decode, encode

GNU_MACH_IDS = {
    # memory_object.defs
    m.MemoryObjectInit: 2200,
    m.MemoryObjectTerminate: 2201,
    m.MemoryObjectCopy: 2202,
    m.MemoryObjectDataRequest: 2203,
    m.MemoryObjectDataUnlock: 2204,
    m.MemoryObjectLockCompleted: 2206,
    m.MemoryObjectSupplyCompleted: 2207,
    m.MemoryObjectDataReturn: 2208,
    m.MemoryObjectChangeCompleted: 2209,
    # memory_object_default.defs
    m.MemoryObjectCreate: 2250,
    m.MemoryObjectDataInitialize: 2251,
    # mach.defs
    m.MemoryObjectDataUnavailable: 2039,
    m.MemoryObjectGetAttributes: 2040,
    m.MemoryObjectLockRequest: 2044,
    m.MemoryObjectDataError: 2090,
    m.MemoryObjectDestroy: 2092,
    m.MemoryObjectDataSupply: 2093,
    m.MemoryObjectReady: 2094,
    m.MemoryObjectChangeAttributes: 2095,
    # notify.defs
    m.MachNotifyNoSenders: 0o106,
    m.MachNotifyDeadName: 0o110,
    # netname.defs (the name service kernels in other processes find objects with)
    m.NetnameLookUp: 1041,
}


def test_message_ids_are_gnu_machs():
    for cls, msg_id in GNU_MACH_IDS.items():
        assert cls.msg_id == msg_id, cls.__name__
        assert m.MESSAGE_TYPES[msg_id] is cls


def test_every_message_kind_is_one_class_with_a_mach_name():
    assert set(m.MESSAGE_TYPES.values()) == set(GNU_MACH_IDS) | {m.MemoryObjectGetAttributesReply, m.NetnameLookUpReply}
    for cls in m.MESSAGE_TYPES.values():
        assert cls.mach_name.startswith(("memory_object_", "mach_notify_", "netname_"))


class NameTable:
    """Both ends of a connection in one process: names are port numbers."""

    def __init__(self) -> None:
        self.ports = {}

    def name_of(self, right: PortRight) -> int:
        self.ports[right.name] = right.port
        return right.name

    def right_for(self, disposition: int, name: int) -> PortRight:
        kind = {16: ReceiveRight, 17: SendRight, 18: SendOnceRight}[disposition]
        return kind(self.ports[name])


PORTS = [port_allocate(f"p{i}") for i in range(4)]


def right_strategy(hint):
    optional = type(None) in typing.get_args(hint)
    kinds = [arg for arg in typing.get_args(hint) if arg is not type(None)] or [hint]
    (kind,) = kinds
    choices = {ReceiveRight: [ReceiveRight], SendRight: [SendRight], SendOnceRight: [SendOnceRight], PortRight: [SendRight, SendOnceRight]}[kind]
    strategy = st.builds(lambda cls, port: cls(port.port), st.sampled_from(choices), st.sampled_from(PORTS))
    return st.one_of(st.none(), strategy) if optional else strategy


def message_strategy(cls):
    hints = typing.get_type_hints(cls)
    integers = m.integer_types(cls)
    fields = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if hint is int:
            kind = integers[field.name]
            fields[field.name] = st.integers(kind.low, kind.high)
        elif hint is bool:
            fields[field.name] = st.booleans()
        elif hint is bytes:
            fields[field.name] = st.binary(max_size=9000)
        else:
            fields[field.name] = right_strategy(hint)
    return st.builds(cls, **fields)


ANY_MESSAGE = st.one_of([message_strategy(cls) for cls in m.MESSAGE_TYPES.values()])


ALL_KINDS = sorted(m.MESSAGE_TYPES.values(), key=lambda cls: cls.msg_id)


@pytest.mark.parametrize("cls", ALL_KINDS, ids=lambda cls: cls.mach_name)
@given(data=st.data())
def test_every_message_round_trips_through_bytes(cls, data):
    message = data.draw(message_strategy(cls))
    table = NameTable()
    encoded = encode(message, table.name_of)
    decoded = decode(encoded, table.right_for)
    assert decoded == message
    assert type(decoded) is cls


@given(ANY_MESSAGE, st.data())
def test_any_truncation_or_extension_is_refused(message, data):
    table = NameTable()
    encoded = encode(message, table.name_of)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(MessageFormatError):
        decode(encoded[:cut], table.right_for)
    with pytest.raises(MessageFormatError):
        decode(encoded + b"\0", table.right_for)


@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(blob):
    table = NameTable()
    for port in PORTS:
        table.ports[port.name] = port.port
    try:
        decode(blob, lambda disposition, name: table.right_for(disposition, name) if name in table.ports else SendRight(PORTS[0].port))
    except MessageFormatError:
        pass


def test_specific_malformations_are_refused_with_a_reason():
    table = NameTable()
    good = encode(m.MemoryObjectReady(may_cache=True, copy_strategy=2), table.name_of)
    with pytest.raises(MessageFormatError, match="unknown message id 9999"):
        decode(struct.pack("<I", 9999), table.right_for)
    with pytest.raises(MessageFormatError, match="boolean byte 7"):
        decode(good[:4] + b"\x07" + good[5:], table.right_for)
    request = m.MemoryObjectDataRequest(control=PORTS[0].make_send(), offset=0, length=4096, desired_access=1)
    encoded = bytearray(encode(request, table.name_of))
    encoded[4] = 16  # a receive right where a send right belongs
    with pytest.raises(MessageFormatError, match="disposition 16 not allowed"):
        decode(bytes(encoded), table.right_for)
    encoded[4] = 0  # a null port where one is required
    with pytest.raises(MessageFormatError, match="null port"):
        decode(bytes(encoded), table.right_for)
    huge = struct.pack("<I", 2251) + struct.pack("<BQ", 17, PORTS[0].name) + struct.pack("<q", 0) + struct.pack("<I", MAX_DATA + 1)
    with pytest.raises(MessageFormatError, match="exceeds"):
        decode(huge, table.right_for)


def _with_integer(cls, field: str, value: int) -> m.Message:
    """A message of kind `cls` whose integer `field` is `value`, its other fields valid."""
    values = {}
    for name, hint in typing.get_type_hints(cls).items():
        if name in ("msg_id", "mach_name"):
            continue
        if hint is int:
            values[name] = value if name == field else 0
        elif hint is bool:
            values[name] = False
        elif hint is bytes:
            values[name] = b""
        else:
            values[name] = PORTS[0].make_send_once() if "SendOnce" in str(hint) else PORTS[0].make_send() if "Send" in str(hint) or "PortRight" in str(hint) else ReceiveRight(PORTS[0].port)
    return cls(**values)


INTEGER_FIELDS = [(cls, name) for cls in ALL_KINDS for name in m.integer_types(cls)]


def test_every_integer_field_has_its_interface_type():
    assert {kind.name for cls, name in INTEGER_FIELDS for kind in [m.integer_types(cls)[name]]} >= {"kern_return_t", "vm_offset_t", "vm_size_t", "vm_prot_t"}
    assert m.integer_types(m.MemoryObjectDestroy)["reason"].high == 2**31 - 1
    assert m.integer_types(m.MemoryObjectDataRequest)["offset"].low == 0


@pytest.mark.parametrize(("cls", "field"), INTEGER_FIELDS, ids=[f"{cls.mach_name}.{name}" for cls, name in INTEGER_FIELDS])
def test_an_integer_outside_its_type_is_refused_both_ways(cls, field):
    """Issue 14: `destroy 9223372036854775808` became a struct.error in the sender.  A value
    outside the field's type is a MessageFormatError on encode, and on decode when a peer
    writes it (the i64 on the wire has room for values the type has not)."""
    kind = m.integer_types(cls)[field]
    table = NameTable()
    for good in (kind.low, kind.high):
        assert getattr(decode(encode(_with_integer(cls, field, good), table.name_of), table.right_for), field) == good
    too_big = [kind.high + 1, 2**63, 2**64, 10**30]
    for bad in [kind.low - 1, -(2**63) - 1, *too_big]:
        with pytest.raises(MessageFormatError, match=f"{field}: {bad} is not a valid {kind.name}"):
            encode(_with_integer(cls, field, bad), table.name_of)
    # On the wire: the same message with the field's eight bytes replaced by an i64 outside.
    for bad in [v for v in (kind.low - 1, kind.high + 1) if -(2**63) <= v < 2**63]:
        marker = 0x5A5A5A5A
        encoded = encode(_with_integer(cls, field, marker if marker in kind else kind.low), table.name_of)
        packed = struct.pack("<q", marker if marker in kind else kind.low)
        assert encoded.count(packed) == 1, "the field's bytes must be found once"
        with pytest.raises(MessageFormatError, match=f"is not a valid {kind.name}"):
            decode(encoded.replace(packed, struct.pack("<q", bad)), table.right_for)


def test_describe_reads_like_the_mach_call():
    control = PORTS[1].make_send()
    text = m.MemoryObjectDataRequest(control=control, offset=0x4000, length=8192, desired_access=3).describe()
    assert text == f"memory_object_data_request(control={control.name} offset=0x4000 length=8192 desired_access=rw-)"
    assert m.MemoryObjectReady(may_cache=False, copy_strategy=1).describe() == "memory_object_ready(may_cache=0 copy_strategy=call)"
    supply = m.MemoryObjectDataSupply(offset=0, data=b"x" * 10, lock_value=2, precious=True, reply_to=None)
    assert supply.describe() == "memory_object_data_supply(offset=0x0 data=<10 bytes> lock_value=-w- precious=1 reply_to=null)"

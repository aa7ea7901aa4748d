"""The interface module: GNU Mach's values, and errors that carry what caused them."""

from __future__ import annotations

import pytest

from kernelsim import interface as i


def test_constants_have_gnu_machs_values():
    assert (i.VM_PROT_NONE, i.VM_PROT_READ, i.VM_PROT_WRITE, i.VM_PROT_EXECUTE) == (0, 1, 2, 4)
    assert i.VM_PROT_ALL == 7 and i.VM_PROT_DEFAULT == 3
    assert (i.VM_INHERIT_SHARE, i.VM_INHERIT_COPY, i.VM_INHERIT_NONE) == (0, 1, 2)
    assert (i.MEMORY_OBJECT_COPY_NONE, i.MEMORY_OBJECT_COPY_CALL, i.MEMORY_OBJECT_COPY_DELAY) == (0, 1, 2)
    assert (i.MEMORY_OBJECT_RETURN_NONE, i.MEMORY_OBJECT_RETURN_DIRTY, i.MEMORY_OBJECT_RETURN_ALL) == (0, 1, 2)
    assert (i.KERN_SUCCESS, i.KERN_INVALID_ADDRESS, i.KERN_PROTECTION_FAILURE, i.KERN_NO_SPACE) == (0, 1, 2, 3)
    assert (i.KERN_INVALID_ARGUMENT, i.KERN_FAILURE, i.KERN_RESOURCE_SHORTAGE) == (4, 5, 6)
    assert (i.KERN_MEMORY_FAILURE, i.KERN_MEMORY_ERROR, i.KERN_MEMORY_PRESENT) == (9, 10, 23)
    assert i.MACH_SEND_INVALID_DEST == 0x10000003


@pytest.mark.parametrize(
    ("error", "code", "values"),
    [
        (i.KernInvalidAddress(0x1000), i.KERN_INVALID_ADDRESS, {"address": 0x1000}),
        (i.KernProtectionFailure(0x2000, 2, 1), i.KERN_PROTECTION_FAILURE, {"address": 0x2000, "requested": 2, "allowed": 1}),
        (i.KernMemoryError(0x3000, 9, "manager said no"), i.KERN_MEMORY_ERROR, {"offset": 0x3000, "reason": 9}),
        (i.KernNoSpace(None, 4096), i.KERN_NO_SPACE, {"address": None, "size": 4096}),
        (i.KernMemoryPresent(0x4000), i.KERN_MEMORY_PRESENT, {"offset": 0x4000}),
        (i.KernInvalidArgument("bad", size=-1), i.KERN_INVALID_ARGUMENT, {"size": -1}),
    ],
)
def test_errors_carry_their_code_and_the_offending_values(error, code, values):
    assert isinstance(error, i.KernError)
    assert error.code == code
    for name, value in values.items():
        assert getattr(error, name) == value
    assert str(error).startswith(i.KernReturn(code).name)


def test_error_messages_name_the_values():
    assert "0x3000" in str(i.KernMemoryError(0x3000, 9, "x"))
    assert "KERN_MEMORY_FAILURE" in str(i.KernMemoryError(0x3000, 9, "x"))
    assert "rw-" in str(i.KernProtectionFailure(0, 3, 1)) and "r--" in str(i.KernProtectionFailure(0, 3, 1))

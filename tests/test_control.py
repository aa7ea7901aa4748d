"""Parsing what the shell writes: ctl commands, ready lines."""

from __future__ import annotations

import pytest

from fusepager.control import (
    Attributes,
    Clean,
    ControlError,
    Destroy,
    Flush,
    Lock,
    Sync,
    parse_ctl,
    parse_ready,
)
from kernelsim.interface import (
    KERN_MEMORY_FAILURE,
    KERN_TERMINATED,
    MEMORY_OBJECT_COPY_CALL,
    MEMORY_OBJECT_COPY_NONE,
    VM_PROT_NONE,
    VM_PROT_READ,
    VM_PROT_WRITE,
)


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("sync", Sync()),
        ("  sync\n", Sync()),
        ("flush", Flush()),
        ("flush 4096 8192", Flush(4096, 8192)),
        ("flush 0x1000 4K", Flush(4096, 4096)),
        ("clean 1M 2m", Clean(1 << 20, 2 << 20)),
        ("lock 0 4096 w", Lock(0, 4096, VM_PROT_WRITE)),
        ("lock 0 4096 rw", Lock(0, 4096, VM_PROT_READ | VM_PROT_WRITE)),
        ("lock 0 4096 none", Lock(0, 4096, VM_PROT_NONE)),
        ("destroy", Destroy(KERN_TERMINATED)),
        ("destroy 9", Destroy(KERN_MEMORY_FAILURE)),
        ("destroy KERN_MEMORY_FAILURE", Destroy(KERN_MEMORY_FAILURE)),
        ("destroy memory_failure", Destroy(KERN_MEMORY_FAILURE)),
        ("attributes may_cache=1", Attributes(True, None)),
        ("attributes copy=call may_cache=0", Attributes(False, MEMORY_OBJECT_COPY_CALL)),
    ],
)
def test_good_ctl_lines(line, command):
    assert parse_ctl(line) == command


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("", "empty command"),
        ("frobnicate", "unknown command 'frobnicate'"),
        ("sync now", "sync takes no arguments"),
        ("flush 4096", "flush takes no range or OFF LEN"),
        ("flush -1 10", "out of range"),
        ("flush ten 10", "not a number"),
        ("lock 0 4096", "usage: lock"),
        ("lock 0 0 w", "empty range"),
        ("lock 0 4096 q", "use letters r, w, x"),
        ("destroy a b", "usage: destroy"),
        ("destroy KERN_NOPE", "a number or a KERN_"),
        ("attributes", "usage: attributes"),
        ("attributes may_cache=2", "use 0 or 1"),
        ("attributes copy=lazy", "use none, call or delay"),
        ("attributes colour=red", "unknown key 'colour'"),
        ("attributes copy=none copy=call", "copy given twice"),
        ("attributes copy", "not key=value"),
        ("flush 0 99999999999999999999999", "out of range"),
    ],
)
def test_bad_ctl_lines_say_what_is_wrong(line, complaint):
    with pytest.raises(ControlError, match=complaint.replace("[", r"\[")):
        parse_ctl(line)


def test_ready_lines():
    assert parse_ready("may_cache=0 copy=call\n") == Attributes(False, MEMORY_OBJECT_COPY_CALL)
    assert parse_ready("copy=none") == Attributes(None, MEMORY_OBJECT_COPY_NONE)
    assert parse_ready("\n") == Attributes(None, None)
    assert parse_ready("may_cache=yes") == Attributes(True, None)
    for bad in ("may_cache=1\ncopy=call\n", "ready", "copy=everything", "may_cache=maybe"):
        with pytest.raises(ControlError):
            parse_ready(bad)


@pytest.mark.parametrize("reason", [2**31, -(2**31) - 1, 2**63, 2**64, -(2**63), 10**30])
def test_a_destroy_reason_is_a_kern_return_t(reason):
    with pytest.raises(ControlError, match="out of range: a reason is a kern_return_t"):
        parse_ctl(f"destroy {reason}")
    assert parse_ctl("destroy 2147483647") == Destroy(2**31 - 1)
    assert parse_ctl("destroy -2147483648") == Destroy(-(2**31))


def test_ctl_lines_run_whole_and_a_write_is_all_or_nothing():
    from fusepager.control import MAX_LINE, CtlLines

    lines = CtlLines()
    assert lines.take(b"sy") == [] and lines.pending
    assert lines.take(b"nc\nflush 0 4K\nfl") == [("sync", Sync()), ("flush 0 4K", Flush(0, 4096))]
    assert lines.take(b"ush\n\n") == [("flush", Flush())]
    assert lines.take(b"clean") == [] and lines.rest() == [("clean", Clean())] and not lines.pending
    with pytest.raises(ControlError, match="unknown command 'bogus'"):
        lines.take(b"sync\nbogus\nflush\n")
    with pytest.raises(ControlError, match="an earlier line on this open file was refused"):
        lines.take(b"sync\n")
    assert lines.rest() == []

    fresh = CtlLines()
    assert fresh.take(b"attributes copy=\xc3") == []  # half a character: may still be text
    with pytest.raises(ControlError, match="not UTF-8"):
        CtlLines().take(b"sync\xff")
    with pytest.raises(ControlError, match="empty command"):
        CtlLines().take(b"\n \n")
    long = CtlLines()
    assert long.take(b" " * MAX_LINE) == []
    with pytest.raises(ControlError, match=f"longer than {MAX_LINE} bytes"):
        long.take(b" ")

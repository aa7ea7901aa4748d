"""Issue 14, defect 1: integers from outside are checked where they enter.

`echo 'destroy 9223372036854775808' > ctl` with a kernel process mapping the object ended the
daemon: the reason reached the codec, whose `struct.error` escaped the FUSE loop.  Every integer
that comes in (ctl arguments, console commands, `--kernel` and `kernelsim run` options, frames
from a peer) is now checked against the width of the interface type it becomes (a reason is a
kern_return_t, a signed 32-bit int; an offset a vm_offset_t) and refused with a clear error.
Through a real mount and real kernel processes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fusepager.mount import mount_state
from kernelsim import messages as m
from kernelsim.transport import MESSAGE
from mounting import fails_with, sh, trace_lines, wait_until
from rawpeer import Placeholder, RawPeer, frame, message_payload, yours
from test_foreign_peers import _lookup, _unix_path

EINVAL = "Invalid argument"
HUGE = [2**31, -(2**31) - 1, 2**32, 2**63, 2**64, -(2**63), 10**30]
"""Beyond a kern_return_t."""
BEYOND_OFFSETS = [-1, 2**62 + 1, 2**63, 2**64, -(2**63), 10**30]
"""Beyond the offsets and lengths ctl takes (0..2**62)."""


def _alive(session, k1, obj) -> None:
    """The daemon and k1 serve on: k1 reads its bytes, the mount shows them."""
    assert session.process.poll() is None, session.daemon_stderr()
    assert k1.process.poll() is None, k1.child_stderr()
    assert k1.command("read h+100 12 text").endswith("'kernel bytes'")
    assert sh(f"dd if={obj}/data bs=1 skip=100 count=12 status=none").stdout == "kernel bytes"


@pytest.mark.parametrize("reason", HUGE)
def test_a_destroy_reason_wider_than_a_kern_return_t_is_refused_and_the_daemon_lives(process_mapped, reason):
    session, k1, obj = process_mapped
    before = len(trace_lines(session.mountpoint))
    fails_with(f"echo 'destroy {reason}' > {obj}/ctl", EINVAL)
    new = "\n".join(trace_lines(session.mountpoint)[before:])
    assert "mount refused (EINVAL)" in new and "kern_return_t" in new, new
    _alive(session, k1, obj)


def test_the_widest_reasons_a_kern_return_t_holds_reach_the_kernel_process(process_mapped):
    session, k1, obj = process_mapped
    sh(f"echo 'destroy -2147483648' > {obj}/ctl")
    answer = k1.answer_to("read h+100 4")
    assert answer.startswith("error") and "kern_return -2147483648" in answer, answer
    k1.command("unmap h")
    k1.command("map h 64K")
    assert k1.command("read h+100 12 text").endswith("'kernel bytes'")  # a new init: served again
    sh(f"echo 'destroy 2147483647' > {obj}/ctl")
    answer = k1.answer_to("read h+100 4")
    assert answer.startswith("error") and "kern_return 2147483647" in answer, answer
    assert session.process.poll() is None


@pytest.mark.parametrize(
    "line",
    [f"flush {n} 4096" for n in BEYOND_OFFSETS] + [f"clean 0 {n}" for n in BEYOND_OFFSETS] + [f"lock {n} 4096 w" for n in BEYOND_OFFSETS] + [f"lock 0 {2**63} w"],
)
def test_ctl_offsets_and_lengths_outside_their_range_are_refused(process_mapped, line):
    session, k1, obj = process_mapped
    fails_with(f"echo '{line}' > {obj}/ctl", EINVAL)
    _alive(session, k1, obj)


def test_a_frame_whose_integer_is_outside_its_type_ends_only_that_connection(process_mapped):
    """A peer writes an i64 the field's type has no room for: the connection is refused with
    the field named, the daemon and the well-behaved kernel process go on."""
    session, k1, obj = process_mapped
    cases = [
        (m.MemoryObjectDataRequest, "offset", -1, "vm_offset_t"),
        (m.MemoryObjectDataUnlock, "desired_access", 2**31, "vm_prot_t"),
        (m.MemoryObjectSupplyCompleted, "result", -(2**40), "kern_return_t"),
    ]
    for kind, field, bad, type_name in cases:
        before = len(trace_lines(session.mountpoint))
        with RawPeer(_unix_path(session.listen_address)) as rogue:
            bootstrap = rogue.hello("rogue")
            lookup, names = _lookup(b"h")
            rogue.send_message(yours(bootstrap), lookup, names)
            _, answer, rights = rogue.read_message()
            ((_, object_name),) = rights
            control = Placeholder().send()
            values = {"control": control, "offset": 0, "length": 4096, "desired_access": 1, "result": 0, "error_offset": 0}
            marker = 0x5A5A5A5A
            message = kind(**{name: (marker if name == field else values[name]) for name in m.integer_types(kind) | {"control": None}})
            payload = message_payload(yours(object_name), message, {id(control): 3})
            packed, replaced = marker.to_bytes(8, "little", signed=True), bad.to_bytes(8, "little", signed=True)
            assert payload.count(packed) == 1
            rogue.send(frame(MESSAGE, payload.replace(packed, replaced)))
            assert rogue.closed_by_other_side(), f"{kind.mach_name}.{field}={bad}: the connection stayed open"
        expected = f"{kind.mach_name}.{field}: {bad} is not a valid {type_name}"
        wait_until(lambda: expected in "\n".join(trace_lines(session.mountpoint)[before:]), what=expected)
        _alive(session, k1, obj)


def test_a_kernel_process_refuses_a_mapping_whose_offsets_a_message_cannot_carry(process_mapped):
    """`map h 8K 0x7ffffffffffff000` was accepted, and the fault on its second page made an
    offset of 2**63: the kernel process died of a struct.error in its codec."""
    session, k1, obj = process_mapped
    k1.command("fork t2")
    k1.command("task t2")
    k1.command("unmap h")
    answer = k1.answer_to(f"map h 8K {2**63 - 4096:#x}")
    assert answer.startswith("error KERN_INVALID_ARGUMENT") and "offsets end at 0x8000000000000000" in answer, answer
    for bad in (2**64, 10**30):
        answer = k1.answer_to(f"map h 4K {bad}")
        assert answer.startswith("error bad offset") and "out of range" in answer, answer
        answer = k1.answer_to(f"read {bad} 4")
        assert answer.startswith("error bad address") and "out of range" in answer, answer
    # The last page a message can name still maps and faults.
    assert k1.command(f"map h 4K {2**63 - 4096}").startswith("ok map h")
    assert k1.answer_to("read h 4").startswith(("ok", "error"))  # answered (past the store's end)
    k1.command("task t1")
    _alive(session, k1, obj)


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("k1:4096:0", "memory limit 0"),
        ("k1:4096:-1", "memory limit -1"),
        (f"k1:4096:{2**63}", f"memory limit {2**63}"),
        (f"k1:{2**40}", f"page size {2**40}"),
        ("k1:4096:64:0", "cluster of 0 pages"),
        (f"k1:4096:64:{2**64}", f"cluster of {2**64} pages"),
    ],
)
def test_a_kernel_option_out_of_range_is_refused_before_mounting(tmp_path, spec, complaint):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    store.mkdir()
    mnt.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "fusepager", "mount", str(store), str(mnt), "-f", "--listen", "none", "--kernel", spec],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    try:
        assert result.returncode == 2, result.stderr
        assert complaint in result.stderr and "Traceback" not in result.stderr, result.stderr
    finally:
        if mount_state(mnt) != "free":
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert mount_state(mnt) == "free"


@pytest.mark.parametrize(
    ("option", "complaint"),
    [
        (["--page-size", str(2**40)], f"page size {2**40}"),
        (["--memory", str(2**63)], f"memory limit {2**63}"),
        (["--cluster", str(2**64)], f"cluster of {2**64} pages"),
    ],
)
def test_a_kernel_process_option_out_of_range_is_refused(process_mapped, option, complaint):
    session, k1, obj = process_mapped
    result = subprocess.run(
        [sys.executable, "-m", "kernelsim", "run", "--connect", session.listen_address, "--name", "k2", *option, "-"],
        input="", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert complaint in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert sorted(os.listdir(obj / "kernels")) == ["k1"]
    _alive(session, k1, obj)


def test_a_console_line_that_is_not_utf8_gets_an_error_and_the_kernel_takes_more(process_mapped):
    """The reader of `kernelsim run`'s input decoded the stream as the locale says: with strict
    decoding (PYTHONIOENCODING=utf-8:strict, a UTF-8 locale Python does not coerce) a byte
    that is not UTF-8 ended the reader and the kernel took no command after; with Python's
    usual surrogateescape, the command ran with mangled text.  Now each line is decoded on its
    own, whatever the locale, and one that is not UTF-8 is refused as such."""
    session, k1, obj = process_mapped
    assert k1.process.stdin is not None
    k1.process.stdin.buffer.write(b"read h+\xff\xfe 4\n")
    k1.process.stdin.buffer.flush()
    answer = k1.answer(timeout=10)
    assert answer.startswith("error the command is not UTF-8 text"), answer
    _alive(session, k1, obj)


def test_a_daemon_with_a_console_ends_with_status_0_when_unmounted(tmp_path):
    """Reading the console's lines as bytes (`sys.stdin.buffer` in a thread) made every
    unmount of a daemon with `--console` whose input was still open end in 'Fatal Python
    error: _enter_buffered_busy' and SIGABRT (status -6, a core dump) at interpreter shutdown:
    the reader thread held the buffer's lock in its blocking read.  A user's script that checks
    the daemon's status saw a crash after every clean unmount."""
    from fusepager.session import MountSession

    daemon = MountSession(tmp_path / "store", tmp_path / "mnt", ["k1:4096"])
    try:
        os.mkdir(tmp_path / "mnt" / "objects" / "h")
        assert daemon.command("map h 4096").startswith("ok map h")
        subprocess.run(["fusermount3", "-u", str(daemon.mountpoint)], check=True, timeout=30)
        daemon.process.wait(timeout=60)
        log = daemon.daemon_stderr()
    finally:
        daemon.close()
    assert "Fatal Python error" not in log, log
    assert daemon.process.returncode == 0, log

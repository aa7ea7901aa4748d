"""Issue 14 acceptance: thousands of generated inputs, none of which may end the daemon.

A real mount, object `h` mapped by kernel process k1 (`kernelsim run`), and hypothesis
generating batches of what a user or a program can give: ctl writes (lines with integers
across the whole range, as decimal, hex, with suffixes; empty; split across writes at any
byte; repeated; not UTF-8), extended attribute values, and console commands to k1 (integers
again; not UTF-8).  Each input is given with real system calls from this process (the mount
is served by the daemon, another process) and must get an answer: a write's count or an
errno from the set the mount's reference names, a console line starting `ok` or `error`.
After every batch the daemon is alive and the object's bytes are what they were (no input
here writes data; refused ones must not, and the accepted ones, sync/flush/clean/attributes,
do not), read through the mount and by k1.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mounting import sh

INPUTS_AT_LEAST = 2000
EXAMPLES = 100
BATCH = (20, 40)
"""Inputs per example: 100 examples of 20-40 inputs each give 3,000 on average, in about a
minute of test time (each input is a system call or a console round trip, ~1-10 ms)."""

# --- integers and numbers as text --------------------------------------------------------------

EDGES = [0, 1, 4095, 4096, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**32, 2**62, 2**62 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, -(2**63), 10**30, 10**4000]
INTEGERS = st.one_of(st.sampled_from(EDGES), st.integers(), st.integers(-(2**70), 2**70))


@st.composite
def number_text(draw) -> str:
    value = draw(INTEGERS)
    form = draw(st.sampled_from(["dec", "hex", "suffix", "plain"]))
    if form == "hex":
        return f"{'-' if value < 0 else ''}{abs(value):#x}"
    if form == "suffix":
        return f"{value}{draw(st.sampled_from('kKmMgG'))}"
    return str(value)


WORDS = st.sampled_from(["", "x", "none", "rw", "w", "r", "q", "KERN_SUCCESS", "memory_failure", "KERN_NOPE", "0x", "1e9", "--", "may_cache=1", "copy=call", "copy=delay", "may_cache=maybe", "é", "\t"])
ARGUMENT = st.one_of(number_text(), WORDS)
CTL_WORDS = st.sampled_from(["sync", "flush", "clean", "lock", "destroy", "attributes", "SYNC", "frobnicate", ""])


@st.composite
def ctl_line(draw) -> bytes:
    command = draw(CTL_WORDS)
    arguments = draw(st.lists(ARGUMENT, max_size=4))
    if command == "destroy" and len(arguments) <= 1:
        # A destroy the mount takes would end k1's use of h (that is what it is for): only
        # reasons outside a kern_return_t here (and two or more words, which it refuses).
        arguments = [str(draw(st.one_of(st.integers(max_value=-(2**31) - 1), st.integers(min_value=2**31))))]
    if command == "lock" and len(arguments) == 3:
        arguments[2] = draw(st.sampled_from(["none", "q", "7", "", "rwq"]))  # a lock it takes lifts one
    line = " ".join([command, *arguments]).encode()
    return draw(st.one_of(st.just(line), st.binary(max_size=12).map(lambda junk: line + junk)))


@st.composite
def ctl_write(draw) -> list[bytes]:
    """What one open of ctl is given: lines (some repeated, some empty), cut into writes."""
    lines = draw(st.lists(ctl_line(), min_size=0, max_size=4))
    if lines and draw(st.booleans()):
        lines = lines + lines[:1]  # repeated
    text = b"".join(line + b"\n" for line in lines)
    if draw(st.booleans()):
        text = text.rstrip(b"\n")  # the last line runs at close
    if not text:
        text = draw(st.sampled_from([b"", b"\n", b"   \n", b"\xff\xfe", b"\n\n"]))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=3)))
    pieces, start = [], 0
    for cut in cuts + [len(text)]:
        pieces.append(text[start:cut])
        start = cut
    return [piece for piece in pieces if piece] or [text]


XATTR_NAMES = st.sampled_from([b"user.mach.copy_strategy", b"user.mach.may_cache", b"user.mach.auto_ready", b"user.mach.size", b"user.mach.page_size", b"user.mach.nonsense", b"user.other"])
XATTR_VALUE = st.one_of(number_text().map(str.encode), WORDS.map(str.encode), st.binary(max_size=16), st.sampled_from([b"none", b"call", b"delay", b"0", b"1", b"\xff", b""]))

CONSOLE_COMMANDS = ["read h+{} {}", "read {} {}", "region {}", "sha256 h+{} {}", "map h {} {}", "inherit {} {} share", "protect {} {} rw", "read h+{} {} text", "stat {}", "bogus {}"]


@st.composite
def console_line(draw) -> bytes:
    template = draw(st.sampled_from(CONSOLE_COMMANDS))
    text = template.format(*[draw(number_text()) for _ in range(template.count("{}"))])
    line = text.encode()
    if draw(st.integers(0, 9)) == 0:
        line += draw(st.binary(min_size=1, max_size=6).filter(lambda junk: b"\n" not in junk and b"\r" not in junk))
    return line


INPUT = st.one_of(
    ctl_write().map(lambda pieces: ("ctl", pieces)),
    st.tuples(XATTR_NAMES, XATTR_VALUE).map(lambda pair: ("xattr", pair)),
    console_line().map(lambda line: ("console", line)),
)

CTL_ERRNOS = {errno.EINVAL}
XATTR_ERRNOS = {errno.EINVAL, errno.EROFS, errno.ENOTSUP, errno.E2BIG}


def test_generated_input_never_ends_the_daemon_nor_changes_the_bytes(process_mapped):
    session, k1, obj = process_mapped
    k1.command("pattern h 65536 14")  # every byte of the object known, and k1's
    sh(f"echo sync > {obj}/ctl")
    expected = (obj / "data").read_bytes()
    assert len(expected) == 65536 and expected[:16] != bytes(16)
    digest = hashlib.sha256(expected).hexdigest()
    given_inputs: Counter[str] = Counter()

    def check() -> None:
        assert session.process.poll() is None, session.daemon_stderr()
        assert k1.process.poll() is None, k1.child_stderr()
        assert (obj / "data").read_bytes() == expected
        assert k1.command("sha256 h 65536").endswith(digest)

    def give_ctl(pieces: list[bytes]) -> None:
        fd = os.open(obj / "ctl", os.O_WRONLY)
        try:
            for piece in pieces:
                try:
                    assert os.write(fd, piece) == len(piece)
                except OSError as error:
                    assert error.errno in CTL_ERRNOS, (pieces, error)
        finally:
            try:
                os.close(fd)  # a last line without its newline runs (or is refused) here
            except OSError as error:
                assert error.errno in CTL_ERRNOS, (pieces, error)

    def give_xattr(name: bytes, value: bytes) -> None:
        try:
            os.setxattr(obj, name, value)
        except OSError as error:
            assert error.errno in XATTR_ERRNOS, (name, value, error)
        try:
            os.getxattr(obj, name)
        except OSError as error:
            assert error.errno == errno.ENODATA and name in (b"user.mach.nonsense", b"user.other"), (name, error)

    def give_console(line: bytes) -> None:
        assert k1.process.stdin is not None
        k1.process.stdin.buffer.write(line + b"\n")
        k1.process.stdin.buffer.flush()
        answer = k1.answer()
        assert answer.startswith(("ok ", "error ")), (line, answer)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=False, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=st.lists(INPUT, min_size=BATCH[0], max_size=BATCH[1]))
    def feed(batch):
        for kind, value in batch:
            if kind == "ctl":
                give_ctl(value)
            elif kind == "xattr":
                give_xattr(*value)
            else:
                give_console(value)
            given_inputs[kind] += 1
        check()

    try:
        feed()
    finally:
        print(f"inputs given: {dict(given_inputs)}, {sum(given_inputs.values())} in all")
    # The attribute values it took stay within what the object may have; set them back and
    # check once more, k1 still reading through the mapping.
    os.setxattr(obj, b"user.mach.auto_ready", b"1")
    check()
    assert sum(given_inputs.values()) >= INPUTS_AT_LEAST
    assert min(given_inputs.values()) >= INPUTS_AT_LEAST // 10, given_inputs

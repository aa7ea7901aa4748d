"""What the shell writes into the mount: `ctl` commands, `ready` lines and attribute values.

Pure parsing, no I/O: each function turns text into a typed command or raises ControlError with
a message that says what is wrong (the mount answers EINVAL and writes the message to `trace`).

    ctl:    sync | flush [OFF LEN] | clean [OFF LEN] | lock OFF LEN PROT
            | destroy [REASON] | attributes [may_cache=0|1] [copy=none|call|delay]
    ready:  [may_cache=0|1] [copy=none|call|delay]
Numbers are decimal or 0x hex, with an optional K, M or G (x1024) suffix, from 0 to 2**62
(offsets and lengths); a REASON is a kern_return_t: a KERN_* name or a number that fits a signed
32-bit int.  PROT names the accesses to forbid, as a lock value does: some of r, w, x, or `none`
to lift a lock.

`CtlLines` collects what is written to one open `ctl` into lines: a line is run once it is
whole, however the writes cut it; every line of a write is checked before any runs, and after
a refused line nothing more written to that open file runs.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from kernelsim.interface import (
    MEMORY_OBJECT_COPY_CALL,
    MEMORY_OBJECT_COPY_DELAY,
    MEMORY_OBJECT_COPY_NONE,
    VM_PROT_EXECUTE,
    VM_PROT_NONE,
    VM_PROT_READ,
    VM_PROT_WRITE,
    KERN_RETURN_T,
    KernReturn,
)

MAX_OFFSET = 1 << 62

COPY_STRATEGIES = {
    "none": MEMORY_OBJECT_COPY_NONE,
    "call": MEMORY_OBJECT_COPY_CALL,
    "delay": MEMORY_OBJECT_COPY_DELAY,
}
COPY_NAMES = {value: name for name, value in COPY_STRATEGIES.items()}
BOOLEANS = {"1": True, "0": False, "true": True, "false": False, "yes": True, "no": False}
SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class ControlError(ValueError):
    """The text is not a valid command; the message says why."""


@dataclass(frozen=True)
class Sync:
    pass


@dataclass(frozen=True)
class Flush:
    offset: int = 0
    length: int | None = None


@dataclass(frozen=True)
class Clean:
    offset: int = 0
    length: int | None = None


@dataclass(frozen=True)
class Lock:
    offset: int
    length: int
    lock_value: int


@dataclass(frozen=True)
class Destroy:
    reason: int


@dataclass(frozen=True)
class Attributes:
    may_cache: bool | None = None
    copy_strategy: int | None = None


Command = Sync | Flush | Clean | Lock | Destroy | Attributes

CTL_USAGE = (
    "sync | flush [OFF LEN] | clean [OFF LEN] | lock OFF LEN PROT | destroy [REASON] | "
    "attributes [may_cache=0|1] [copy=none|call|delay]"
)


def parse_number(text: str, what: str) -> int:
    digits, multiplier = text, 1
    if text and text[-1].lower() in SUFFIXES:
        digits, multiplier = text[:-1], SUFFIXES[text[-1].lower()]
    try:
        value = int(digits, 0) * multiplier
    except ValueError:
        raise ControlError(f"{what} {text!r} is not a number") from None
    if value < 0 or value > MAX_OFFSET:
        raise ControlError(f"{what} {text!r} is out of range")
    return value


def parse_prot(text: str) -> int:
    if text.lower() in ("none", "-", "---", "0"):
        return VM_PROT_NONE
    prot = 0
    for letter in text.lower().replace("-", ""):
        bit = {"r": VM_PROT_READ, "w": VM_PROT_WRITE, "x": VM_PROT_EXECUTE}.get(letter)
        if bit is None:
            raise ControlError(f"protection {text!r}: use letters r, w, x, or none")
        prot |= bit
    return prot


def parse_bool(text: str, what: str) -> bool:
    value = BOOLEANS.get(text.lower())
    if value is None:
        raise ControlError(f"{what}={text!r}: use 0 or 1")
    return value


def parse_copy(text: str) -> int:
    value = COPY_STRATEGIES.get(text.lower())
    if value is None:
        raise ControlError(f"copy={text!r}: use none, call or delay")
    return value


def parse_reason(text: str) -> int:
    name = text.upper()
    if name in KernReturn.__members__:
        return int(KernReturn[name])
    if not name.startswith("KERN_") and f"KERN_{name}" in KernReturn.__members__:
        return int(KernReturn[f"KERN_{name}"])
    try:
        value = int(text, 0)
    except ValueError:
        raise ControlError(f"reason {text!r}: a number or a KERN_* name") from None
    if value not in KERN_RETURN_T:
        raise ControlError(f"reason {text!r} is out of range: a reason is a {KERN_RETURN_T.describe()}")
    return value


def parse_attributes(words: list[str], what: str) -> Attributes:
    """`may_cache=1 copy=delay`, each key at most once, either may be left out."""
    values: dict[str, str] = {}
    for word in words:
        key, equals, value = word.partition("=")
        if not equals or not value:
            raise ControlError(f"{what}: {word!r} is not key=value")
        key = {"copy_strategy": "copy", "may_cache_object": "may_cache"}.get(key, key)
        if key not in ("may_cache", "copy"):
            raise ControlError(f"{what}: unknown key {key!r} (may_cache, copy)")
        if key in values:
            raise ControlError(f"{what}: {key} given twice")
        values[key] = value
    return Attributes(
        may_cache=parse_bool(values["may_cache"], "may_cache") if "may_cache" in values else None,
        copy_strategy=parse_copy(values["copy"]) if "copy" in values else None,
    )


def _range(words: list[str], command: str) -> tuple[int, int | None]:
    if not words:
        return 0, None
    if len(words) != 2:
        raise ControlError(f"{command} takes no range or OFF LEN")
    return parse_number(words[0], "offset"), parse_number(words[1], "length")


def parse_ctl(line: str) -> Command:
    """One line written to an object's `ctl`."""
    words = line.split()
    if not words:
        raise ControlError(f"empty command; commands: {CTL_USAGE}")
    command, args = words[0].lower(), words[1:]
    if command == "sync":
        if args:
            raise ControlError("sync takes no arguments (clean OFF LEN cleans a range)")
        return Sync()
    if command == "flush":
        return Flush(*_range(args, "flush"))
    if command == "clean":
        return Clean(*_range(args, "clean"))
    if command == "lock":
        if len(args) != 3:
            raise ControlError("usage: lock OFF LEN PROT (PROT: accesses to forbid, or none)")
        length = parse_number(args[1], "length")
        if length == 0:
            raise ControlError("lock of an empty range")
        return Lock(parse_number(args[0], "offset"), length, parse_prot(args[2]))
    if command == "destroy":
        if len(args) > 1:
            raise ControlError("usage: destroy [REASON]")
        return Destroy(parse_reason(args[0]) if args else int(KernReturn.KERN_TERMINATED))
    if command == "attributes":
        if not args:
            raise ControlError("usage: attributes [may_cache=0|1] [copy=none|call|delay]")
        return parse_attributes(args, "attributes")
    raise ControlError(f"unknown command {command!r}; commands: {CTL_USAGE}")


def parse_ready(text: str) -> Attributes:
    """What the shell writes to `kernels/KERNEL/ready`: one line of attributes."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        raise ControlError("ready takes one line: may_cache=0|1 copy=none|call|delay")
    return parse_attributes(lines[0].split() if lines else [], "ready")


MAX_LINE = 4096
"""The longest ctl line, newline excluded.  What waits for the rest of its line is bounded by
it, so a writer cannot make the daemon hold more."""


class CtlLines:
    """The lines written to one open `ctl` file, as a pipe delivers them: a write may hold
    several lines, or part of one (`sy`, then `nc\n`).

    `take(data)` returns the commands of the lines `data` completes, every one checked before
    any is returned: one bad line refuses the whole write (ControlError) and none of its
    commands runs (all or nothing).  The unterminated last line waits for the next write;
    `rest()` gives it at close, so `echo -n sync > ctl` still runs.  A line longer than
    MAX_LINE is refused as soon as it is that long.

    A refusal also ends what this open file takes: every later write is refused, and a line
    left at close does not run.  A shell's `printf 'a\nb\nc\n'` writes each line on its own,
    so this is what keeps `c` from running after `b` was refused (`a` ran before `b` came)."""

    def __init__(self) -> None:
        self._partial = b""
        self._refused = ""  # why an earlier write was refused, if one was

    def take(self, data: bytes) -> list[tuple[str, Command]]:
        if self._refused:
            raise ControlError(f"an earlier line on this open file was refused ({self._refused}): nothing after it runs; open ctl again")
        try:
            commands, self._partial = _lines(self._partial + data)
        except ControlError as error:
            self._refused, self._partial = str(error), b""
            raise
        return commands

    def rest(self) -> list[tuple[str, Command]]:
        """The command of the unterminated last line, if there is one (at close)."""
        tail, self._partial = self._partial, b""
        if not tail.strip() or self._refused:
            return []
        line = _decode(tail)
        return [(line.strip(), parse_ctl(line))]

    @property
    def pending(self) -> bool:
        return bool(self._partial.strip())


def _lines(text: bytes) -> tuple[list[tuple[str, Command]], bytes]:
    """The commands of the whole lines of `text`, and what is left of its last line."""
    *whole, tail = text.split(b"\n")
    if len(tail) > MAX_LINE or any(len(line) > MAX_LINE for line in whole):
        raise ControlError(f"a line longer than {MAX_LINE} bytes")
    lines = [_decode(line) for line in whole]
    try:
        codecs.getincrementaldecoder("utf-8")().decode(tail, final=False)  # may become text?
    except UnicodeDecodeError:
        raise ControlError("not UTF-8 text") from None
    commands = [(line.strip(), parse_ctl(line)) for line in lines if line.strip()]
    if lines and not commands and not tail.strip():
        parse_ctl("")  # a write of empty lines only: say what the commands are
    return commands, tail


def _decode(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlError("not UTF-8 text") from None

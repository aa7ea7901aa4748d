"""What the shell writes into the mount: `ctl` commands, `ready` lines and attribute values.

Pure parsing, no I/O: each function turns text into a typed command or raises ControlError with
a message that says what is wrong (the mount answers EINVAL and writes the message to `trace`).

    ctl:    sync | flush [OFF LEN] | clean [OFF LEN] | lock OFF LEN PROT
            | destroy [REASON] | attributes [may_cache=0|1] [copy=none|call|delay]
    ready:  [may_cache=0|1] [copy=none|call|delay]
Numbers are decimal or 0x hex, with an optional K, M or G (x1024) suffix.  PROT names the
accesses to forbid, as a lock value does: some of r, w, x, or `none` to lift a lock.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernelsim.interface import (
    MEMORY_OBJECT_COPY_CALL,
    MEMORY_OBJECT_COPY_DELAY,
    MEMORY_OBJECT_COPY_NONE,
    VM_PROT_EXECUTE,
    VM_PROT_NONE,
    VM_PROT_READ,
    VM_PROT_WRITE,
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
        return int(text, 0)
    except ValueError:
        raise ControlError(f"reason {text!r}: a number or a KERN_* name") from None


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

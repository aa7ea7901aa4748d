"""A kernel driven by text commands: one command a line, one answer a line.

The console is how a person (or a test) makes a kernel's tasks map, read and write memory
objects without writing Python: `fusepager mount ... --kernel k1:4096` serves one on its
standard input.  Every command gets one answer line starting with `ok ` or `error `, so it is
easy to parse (lines starting with `#` are information, such as the help text):

    map hello 65536                ok map hello 0x10000 65536
    write hello+4096 hi there      ok write 0x11000 8
    read hello+4096 8              ok read 0x11000 8 6869207468657265
    read hello+4096 8 text         ok read 0x11000 8 'hi there'
    region hello                   ok region 0x10000 65536 prot=rw- max=rwx inherit=copy shared=0 offset=0 name=7
    error: KERN_INVALID_ADDRESS ...

Addresses are numbers (0x... or decimal) or NAME[+OFFSET]: the mapping of NAME made with
`map` in the current task.  Objects are found by name through the manager (`resolve`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shlex
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import trio

from .interface import (
    VM_INHERIT_COPY,
    VM_INHERIT_NONE,
    VM_INHERIT_SHARE,
    VM_PROT_EXECUTE,
    VM_PROT_NONE,
    VM_PROT_READ,
    VM_PROT_WRITE,
    KernError,
    prot_str,
)
from .ipc_port import SendRight
from .kernel import Kernel
from .manager_wait import waiting_report
from .task import Task

log = logging.getLogger("kernelsim.console")

Resolver = Callable[[str], Awaitable[SendRight]]

INHERITANCE = {"share": VM_INHERIT_SHARE, "copy": VM_INHERIT_COPY, "none": VM_INHERIT_NONE}
INHERITANCE_NAMES = {value: name for name, value in INHERITANCE.items()}
MAX_READ = 16 * 1024 * 1024

HELP = """\
commands (answers start with 'ok' or 'error'):
  map NAME SIZE [OFFSET] [prot=rw] [max=rwx] [inherit=copy]
                              map SIZE bytes of object NAME from OFFSET into the current task
  allocate NAME SIZE          vm_allocate: SIZE bytes of anonymous memory, a mapping called NAME
  unmap WHERE [SIZE]          vm_deallocate (a whole mapping when WHERE is a name)
  copy WHERE SIZE WHERE       vm_copy: the second range gets the first's contents as of now
  read WHERE LEN [text]       LEN bytes, as hex (or as a quoted string with 'text')
  write WHERE TEXT...         the rest of the line, UTF-8 (\\n, \\t, \\xNN understood)
  writehex WHERE HEX          bytes given in hex
  fill WHERE LEN BYTE         LEN copies of BYTE (0-255)
  pattern WHERE LEN SEED      LEN bytes of the test pattern SEED (see pattern_bytes)
  sha256 WHERE LEN            the SHA-256 of LEN bytes, read by the task
  protect WHERE SIZE PROT     vm_protect: PROT is some of r, w, x, or none
  inherit WHERE SIZE share|copy|none
  region WHERE                vm_region
  fork [NAME]                 a child of the current task (task_create with inherit_memory)
  task NAME                   make task NAME the current one
  tasks                       list the tasks
  sync [NAME]                 send the pages tasks changed to their managers (they stay cached)
  stat                        the kernel's counters, and the faults waiting for a manager
  help                        this text
WHERE is an address (0x10000, 65536) or NAME[+OFFSET] for a mapping made with 'map'.
Numbers may end in K, M, G or T (x1024): map big 1T.
"""


CHUNK = 1 << 20
PATTERN_BLOCK = 4096


def pattern_bytes(seed: int, offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of test pattern `seed`: every 4 KiB block differs, so a
    page in the wrong place shows.  Tests compute the same bytes to check what a task wrote."""
    first = offset // PATTERN_BLOCK
    last = (offset + length - 1) // PATTERN_BLOCK if length else first - 1
    blocks = b"".join(random.Random(f"{seed}:{block}").randbytes(PATTERN_BLOCK) for block in range(first, last + 1))
    skip = offset - first * PATTERN_BLOCK
    return blocks[skip : skip + length]


class ConsoleError(Exception):
    """A command the console cannot carry out; the text says why."""


@dataclass
class Mapping:
    name: str
    address: int
    size: int


def parse_prot(text: str) -> int:
    if text in ("none", "-", "---"):
        return VM_PROT_NONE
    prot = 0
    for letter in text.replace("-", ""):
        bit = {"r": VM_PROT_READ, "w": VM_PROT_WRITE, "x": VM_PROT_EXECUTE}.get(letter)
        if bit is None:
            raise ConsoleError(f"bad protection {text!r}: use letters r, w, x or 'none'")
        prot |= bit
    return prot


SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MAX_NUMBER = (1 << 64) - 1
"""No number a command takes is wider than an address (vm_offset_t on a 64-bit host); the kernel
calls refuse the values past their own limits with a KERN_* error."""


def parse_number(text: str, what: str) -> int:
    """Decimal or 0x hex, with an optional K, M, G or T (x1024) suffix."""
    digits, multiplier = text, 1
    if text and text[-1].lower() in SUFFIXES and not text.lower().startswith("0x"):
        digits, multiplier = text[:-1], SUFFIXES[text[-1].lower()]
    try:
        value = int(digits, 0) * multiplier
    except ValueError:
        raise ConsoleError(f"bad {what} {text!r}: not a number") from None
    if value < 0:
        raise ConsoleError(f"bad {what} {text!r}: negative")
    if value > MAX_NUMBER:
        raise ConsoleError(f"bad {what} {text!r}: out of range (at most {MAX_NUMBER:#x}, a 64-bit address)")
    return value


def unescape(text: str) -> bytes:
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("utf-8")
    except UnicodeDecodeError as error:
        raise ConsoleError(f"bad escape in {text!r}: {error.reason}") from None


class Console:
    def __init__(self, kernel: Kernel, resolve: Resolver) -> None:
        self.kernel = kernel
        self.resolve = resolve
        self.tasks: dict[str, Task] = {}
        self.mappings: dict[str, dict[str, Mapping]] = {}
        self.current: Task = None  # type: ignore[assignment]  # t1, made by the first command

    async def _new_task(self, name: str, parent: Task | None = None) -> Task:
        task = await self.kernel.task_create(parent, inherit_memory=parent is not None, name=name)
        self.tasks[name] = task
        inherited = self.mappings.get(parent.name, {}) if parent is not None else {}
        self.mappings[name] = {key: Mapping(m.name, m.address, m.size) for key, m in inherited.items()}
        return task

    @property
    def task(self) -> Task:
        return self.current

    def where(self, text: str) -> int:
        name, plus, offset = text.partition("+")
        if name and not name[0].isdigit():
            mapping = self.mappings[self.current.name].get(name)
            if mapping is None:
                raise ConsoleError(f"no mapping named {name!r} in task {self.current.name}")
            return mapping.address + (parse_number(offset, "offset") if plus else 0)
        return parse_number(text, "address")

    async def execute(self, line: str) -> str:
        """Run one command line; the answer line (without newline)."""
        line = line.strip()
        if not line or line.startswith("#"):
            return ""
        if self.current is None:
            self.current = await self._new_task("t1")
        command, _, rest = line.partition(" ")
        handler = getattr(self, f"do_{command}", None)
        if handler is None:
            return f"error unknown command {command!r} (try 'help')"
        try:
            return "ok " + await handler(rest.strip())
        except ConsoleError as error:
            return f"error {error}"
        except KernError as error:
            return f"error {error}"
        except ValueError as error:
            return f"error {error}"
        except Exception as error:
            # A bug met by this command: it answers an error, and the kernel (and every other
            # task and object it serves) goes on.  The traceback goes to the log.
            log.exception("console: internal error in %r", line)
            return f"error internal error in {command}: {error!r} (see the log)"

    # -- commands ----------------------------------------------------------------------------

    async def do_help(self, rest: str) -> str:
        # Information lines start with '#', so a parser reading answers can skip them.
        return "help\n" + "\n".join(f"# {line}" for line in HELP.splitlines())

    async def do_map(self, rest: str) -> str:
        words = shlex.split(rest)
        positional = [w for w in words if "=" not in w]
        options = dict(w.split("=", 1) for w in words if "=" in w)
        if len(positional) not in (2, 3):
            raise ConsoleError("usage: map NAME SIZE [OFFSET] [prot=rw] [max=rwx] [inherit=copy]")
        name = positional[0]
        size = parse_number(positional[1], "size")
        offset = parse_number(positional[2], "offset") if len(positional) == 3 else 0
        unknown = set(options) - {"prot", "max", "inherit"}
        if unknown:
            raise ConsoleError(f"unknown option {sorted(unknown)[0]!r}")
        inheritance = options.get("inherit", "copy")
        if inheritance not in INHERITANCE:
            raise ConsoleError(f"bad inheritance {inheritance!r}: share, copy or none")
        if name in self.mappings[self.current.name]:
            raise ConsoleError(f"task {self.current.name} already maps {name!r}; unmap it first")
        right = await self.resolve(name)
        try:
            address = await self.current.vm_map(
                right,
                size,
                offset,
                protection=parse_prot(options.get("prot", "rw")),
                max_protection=parse_prot(options.get("max", "rwx")),
                inheritance=INHERITANCE[inheritance],
            )
        finally:
            right.deallocate()
        rounded = self.current.vm_region(address).size
        self.mappings[self.current.name][name] = Mapping(name, address, rounded)
        entry = self.current.map.lookup(address)
        returned = ""
        if entry is not None and not entry.object.internal:
            entry.object.tag = name
            if name in self.kernel.orphans:
                count = await self.kernel.return_orphans(entry.object)
                returned = f" returned={count}"
        return f"map {name} {address:#x} {rounded}{returned}"

    async def do_sync(self, rest: str) -> str:
        words = rest.split()
        if len(words) > 1:
            raise ConsoleError("usage: sync [NAME]")
        mine = self.mappings[self.current.name]
        names = words or sorted(mine)
        count = 0
        for name in names:
            mapping = mine.get(name)
            if mapping is None:
                raise ConsoleError(f"no mapping named {name!r} in task {self.current.name}")
            entry = self.current.map.lookup(mapping.address)
            if entry is not None:
                count += self.kernel.vm_sync(entry.object)
        return f"sync {count}"

    async def do_allocate(self, rest: str) -> str:
        words = rest.split()
        if len(words) != 2:
            raise ConsoleError("usage: allocate NAME SIZE")
        name, size = words[0], parse_number(words[1], "size")
        if not name or name[0].isdigit():
            raise ConsoleError(f"bad mapping name {name!r}: it must not start with a digit")
        if name in self.mappings[self.current.name]:
            raise ConsoleError(f"task {self.current.name} already has a mapping {name!r}")
        address = self.current.vm_allocate(size)
        rounded = self.current.vm_region(address).size
        self.mappings[self.current.name][name] = Mapping(name, address, rounded)
        return f"allocate {name} {address:#x} {rounded}"

    async def do_copy(self, rest: str) -> str:
        words = rest.split()
        if len(words) != 3:
            raise ConsoleError("usage: copy WHERE SIZE WHERE")
        source, size, destination = self.where(words[0]), parse_number(words[1], "size"), self.where(words[2])
        await self.current.vm_copy(source, size, destination)
        return f"copy {source:#x} {size} {destination:#x}"

    async def do_unmap(self, rest: str) -> str:
        words = rest.split()
        if len(words) not in (1, 2):
            raise ConsoleError("usage: unmap WHERE [SIZE]")
        mine = self.mappings[self.current.name]
        if len(words) == 1:
            mapping = mine.get(words[0])
            if mapping is None:
                raise ConsoleError("give a SIZE, or the name of a mapping")
            address, size = mapping.address, mapping.size
        else:
            address, size = self.where(words[0]), parse_number(words[1], "size")
        self.current.vm_deallocate(address, size)
        for key, mapping in list(mine.items()):
            if address <= mapping.address < address + size:
                del mine[key]
        return f"unmap {address:#x} {size}"

    async def do_read(self, rest: str) -> str:
        words = rest.split()
        if len(words) not in (2, 3) or (len(words) == 3 and words[2] != "text"):
            raise ConsoleError("usage: read WHERE LEN [text]")
        address, length = self.where(words[0]), parse_number(words[1], "length")
        if length > MAX_READ:
            raise ConsoleError(f"read of {length} bytes: at most {MAX_READ} at once")
        data = await self.current.read(address, length)
        shown = repr(data)[1:] if len(words) == 3 else data.hex()
        return f"read {address:#x} {length} {shown}"

    async def _write(self, address: int, data: bytes) -> str:
        await self.current.write(address, data)
        return f"write {address:#x} {len(data)}"

    async def do_write(self, rest: str) -> str:
        where, _, text = rest.partition(" ")
        if not where:
            raise ConsoleError("usage: write WHERE TEXT...")
        return await self._write(self.where(where), unescape(text))

    async def do_writehex(self, rest: str) -> str:
        words = rest.split()
        if len(words) != 2:
            raise ConsoleError("usage: writehex WHERE HEX")
        try:
            data = bytes.fromhex(words[1])
        except ValueError:
            raise ConsoleError(f"bad hex {words[1][:40]!r}") from None
        return await self._write(self.where(words[0]), data)

    async def do_fill(self, rest: str) -> str:
        words = rest.split()
        if len(words) != 3:
            raise ConsoleError("usage: fill WHERE LEN BYTE")
        address, length, byte = self.where(words[0]), parse_number(words[1], "length"), parse_number(words[2], "byte")
        if byte > 255:
            raise ConsoleError(f"bad byte {byte}: 0 to 255")
        for start in range(0, length, CHUNK):
            await self.current.write(address + start, bytes([byte]) * min(CHUNK, length - start))
        return f"fill {address:#x} {length}"

    async def do_pattern(self, rest: str) -> str:
        words = rest.split()
        if len(words) != 3:
            raise ConsoleError("usage: pattern WHERE LEN SEED")
        address, length, seed = self.where(words[0]), parse_number(words[1], "length"), parse_number(words[2], "seed")
        for start in range(0, length, CHUNK):
            await self.current.write(address + start, pattern_bytes(seed, start, min(CHUNK, length - start)))
        return f"pattern {address:#x} {length} {seed}"

    async def do_sha256(self, rest: str) -> str:
        words = rest.split()
        if len(words) != 2:
            raise ConsoleError("usage: sha256 WHERE LEN")
        address, length = self.where(words[0]), parse_number(words[1], "length")
        digest = hashlib.sha256()
        for start in range(0, length, CHUNK):
            digest.update(await self.current.read(address + start, min(CHUNK, length - start)))
        return f"sha256 {address:#x} {length} {digest.hexdigest()}"

    async def do_protect(self, rest: str) -> str:
        words = rest.split()
        if len(words) != 3:
            raise ConsoleError("usage: protect WHERE SIZE PROT")
        address, size = self.where(words[0]), parse_number(words[1], "size")
        prot = parse_prot(words[2])
        self.current.vm_protect(address, size, False, prot)
        return f"protect {address:#x} {size} {prot_str(prot)}"

    async def do_inherit(self, rest: str) -> str:
        words = rest.split()
        if len(words) != 3 or words[2] not in INHERITANCE:
            raise ConsoleError("usage: inherit WHERE SIZE share|copy|none")
        address, size = self.where(words[0]), parse_number(words[1], "size")
        self.current.vm_inherit(address, size, INHERITANCE[words[2]])
        return f"inherit {address:#x} {size} {words[2]}"

    async def do_region(self, rest: str) -> str:
        words = rest.split()
        if len(words) != 1:
            raise ConsoleError("usage: region WHERE")
        region = self.current.vm_region(self.where(words[0]))
        name = region.name.name
        region.name.deallocate()
        return (
            f"region {region.address:#x} {region.size} prot={prot_str(region.protection)} "
            f"max={prot_str(region.max_protection)} inherit={INHERITANCE_NAMES[region.inheritance]} "
            f"shared={int(region.shared)} offset={region.offset} name={name}"
        )

    async def do_fork(self, rest: str) -> str:
        name = rest.strip() or f"t{len(self.tasks) + 1}"
        if name in self.tasks:
            raise ConsoleError(f"task {name!r} exists")
        await self._new_task(name, parent=self.current)
        return f"fork {name}"

    async def do_task(self, rest: str) -> str:
        if rest not in self.tasks:
            raise ConsoleError(f"no task {rest!r}; tasks: {' '.join(self.tasks)}")
        self.current = self.tasks[rest]
        return f"task {rest}"

    async def do_tasks(self, rest: str) -> str:
        return "tasks " + " ".join(("*" if task is self.current else "") + name for name, task in self.tasks.items())

    async def do_stat(self, rest: str) -> str:
        counters = " ".join(f"{key}={value}" for key, value in self.kernel.stats.as_dict().items())
        # Faults waiting for a manager: how many and the longest wait on the answer line, then
        # one information line each (object, offset, manager, seconds), longest first.
        waiting = waiting_report(self.kernel)
        longest = max((fault.waited() for fault in self.kernel.waiting_faults), default=0.0)
        return (
            f"stat kernel={self.kernel.name} page_size={self.kernel.page_size} "
            f"resident={self.kernel.resident.count} peak={self.kernel.resident.peak} "
            f"limit={self.kernel.resident.limit} {counters} "
            f"faults_waiting={len(waiting)} longest_wait={longest:.1f}"
        ) + "".join(f"\n# fault {line}" for line in waiting)



def _stdin_lines() -> Iterator[bytes]:
    """Standard input's lines as bytes, read with os.read: a read of sys.stdin.buffer blocked
    in a daemon thread holds the buffer's lock, and the interpreter's shutdown, which takes it,
    then aborts the process ('Fatal Python error: _enter_buffered_busy', SIGABRT) whenever the
    program ends while its input is still open (a daemon unmounted with --console)."""
    pending = b""
    while True:
        chunk = os.read(sys.stdin.fileno(), 65536)
        if not chunk:
            break
        pending += chunk
        if b"\n" not in chunk:
            continue  # a long line coming in pieces: split once it ends, not at every piece
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line + b"\n"
    if pending:
        yield pending


async def serve_stdin(execute: Callable[[str], Awaitable[str]], *, prompt: Callable[[], str] | None = None) -> None:
    """Answer command lines from standard input with `execute` until the input ends.

    Lines are read by a daemon thread: a blocking read of a terminal or pipe is the one thing
    trio cannot wait on without switching stdin to non-blocking mode, which would leak into
    the user's shell."""
    send, receive = trio.open_memory_channel[bytes | None](0)
    token = trio.lowlevel.current_trio_token()

    def reader() -> None:
        try:
            # Bytes, decoded one line at a time below: a line that is not UTF-8 gets its error
            # answer, where decoding the stream would end the reader (and the input) there.
            for line in _stdin_lines():
                trio.from_thread.run(send.send, line, trio_token=token)
            trio.from_thread.run(send.send, None, trio_token=token)
        except trio.RunFinishedError:
            pass

    threading.Thread(target=reader, name="console stdin", daemon=True).start()
    while True:
        if prompt is not None:
            print(prompt(), end="", flush=True)
        raw = await receive.receive()
        if raw is None:
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            print(f"error the command is not UTF-8 text: {raw[:60]!r}", flush=True)
            continue
        answer = await execute(line)
        if answer:
            print(answer, flush=True)

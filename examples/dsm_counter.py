#!/usr/bin/env python3
"""Distributed shared memory: two kernels in processes of their own share one counter.

Run it:  examples/dsm_counter.py            (or: .venv/bin/python examples/dsm_counter.py)
         examples/dsm_counter.py --rounds 50 --show 2
         examples/dsm_counter.py --keep     (leave the mount in place to look around)

A `fusepager mount` daemon is the memory manager.  Two simulated Mach kernels run as separate
processes (`kernelsim run --connect ADDR`), k1 with 4 KiB pages and k2 with 16 KiB pages, and
map the same memory object.  Its first page holds a counter, `counter=00000000`.  The kernels
take turns: a task reads the counter, adds one and writes it back.

Neither kernel knows about the other.  The manager keeps them coherent: before k2 may read the
page, k1 must return its changes (memory_object_lock_request, memory_object_data_return); before
k2 may write it, k1 must give the page up (a lock request with should_flush=1).  So the page,
with the right to write it, moves from one kernel to the other at every turn, and the script
shows it moving: the protocol lines in the mount's `trace` and each kernel's `pages` file.
At the end both kernels, `cat` and `xxd` must read 2 x ROUNDS, or the script exits 1.

Every step is printed as the shell command (or kernel console command) that does it by hand.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

try:
    from fusepager.session import KernelProcess, SessionError
except ImportError:
    # Started with a Python that is not the project's: run again with the venv's.
    if VENV_PYTHON.exists() and not os.environ.get("DSM_COUNTER_REEXEC"):
        os.environ["DSM_COUNTER_REEXEC"] = "1"
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])
    raise

import argparse
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time

OBJECT = "counter"
COUNTER_AT = 8  # the digits follow 'counter='
DIGITS = 8
KERNELS = (("k1", 4096), ("k2", 16384))


class CheckFailed(Exception):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)


def say(text: str) -> None:
    print()
    print(textwrap.fill(text, width=100), flush=True)


class Walkthrough:
    def __init__(self, base: Path, rounds: int, show: int) -> None:
        self.base = base
        self.store = base / "store"
        self.mnt = base / "mnt"
        self.obj = self.mnt / "objects" / OBJECT
        self.rounds = rounds
        self.show = show
        self.address = ""
        self.daemon_pid: int | None = None
        self.kernels: dict[str, KernelProcess] = {}

    # -- showing what happens ----------------------------------------------------------------

    def shown(self, text: str) -> str:
        """`text` with the paths written as the shell variables the narration set."""
        return text.replace(str(self.obj), "$OBJ").replace(str(self.mnt), "$MNT").replace(str(self.base), "$DIR")

    def shell(self, command: str, *, check_status: bool = True) -> str:
        """Run a shell command as a user would, print it and what it printed."""
        print(f"  $ {self.shown(command)}", flush=True)
        result = subprocess.run(["bash", "-c", command], check=False, capture_output=True, text=True, timeout=60)
        output = (result.stdout + result.stderr).rstrip("\n")
        for line in output.splitlines():
            print(f"    {self.shown(line)}")
        if check_status:
            check(result.returncode == 0, f"{command!r} failed (status {result.returncode}): {output}")
        return result.stdout

    def kernel(self, name: str, command: str, *, quiet: bool = False) -> str:
        """A console command to kernel process `name` (typed at its `kernelsim run` prompt)."""
        process = self.kernels[name]
        try:
            answer = process.answer_to(command)
        except (BrokenPipeError, SessionError) as error:
            # Its input or output closed: it is exiting, or gone already (a kill -9).
            try:
                process.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                raise error from None  # alive: something else went wrong
            raise SessionError(f"kernel process {name} is gone (status {process.process.returncode})") from None
        if not quiet:
            print(f"  {name}> {command}")
            print(f"    {answer}", flush=True)
        check(answer.startswith("ok"), f"{name}> {command}: {answer}")
        return answer

    def read_counter(self, name: str, *, quiet: bool = False) -> int:
        answer = self.kernel(name, f"read {OBJECT}+{COUNTER_AT} {DIGITS} text", quiet=quiet)
        text = answer.split("'")[1]
        check(text.isdigit(), f"{name} read {text!r} where the counter should be")
        return int(text)

    def trace_size(self) -> int:
        return os.stat(self.mnt / "trace").st_size

    def trace_since(self, offset: int) -> list[str]:
        """The trace lines added since `offset`, without their timestamps."""
        with open(self.mnt / "trace", "rb") as trace:
            trace.seek(offset)
            text = trace.read().decode(errors="replace")
        return [line.split(" ", 1)[1] if " " in line else line for line in text.splitlines()]

    def pages(self, name: str) -> list[str]:
        """Kernel `name`'s pagemap lines (none before its first fault)."""
        path = self.obj / "kernels" / name / "pages"
        try:
            return path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def stats(self) -> dict[str, int]:
        pairs = (line.split() for line in (self.mnt / "stats").read_text().splitlines())
        return {key: int(value) for key, value in pairs}

    # -- the walkthrough -----------------------------------------------------------------------

    def mount(self) -> None:
        say(
            f"A store directory and a mount point, in DIR={self.base}. `fusepager mount` (without "
            "-f) starts the daemon in the background and returns once it has mounted; its line "
            "says where kernel processes connect:"
        )
        print(f"  $ DIR={self.base}; MNT=$DIR/mnt; OBJ=$MNT/objects/{OBJECT}")
        self.shell(f"mkdir -p {self.store} {self.mnt}")
        command = [sys.executable, "-m", "fusepager", "mount", str(self.store), str(self.mnt)]
        print("  $ .venv/bin/fusepager mount $DIR/store $MNT")
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
        output = (result.stdout + result.stderr).strip()
        for line in output.splitlines():
            print(f"    {line}")
        check(result.returncode == 0 and "kernels connect to " in output, f"the mount failed: {output}")
        self.address = output.rsplit("kernels connect to ", 1)[1].split()[0]
        self.daemon_pid = int(output.split("(pid ", 1)[1].split(")", 1)[0])

    def make_object(self) -> None:
        say(
            f"A memory object is a directory in objects/, its bytes are the file data. The counter "
            f"is {DIGITS} decimal digits at byte {COUNTER_AT} of the first page:"
        )
        self.shell(f"mkdir {self.obj}")
        self.shell(f"truncate -s 64K {self.obj}/data")
        self.shell(f"printf 'counter=%0{DIGITS}d\\n' 0 | dd of={self.obj}/data conv=notrunc status=none")
        self.shell(f"xxd -l 32 {self.obj}/data")

    def start_kernels(self) -> None:
        say(
            "Two kernels, each a process of its own as if on two machines, connect to the daemon. "
            "By hand (from the repository's root), each runs in a terminal of its own and takes "
            "console commands on stdin:"
        )
        for name, page_size in KERNELS:
            print(f"  $ .venv/bin/kernelsim run --connect {self.address} --name {name} --page-size {page_size}")
            self.kernels[name] = KernelProcess(self.address, name, page_size=page_size, workdir=self.base)
            for line in self.kernels[name].info:
                print(f"    {line}")
        say("Each maps the object into its task. Mapping sends nothing yet: the first fault will.")
        for name, _ in KERNELS:
            self.kernel(name, f"map {OBJECT} 64K")

    def turn(self, number: int, writer: str, other: str, shown: bool) -> bool:
        """One turn: `writer` reads the counter, adds one, writes it back.  Whether the page
        moved to it from `other`."""
        before = self.trace_size()
        if shown:
            print(f"\nTurn {number}: {writer} increments the counter.")
        value = self.read_counter(writer, quiet=not shown)
        if value != number - 1 and self.kernels[other].process.poll() is not None:
            raise SessionError(
                f"kernel process {other} died (status {self.kernels[other].process.returncode}) holding page 0: "
                f"the change it had not returned is lost ({writer} read {value}, expected {number - 1})"
            )
        check(value == number - 1, f"turn {number}: {writer} read {value}, expected {number - 1}")
        self.kernel(writer, f"write {OBJECT}+{COUNTER_AT} {value + 1:0{DIGITS}d}", quiet=not shown)
        lines = [line for line in self.trace_since(before) if "memory_object" in line]
        mine, theirs = self.pages(writer), self.pages(other)

        # The protocol, as the trace must tell it: the writer faulted and asked to write ...
        def seen(text: str) -> bool:
            return any(text in line for line in lines)

        check(seen(f"{writer} -> {OBJECT} memory_object_data_request("), f"turn {number}: no data_request from {writer}")
        check(seen(f"{OBJECT} -> {writer} memory_object_data_supply("), f"turn {number}: no data_supply to {writer}")
        check(seen(f"{writer} -> {OBJECT} memory_object_data_unlock("), f"turn {number}: no data_unlock from {writer}")
        # ... and it holds the page now, writable and changed; the other kernel does not.
        check(
            any(_fields(line)[0] == "0x0" and _fields(line)[2] == "rw-" and "dirty" in _fields(line)[3] for line in mine),
            f"turn {number}: {writer}'s pages do not show page 0 rw- dirty: {mine}",
        )
        check(not any(line.startswith("0x0 ") for line in theirs), f"turn {number}: {other} still holds page 0: {theirs}")
        moved = number > 1
        if moved:
            # ... which the other kernel had: it returned its changes and was flushed.
            check(seen(f"{other} -> {OBJECT} memory_object_data_return("), f"turn {number}: {other} returned nothing")
            check(
                any(f"{OBJECT} -> {other} memory_object_lock_request(" in line and "should_flush=1" in line for line in lines),
                f"turn {number}: {other} was not asked to flush the page",
            )
        if shown:
            print("  new lines in $MNT/trace:")
            for line in lines:
                print(f"    {line}")
            for name in (writer, other):
                print(f"  $ cat $OBJ/kernels/{name}/pages")
                for line in self.pages(name) or [f"(nothing: {name} holds no page of the object)"]:
                    print(f"    {line}")
            if moved:
                print(f"  => page 0 moved from {other} to {writer}: {writer} holds it rw- dirty, {other} has none of it")
            else:
                print(f"  => page 0 is {writer}'s, rw- dirty: {other} has not touched the object yet")
        else:
            handover = f"page 0: {other} -> {writer} (data_return, flush)" if moved else f"page 0: new to {writer}"
            print(
                f"  turn {number:3}: {writer} read {value:0{DIGITS}d} wrote {value + 1:0{DIGITS}d} | {handover} | "
                f"{writer}: {', '.join(mine) or '-'} | {other}: {', '.join(theirs) or '-'}"
            )
        return moved

    def take_turns(self) -> dict[str, int]:
        say(
            "The kernels take turns: read the counter, add one, write it back. Watch page 0 move. "
            "A read fault (data_request) makes the manager ask the kernel holding the page for its "
            "changes (lock_request should_return=dirty lock_value=-w-, answered by data_return and "
            "lock_completed) before supplying it (data_supply, write-locked: a read was asked "
            "for). The write then asks for write access (data_unlock): the other kernel must give "
            "the page up (lock_request should_flush=1) before the manager unlocks it for the "
            "writer (lock_request lock_value=---). In each kernel's `pages`, 'rw- dirty' follows "
            "the writer. (k2's page 0 is 16 KiB: it covers k1's pages 0 to 3.)"
        )
        stats_before = self.stats()
        moves = 0
        total = 2 * self.rounds
        for number in range(1, total + 1):
            writer, other = ("k1", "k2") if number % 2 else ("k2", "k1")
            shown = number <= self.show
            if number == self.show + 1:
                print("\nThe other turns, one line each:")
            moves += self.turn(number, writer, other, shown)
        print(f"\nPage 0 changed hands {moves} times in {total} turns.")
        check(moves == total - 1, f"page 0 moved {moves} times, expected {total - 1}")
        after = self.stats()
        return {key: after[key] - stats_before.get(key, 0) for key in after if "." in key}

    def final_checks(self, counts: dict[str, int]) -> None:
        expected = 2 * self.rounds
        say(f"Both kernels read the counter: it must be {expected} (2 x {self.rounds} rounds).")
        for name, _ in KERNELS:
            value = self.read_counter(name)
            check(value == expected, f"{name} reads {value}, expected {expected}")
        say(
            "The shell reads it too: a read of data has the kernels return their changes first. "
            "`echo sync > ctl` makes it durable, and the store's own file has it:"
        )
        text = f"counter={expected:0{DIGITS}d}"
        shown = self.shell(f"head -c {len(text)} {self.obj}/data; echo")
        check(shown.strip() == text, f"cat data shows {shown.strip()!r}, expected {text!r}")
        dump = self.shell(f"xxd -l 16 {self.obj}/data")
        check(dump.rstrip("\n").endswith(text), f"xxd shows {dump.strip()!r}, expected it to end with {text!r}")
        self.shell(f"echo sync > {self.obj}/ctl")
        stored = self.shell(f"xxd -l 16 {self.store}/objects/{OBJECT}/data")
        check(stored.rstrip("\n").endswith(text), f"the store file holds {stored.strip()!r}, expected {text!r}")

        say(f"What the {expected} turns cost, from $MNT/stats (messages during the turns, and per turn):")
        for key in sorted(counts, key=lambda k: (not k.startswith("in."), k)):
            if counts[key]:
                print(f"    {key:<36} {counts[key]:6}   {counts[key] / expected:5.2f} per turn")
        check(counts.get("in.memory_object_data_return", 0) >= expected - 1, "fewer data_returns than handovers")
        check(counts.get("in.memory_object_data_unlock", 0) >= expected, "fewer data_unlocks than writes")
        check(counts.get("in.memory_object_data_request", 0) >= expected, "fewer data_requests than turns")

    def dead_kernels(self) -> str:
        """Which kernel processes have exited, e.g. 'kernel process k2 exited (status -9)'."""
        return ", ".join(
            f"kernel process {name} exited (status {process.process.returncode})"
            for name, process in self.kernels.items()
            if process.process.poll() is not None
        )

    # -- ending --------------------------------------------------------------------------------

    def end_kernels(self) -> None:
        for name, process in self.kernels.items():
            try:
                process.close(timeout=10)  # end of its commands: it returns its pages and exits
            except Exception as error:  # noqa: BLE001  (ending the other kernel matters more)
                print(f"dsm_counter: ending kernel {name}: {error}", file=sys.stderr)

    def unmount(self) -> None:
        if not os.path.ismount(self.mnt) and not _listed_in_mounts(self.mnt):
            return
        result = subprocess.run(
            [sys.executable, "-m", "fusepager", "umount", str(self.mnt)], check=False, capture_output=True, text=True, timeout=60
        )
        print(f"  $ .venv/bin/fusepager umount $MNT\n    {(result.stdout + result.stderr).strip()}")
        if _listed_in_mounts(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False, capture_output=True)
        if self.daemon_pid is not None:
            deadline = time.monotonic() + 10
            while _alive(self.daemon_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(self.daemon_pid):
                os.kill(self.daemon_pid, signal.SIGKILL)


def _fields(line: str) -> list[str]:
    """OFFSET LENGTH ACCESS FLAGS of a `pages` line."""
    return (line.split() + ["", "", "", ""])[:4]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not our child, so someone else reaps it) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _listed_in_mounts(path: Path) -> bool:
    target = os.path.abspath(path)
    with open("/proc/mounts") as mounts:
        return any(line.split()[1].encode().decode("unicode_escape") == target for line in mounts)


def _terminated(*_: object) -> None:
    """SIGTERM ends the walkthrough in order, as Ctrl-C does: the `finally` cleans up."""
    print("\ndsm_counter: terminated", file=sys.stderr)
    sys.exit(143)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Two kernel processes take turns incrementing a counter in one memory object; "
        "the page and the right to write it move between them, shown in the mount's trace and pages.",
    )
    parser.add_argument("--rounds", type=int, default=10, help="increments per kernel (default 10)")
    parser.add_argument("--show", type=int, default=4, metavar="TURNS", help="turns shown in full (default 4); the others get a line each")
    parser.add_argument("--dir", help="work directory for the store and the mount point (default: a new temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="leave the mount in place at the end (and print how to unmount)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # the narration shows as it happens, also through a pipe
    signal.signal(signal.SIGTERM, _terminated)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    # Resolved, as /proc/mounts names it.
    base = Path(args.dir or tempfile.mkdtemp(prefix="dsm-counter-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    walk = Walkthrough(base, args.rounds, args.show)
    status = 1
    started = time.monotonic()
    try:
        walk.mount()
        walk.make_object()
        walk.start_kernels()
        counts = walk.take_turns()
        walk.final_checks(counts)
        status = 0
    except CheckFailed as failure:
        dead = walk.dead_kernels()
        if dead:  # what failed followed from that
            print(f"\ndsm_counter: a kernel process failed: {dead}; then: {failure}", file=sys.stderr)
        else:
            print(f"\ndsm_counter: CHECK FAILED: {failure}", file=sys.stderr)
    except SessionError as error:
        print(f"\ndsm_counter: a kernel process failed: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ndsm_counter: interrupted", file=sys.stderr)
        status = 130
    finally:
        print()
        walk.end_kernels()
        if args.keep and walk.daemon_pid is not None:
            print(
                f"The mount stays at {walk.mnt} (daemon pid {walk.daemon_pid}); the kernel processes have ended,\n"
                f"returning their pages. Look around:  cat {walk.obj}/data   tail {walk.mnt}/trace   cat {walk.mnt}/stats\n"
                f"Unmount with:  {VENV_PYTHON.parent / 'fusepager'} umount {walk.mnt}"
            )
        else:
            walk.unmount()
            if args.dir is None and not _listed_in_mounts(walk.mnt) and not os.path.ismount(walk.mnt):
                shutil.rmtree(base, ignore_errors=True)
    if status == 0:
        print(f"All checks held: the counter is {2 * args.rounds}, read by k1, k2, cat and xxd ({time.monotonic() - started:.1f} s).")
    return status


if __name__ == "__main__":
    sys.exit(main())

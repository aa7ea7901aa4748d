"""`fusepager demo`: a narrated tour of a real mount with two kernels paging through it.

The demo is a client of the daemon, as a user is: it starts `fusepager mount -f --console`
with kernels k1 (4 KiB pages) and k2 (16 KiB pages) in the daemon, runs shell commands against
the mount, gives the kernels console commands, and prints both with what they answered.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from .session import MountSession, SessionError


class Narrator:
    def __init__(self, session: MountSession) -> None:
        self.session = session
        self.mnt = str(session.mountpoint)

    def say(self, text: str) -> None:
        print()
        print(textwrap.fill(text, width=96))

    def shell(self, command: str) -> str:
        shown = command.replace(self.mnt, "$MNT")
        print(f"  $ {shown}")
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
        output = (result.stdout + result.stderr).rstrip("\n")
        for line in output.splitlines():
            print(f"    {line.replace(self.mnt, '$MNT')}")
        if result.returncode != 0:
            raise SessionError(f"demo step failed: {command}\n{output}")
        return result.stdout

    def kernel(self, line: str) -> str:
        name, command = line.split(" ", 1)
        print(f"  {name}> {command}")
        answer = self.session.command(line)
        print(f"    {answer}")
        return answer


def narrate(n: Narrator) -> None:
    mnt = n.mnt
    obj = f"{mnt}/objects/hello"
    n.say(
        f"A store is mounted at $MNT={mnt}. The daemon serving it runs two simulated Mach kernels: "
        "k1 with 4 KiB pages and k2 with 16 KiB pages. The shell creates a memory object; the "
        "kernels map it into a task and fault its pages in over the External Memory Management "
        "protocol, and every step shows up in the mount."
    )
    n.shell(f"ls {mnt}")
    n.say("mkdir makes a memory object, truncate gives it a size, and its bytes are the file data:")
    n.shell(f"mkdir {obj}")
    n.shell(f"truncate -s 64K {obj}/data")
    n.shell(f"printf 'Hello from the shell, page 0' | dd of={obj}/data conv=notrunc status=none")
    n.shell(f"ls {obj}")
    n.say("Kernel k1 maps the object into a task and reads from it. The first fault sends memory_object_init:")
    n.kernel("k1 map hello 64K")
    n.kernel("k1 read hello 28 text")
    n.say("k1 now has a directory under kernels/, with what its init said, the ready flag the manager sent, and its pagemap:")
    n.shell(f"ls -R {obj}/kernels")
    n.shell(f"cat {obj}/kernels/k1/page_size {obj}/kernels/k1/ready {obj}/kernels/k1/pages")
    n.say("The trace shows the protocol: init, ready, data_request, data_supply (the page came write-locked: a read was asked for):")
    n.shell(f"grep -o 'k1 -> hello memory_object_[a-z_]*(.*\\|hello -> k1 memory_object_[a-z_]*(.*' {mnt}/trace | cut -c1-110")
    n.say("Kernel k2 pages with 16 KiB pages. Offset 16384 was never written: the store file has a hole there, so the manager answers data_unavailable and the kernel zero-fills:")
    n.kernel("k2 map hello 64K")
    n.kernel("k2 read hello+16384 8")
    n.shell(f"cat {obj}/kernels/k2/page_size {obj}/kernels/k2/pages")
    n.shell(f"grep -o 'hello -> k2 memory_object_data_unavailable(.*' {mnt}/trace")
    n.say("A task in k1 writes to page 0. That page came read-only, so the kernel asks with data_unlock; the pagemap now says the kernel may hold changes:")
    n.kernel("k1 write hello+64 Written by a task in kernel k1")
    n.shell(f"grep -o 'k1 -> hello memory_object_data_unlock(.*' {mnt}/trace")
    n.shell(f"cat {obj}/kernels/k1/pages")
    n.say("The shell reads data: the read first asks k1 for its changes (lock_request, data_return, lock_completed), so it shows the task's write; k1 keeps a read-only copy:")
    n.shell(f"dd if={obj}/data bs=1 skip=64 count=30 status=none; echo")
    n.shell(f"grep -o 'hello -> k1 memory_object_lock_request(.*\\|k1 -> hello memory_object_data_return(.*\\|k1 -> hello memory_object_lock_completed(.*' {mnt}/trace | tail -3")
    n.shell(f"cat {obj}/kernels/k1/pages")
    n.say("The shell writes: k1 and k2 give the range up first, and both kernels' tasks see the new bytes:")
    n.shell(f"printf 'SHELL' | dd of={obj}/data bs=1 seek=64 conv=notrunc status=none")
    n.kernel("k1 read hello+64 30 text")
    n.kernel("k2 read hello+64 30 text")
    n.shell(f"grep -c memory_object {mnt}/trace")
    n.say("The object's attributes are extended attributes too:")
    n.shell(f"cd {mnt}/objects && getfattr -d -m user.mach hello")
    n.shell(f"head -4 {mnt}/stats")


def run_demo(*, keep: bool = False, directory: str | None = None) -> int:
    base = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="fusepager-demo-"))
    store, mnt = base / "store", base / "mnt"
    print(f"fusepager demo: store {store}, mount point {mnt}")
    try:
        session = MountSession(store, mnt, ["k1:4096:256", "k2:16384:64"])
    except SessionError as error:
        print(f"fusepager demo: could not mount: {error}", file=sys.stderr)
        return 1
    try:
        narrate(Narrator(session))
    except SessionError as error:
        print(f"\nfusepager demo: {error}", file=sys.stderr)
        session.close()
        return 1
    except BaseException:
        session.close()
        raise
    if keep:
        print(
            f"\nThe mount stays at {mnt} (daemon pid {session.pid}); the kernels keep their pages.\n"
            f"Look around:   ls -R {mnt}/objects    tail -f {mnt}/trace    cat {mnt}/stats\n"
            f"               mkdir {mnt}/objects/mine; truncate -s 1M {mnt}/objects/mine/data\n"
            f"               fusepager top {mnt}    fusepager trace {mnt} --svg trace.svg\n"
            f"Unmount with:  fusepager umount {mnt}"
        )
        return 0
    session.close()
    if directory is None:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nUnmounted {mnt}. (fusepager demo --keep leaves it mounted to look around; docs/tutorial.md is a guided session.)")
    return 0

"""Disk full (issue [7/8]): the store on a small tmpfs.  ENOSPC reaches the user as an errno —
a write to `data`, and a `sync` whose page writes failed (never a success that lied) — and the
kernel as memory_object_data_error when it asks to write more; what was stored before is intact;
the pages a kernel gave back that could not be stored are kept by the manager and served back
(to the kernel and the mount), and stored by the first sync once space returns."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from fusepager.session import MountSession
from mounting import fails_with, sh

STORE_BYTES = 1 << 20


def unstored(obj: Path) -> str:
    """How many returned bytes the manager keeps for the object because the store refused them."""
    return sh(f"getfattr --only-values -n user.fusepager.unstored {obj}").stdout


@pytest.fixture
def small_store(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORE_BYTES}", "tmpfs", str(store)], check=True)
    try:
        yield store
    finally:
        subprocess.run(["umount", "-l", str(store)], capture_output=True)


def test_a_full_store_answers_enospc_keeps_what_it_had_and_recovers(small_store: Path, tmp_path):
    with MountSession(small_store, tmp_path / "mnt", ["k1:4096:256"], allow_errors=True) as session:
        mnt = session.mountpoint
        kept, big = mnt / "objects" / "kept", mnt / "objects" / "big"
        sh(f"mkdir {kept} {big} && printf 'stored before the disk filled' > {kept}/data && truncate -s 512K {kept}/data")
        session.command("k1 map kept 512K")
        session.command("k1 fill kept+65536 262144 7")  # 256 KiB changed in the kernel, not stored yet

        # A user's write that does not fit: ENOSPC, through the mount.
        fails_with(f"dd if=/dev/urandom of={big}/data bs=64k count=32 status=none", "No space left on device")
        # The kernel's changes cannot be stored: the sync says so instead of acknowledging.
        fails_with(f"echo sync > {kept}/ctl", "No space left on device")
        assert "could not store" in (mnt / "trace").read_text()
        # The kernel hears of it: asking to write more while the store is full gets data_error.
        answer = session.answer_to("k1 write kept+400000 more")
        assert answer.startswith("error") and "KERN_MEMORY_ERROR" in answer, answer
        assert "memory_object_data_error" in (mnt / "trace").read_text()
        # What was stored before is intact.
        assert sh(f"head -c 29 {kept}/data").stdout == "stored before the disk filled"
        # What needs the store's metadata written answers ENOSPC too, and the daemon goes on.
        fails_with(f"mkdir {mnt}/objects/new", "No space left on device")
        fails_with(f"setfattr -n user.mach.copy_strategy -v call {kept}", "No space left on device")
        assert sh(f"getfattr --only-values -n user.mach.copy_strategy {kept}").stdout == "delay"
        assert not (mnt / "objects" / "new").exists()

        # Nothing the kernel gave back is lost: the manager keeps it and serves it back, to the
        # kernel after it dropped its copy, and to a reader of the mount.
        changed = bytes([7]) * 262144
        sh(f"echo flush > {kept}/ctl")
        assert session.command("k1 sha256 kept+65536 262144").split()[-1] == hashlib.sha256(changed).hexdigest()
        shown = subprocess.run(["dd", f"if={kept}/data", "bs=64k", "skip=1", "count=4", "status=none"], capture_output=True, check=True).stdout
        assert shown == changed
        assert unstored(kept) != "0"
        # It is not in the store yet.
        assert (small_store / "objects" / "kept" / "data").read_bytes()[65536 : 65536 + 262144] != changed

        # Space comes back; the first sync stores what was kept (after which kernels may write
        # again, and their writes are stored).
        sh(f"rmdir {big}")
        sh(f"echo sync > {kept}/ctl")
        assert unstored(kept) == "0"
        assert (small_store / "objects" / "kept" / "data").read_bytes()[65536 : 65536 + 262144] == changed
        session.command("k1 write kept+400000 after the disk had room again")
        sh(f"echo sync > {kept}/ctl")
        assert sh(f"dd if={kept}/data bs=1 skip=400000 count=29 status=none").stdout == "after the disk had room again"
        assert sh(f"head -c 29 {kept}/data").stdout == "stored before the disk filled"
        assert (small_store / "objects" / "kept" / "data").read_bytes()[65536 : 65536 + 262144] == changed

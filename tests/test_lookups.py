"""A lookup costs the same whatever the number of objects (issue 14, defect 9).

Every lookup of `objects/NAME` used to list the store's `objects/` directory and check every
entry in it, so with 3,000 objects a `cat objects/N/data` took 82 ms.  Here a store of 20,000
objects is served, and strace shows which directories the daemon lists while the shell looks
one object up, reads it, stats it and creates another: it lists none.  Only `ls objects`
lists the store (and then once per listing, not once per reply buffer).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fusepager.session import MountSession
from fusepager.store import ObjectMeta
from mounting import SyscallWatch, sh

OBJECTS = 20_000


def _fill_store(store: Path, count: int) -> None:
    """`count` objects made straight in the store directory, in its documented layout
    (objects/NAME/data and meta.json): far quicker than 20,000 mkdirs through a mount."""
    meta = ObjectMeta().to_json()
    objects = store / "objects"
    objects.mkdir(parents=True)
    for number in range(count):
        directory = objects / f"o{number:05d}"
        directory.mkdir()
        (directory / "data").write_bytes(b"")
        (directory / "meta.json").write_bytes(meta)
    (objects / "o12345" / "data").write_bytes(b"object 12345\n")


def test_a_lookup_among_20000_objects_lists_no_directory(tmp_path):
    if shutil.which("strace") is None:
        pytest.fail("strace is missing: run ./scripts/setup (it installs it)")
    store = tmp_path / "store"
    _fill_store(store, OBJECTS)
    objects_dir = os.path.realpath(store / "objects")
    with MountSession(store, tmp_path / "mnt", []) as session:
        mnt = session.mountpoint
        with SyscallWatch(session.pid, "getdents64,newfstatat,lstat,stat,statx,openat", tmp_path / "strace.log") as watch:
            # Until strace logs the daemon checking o00017, it is not watching yet.
            watch.wait_for("o00017", lambda: os.stat(mnt / "objects" / "o00017"))
            start = len(watch.lines())
            # What a user does with one object: look it up, read it, stat it; make one, remove one.
            assert sh(f"cat {mnt}/objects/o12345/data").stdout == "object 12345\n"
            assert sh(f"stat -c %s {mnt}/objects/o12345/data").stdout == "13\n"
            sh(f"test -d {mnt}/objects/o19999 && ! test -e {mnt}/objects/o20000")
            sh(f"mkdir {mnt}/objects/new && test -f {mnt}/objects/new/data")
            sh(f"mkdir {mnt}/objects/gone && rmdir {mnt}/objects/gone && ! test -e {mnt}/objects/gone")
            # A marker after them: once strace has logged it, it has logged them all.
            watch.wait_for("o00018", lambda: os.stat(mnt / "objects" / "o00018"))
            during = watch.lines()[start:]
            assert any("o12345" in line for line in during), "strace saw the lookups"
            listings = [line for line in during if "getdents64(" in line and f"<{objects_dir}>" in line]
            assert listings == [], f"the daemon listed the store for a lookup:\n" + "\n".join(listings[:5])

            # The watch does see listings: `ls objects` lists the store (and shows them all).
            before = len(watch.lines())
            names = sh(f"ls {mnt}/objects").stdout.split()
            assert len(names) == OBJECTS + 1 and "new" in names and "o12345" in names
            watch.wait_for("o00019", lambda: os.stat(mnt / "objects" / "o00019"))
            assert any("getdents64(" in line and f"<{objects_dir}>" in line for line in watch.lines()[before:])
        stats = dict(line.split(" ", 1) for line in (mnt / "stats").read_text().splitlines())
        assert stats["objects"] == str(OBJECTS + 1)

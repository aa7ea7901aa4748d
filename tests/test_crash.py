"""Crash safety (issue [7/8]): `kill -9` of the manager at seeded random moments during a write
storm, again and again on the same store.  After each restart every byte an acknowledged `sync`
covered is intact, every acknowledged attribute and object is there, and the store's metadata
is whole (it is written by atomic rename, with fsync of the file and the directory).

FUSEPAGER_CRASHES sets how many kills (default 50); FUSEPAGER_SEED the seed."""

from __future__ import annotations

import errno
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fusepager.session import MountSession

CRASHES = int(os.environ.get("FUSEPAGER_CRASHES", "50"))
SEED = int(os.environ.get("FUSEPAGER_SEED", "20261127"))
BLOCK = 4096
BLOCKS = 48  # per object
MAX_OBJECTS = 6
DYING_DAEMON_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED}
"""What a FUSE mount answers once its daemon is killed: ENOTCONN ("Transport endpoint is not
connected"), or ECONNABORTED ("Software caused connection abort") for a request that was in
flight, or made while Linux aborts the connection.  The only errors seen over many runs; any
other error ends the storm as a failure of the test."""


def block_bytes(name: str, index: int, version: int) -> bytes:
    return (f"{name}:{index}:{version}:".encode() * BLOCK)[:BLOCK]


def version_of(name: str, index: int, data: bytes) -> int | None:
    """The version a block holds if it is exactly one this test wrote (0: never written)."""
    if data == bytes(BLOCK):
        return 0
    try:
        version = int(data.split(b":", 3)[2])
    except (IndexError, ValueError):
        return None
    return version if data == block_bytes(name, index, version) else None


@dataclass
class ObjectModel:
    created: bool = False  # its mkdir was answered
    written: dict[int, int] = field(default_factory=dict)  # block -> newest version that may have landed
    completed: dict[int, int] = field(default_factory=dict)  # block -> newest version whose write returned
    synced: dict[int, int] = field(default_factory=dict)  # block -> version a sync acknowledged
    may_cache: set[str] = field(default_factory=lambda: {"0"})  # the acknowledged value, and any in flight


class Storm(threading.Thread):
    """Writes, syncs, attribute changes and new objects through the mount, as fast as they go,
    until the daemon dies under it."""

    def __init__(self, mnt: Path, model: dict[str, ObjectModel], rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.mnt, self.model, self.rng = mnt, model, rng
        self.operations = 0
        self.syncs = 0
        self.killed = threading.Event()  # set by the test just before it kills the daemon
        self.error: OSError | None = None  # what ended the storm ...
        self.error_after_kill = False  # ... and whether the kill had been sent by then

    def run(self) -> None:
        try:
            while True:
                self._one()
                self.operations += 1
        except OSError as error:
            self.error_after_kill = self.killed.is_set()
            self.error = error

    def check_end(self) -> None:
        """The storm ended because the daemon died, with an error a dying daemon gives."""
        assert self.error is not None, "the storm ended without an error"
        assert self.error_after_kill, f"an operation failed before the daemon was killed: {self.error!r}"
        assert self.error.errno in DYING_DAEMON_ERRNOS, f"not what a dying daemon answers: {self.error!r}"

    def _one(self) -> None:
        live = [name for name, obj in self.model.items() if obj.created]
        choice = self.rng.random()
        if not live or (choice < 0.03 and len(self.model) < MAX_OBJECTS):
            name = f"obj{len(self.model)}"
            self.model[name] = ObjectModel()
            os.mkdir(self.mnt / "objects" / name)
            self.model[name].created = True
            return
        name = self.rng.choice(live)
        obj = self.model[name]
        directory = self.mnt / "objects" / name
        if choice < 0.80:
            index = self.rng.randrange(BLOCKS)
            version = obj.written.get(index, 0) + 1
            obj.written[index] = version  # before: a write cut short by the kill may land
            fd = os.open(directory / "data", os.O_WRONLY)
            try:
                os.pwrite(fd, block_bytes(name, index, version), index * BLOCK)
            finally:
                os.close(fd)
            obj.completed[index] = version
        elif choice < 0.92:
            covered = {n: dict(o.completed) for n, o in self.model.items()}
            with open(directory / "ctl", "w") as ctl:
                ctl.write("sync\n")
            # (a sync of one object covers that object; the others' writes are not promised)
            obj.synced.update(covered[name])
            self.syncs += 1
        else:
            value = self.rng.choice("01")
            obj.may_cache.add(value)
            os.setxattr(directory, "user.mach.may_cache", value.encode())
            obj.may_cache = {value}


def check(mnt: Path, store: Path, model: dict[str, ObjectModel]) -> int:
    """Everything promised is there; returns the number of bytes checked."""
    checked = 0
    assert os.listdir(store / "tmp") == [], "the store's tmp/ was not cleared on open"
    for name, obj in model.items():
        directory = mnt / "objects" / name
        if not obj.created:
            if not directory.exists():
                continue  # its mkdir was cut short: gone whole
        assert directory.is_dir(), f"{name} was created, and is gone"
        meta = json.loads((store / "objects" / name / "meta.json").read_bytes())  # whole, never torn
        assert set(meta) >= {"format", "size", "may_cache", "copy_strategy", "auto_ready"}, meta
        assert os.getxattr(directory, "user.mach.may_cache").decode() in obj.may_cache
        data = (directory / "data").read_bytes()
        assert int(os.getxattr(directory, "user.mach.size")) == len(data)
        for index, synced in obj.synced.items():
            block = data[index * BLOCK : (index + 1) * BLOCK].ljust(BLOCK, b"\0")
            version = version_of(name, index, block)
            assert version is not None, f"{name} block {index} holds bytes this test never wrote"
            assert synced <= version <= obj.written[index], (
                f"{name} block {index}: version {version}, but a sync acknowledged version {synced}"
            )
            checked += BLOCK
    return checked


def test_kill_9_of_the_manager_during_a_write_storm_loses_nothing_acknowledged(tmp_path):
    rng = random.Random(SEED)
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    model: dict[str, ObjectModel] = {}
    totals = {"operations": 0, "syncs": 0, "bytes checked": 0}
    for crash in range(CRASHES + 1):
        with MountSession(store, mnt, [], extra_args=["--listen", "none"], allow_errors=True) as session:
            totals["bytes checked"] += check(mnt, store, model)
            if crash == CRASHES:
                break
            storm = Storm(mnt, model, random.Random(rng.random()))
            storm.start()
            time.sleep(rng.uniform(0.02, 0.3))  # the kill comes at a random moment of the storm
            storm.killed.set()
            os.kill(session.pid, 9)
            session.process.wait()
            storm.join(timeout=30)
            assert not storm.is_alive(), "a write to the dead mount hung"
            storm.check_end()
            totals["operations"] += storm.operations
            totals["syncs"] += storm.syncs
    assert totals["syncs"] > CRASHES // 2, totals  # the storms did acknowledge work
    print(f"crash seed {SEED}: {CRASHES} kills; {totals}")

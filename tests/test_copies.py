"""Copy strategies on the real mount: a copy keeps the contents as of the copy, whoever writes
the original afterwards, and snapshot files show what the copies hold."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess

import pytest

from fusepager.session import MountSession
from kernelsim.console import pattern_bytes
from mounting import sh, trace_lines, wait_until

SIZE = 64 * 1024
PRE_FORK = b"written by the parent before the fork"


def child_view(session: MountSession, kernel: str = "k1", size: int = SIZE) -> bytes:
    session.command(f"{kernel} task child")
    data = bytes.fromhex(session.command(f"{kernel} read obj {size}").split()[-1])
    session.command(f"{kernel} task t1")
    return data


def set_up(session: MountSession, strategy: str) -> tuple[bytes, bytes]:
    """An object with strategy `strategy`, mapped by k1's task t1, written, then forked (the
    child inherits a copy).  Returns the contents as of the fork, and the object's path."""
    mnt = session.mountpoint
    obj = mnt / "objects" / "obj"
    sh(f"mkdir {obj} && truncate -s {SIZE} {obj}/data")
    sh(f"setfattr -n user.mach.copy_strategy -v {strategy} {obj}")
    original = pattern_bytes(1, 0, SIZE)
    (mnt.parent / "original").write_bytes(original)
    sh(f"dd if={mnt.parent}/original of={obj}/data conv=notrunc status=none")
    session.command("k1 map obj 64K")
    session.command(f"k1 read obj {SIZE}")  # resident in k1
    session.command(f"k1 writehex obj+100 {PRE_FORK.hex()}")  # dirty in k1, unseen by the manager
    session.command("k1 fork child")
    as_of_fork = bytearray(original)
    as_of_fork[100 : 100 + len(PRE_FORK)] = PRE_FORK
    return bytes(as_of_fork), obj


CHANGE = b"THE ORIGINAL CHANGED AFTER THE FORK"


def change(session: MountSession, obj, source: str) -> bytes:
    """Change the original through `source`; returns what the original holds afterwards."""
    mnt = session.mountpoint
    current = bytearray(bytes.fromhex(session.command(f"k1 read obj {SIZE}").split()[-1]))
    if source == "parent":
        session.command(f"k1 writehex obj+100 {CHANGE.hex()}")
        session.command(f"k1 writehex obj+40000 {CHANGE.hex()}")
    elif source == "kernel2":
        session.command("k2 map obj 64K")
        session.command(f"k2 writehex obj+100 {CHANGE.hex()}")
        session.command(f"k2 writehex obj+40000 {CHANGE.hex()}")
    elif source == "dd":
        (mnt.parent / "change").write_bytes(CHANGE)
        for offset in (100, 40000):
            sh(f"dd if={mnt.parent}/change of={obj}/data bs=1 seek={offset} conv=notrunc status=none")
    elif source == "truncate":
        sh(f"truncate -s 8K {obj}/data")
        return bytes(current[:8192]) + bytes(SIZE - 8192)
    for offset in (100, 40000):
        current[offset : offset + len(CHANGE)] = CHANGE
    return bytes(current)


@pytest.mark.parametrize("source", ["parent", "kernel2", "dd", "truncate"])
@pytest.mark.parametrize("strategy", ["none", "call", "delay"])
def test_a_forked_copy_keeps_the_old_bytes_whoever_changes_the_original(tmp_path, strategy, source):
    with MountSession(tmp_path / "store", tmp_path / "mnt", ["k1:4096:256", "k2:16384:64"]) as session:
        as_of_fork, obj = set_up(session, strategy)
        now = change(session, obj, source)
        assert child_view(session) == as_of_fork
        parent = bytes.fromhex(session.command(f"k1 read obj {SIZE}").split()[-1])
        assert parent == now
        assert (obj / "data").read_bytes()[: len(now.rstrip(b"\0"))] == now.rstrip(b"\0")
        snapshots = os.listdir(obj / "snapshots")
        if strategy == "call":
            assert len(snapshots) == 1  # the manager keeps every COPY_CALL copy as a file
        for name in snapshots:
            # a snapshot file is byte for byte what the copy's task reads
            assert (obj / "snapshots" / name).read_bytes() == as_of_fork
        session.command("k1 task child")
        session.command("k1 unmap obj")
        session.command("k1 task t1")
        if strategy == "call":
            # the copy ended: its file goes
            wait_until(lambda: os.listdir(obj / "snapshots") == [], what="the snapshot to go")
            assert os.listdir(session.store / "objects/obj/snapshots") == []


def test_a_copy_call_copy_is_served_by_the_manager_and_its_snapshot_compares(tmp_path):
    with MountSession(tmp_path / "store", tmp_path / "mnt", ["k1:4096:256"]) as session:
        as_of_fork, obj = set_up(session, "call")
        lines = trace_lines(session.mountpoint)
        assert any("k1 -> obj memory_object_copy(old_control=" in line and "offset=0x0 length=65536" in line for line in lines)
        session.command(f"k1 writehex obj+8192 {CHANGE.hex()}")  # a locked page: the old one is saved first
        assert any("saved" in line for line in trace_lines(session.mountpoint))
        (snapshot,) = os.listdir(obj / "snapshots")
        session.command("k1 task child")
        session.command(f"k1 writehex obj+20000 {b'the child writes its copy'.hex()}")
        child = bytes.fromhex(session.command(f"k1 read obj {SIZE}").split()[-1])
        session.command("k1 task t1")
        (tmp_path / "child-view").write_bytes(child)
        sh(f"cmp {obj}/snapshots/{snapshot} {tmp_path}/child-view")
        assert child[20000:20025] == b"the child writes its copy"
        assert child[8192:8192 + len(CHANGE)] == as_of_fork[8192:8192 + len(CHANGE)]
        # the snapshot's own pages are a sparse file in the store
        backing = session.store / "objects/obj/snapshots" / snapshot
        assert backing.exists() and backing.stat().st_blocks * 512 <= SIZE


def test_delayed_copies_paged_out_to_the_default_manager_appear_as_snapshots(tmp_path):
    """A kernel with 16 frames: the copy's pages (pushed before the original changed) go to
    fusepager as default manager; the temporary is a snapshot of the object."""
    with MountSession(tmp_path / "store", tmp_path / "mnt", ["k1:4096:16"]) as session:
        as_of_fork, obj = set_up(session, "delay")
        session.command(f"k1 pattern obj 64K 9")  # every page changes: every old page is pushed
        child = child_view(session)
        assert child == as_of_fork
        snapshots = os.listdir(obj / "snapshots")
        assert snapshots, "no delayed copy reached the default manager"
        for name in snapshots:
            assert (obj / "snapshots" / name).read_bytes() == as_of_fork
        temporaries = os.listdir(session.mountpoint / "default")
        assert set(snapshots) <= set(temporaries)
        assert any("memory_object_create(" in line for line in trace_lines(session.mountpoint))


def test_anonymous_memory_beyond_the_memory_limit_goes_to_the_default_manager_and_back(tmp_path):
    with MountSession(tmp_path / "store", tmp_path / "mnt", ["k1:4096:32"]) as session:
        mnt = session.mountpoint
        session.command("k1 allocate anon 1M")
        session.command("k1 pattern anon 1M 5")
        expected = pattern_bytes(5, 0, 1 << 20)
        assert session.command("k1 sha256 anon 1M").split()[-1] == hashlib.sha256(expected).hexdigest()
        stat = dict(word.split("=") for word in session.command("k1 stat").split()[2:])
        assert int(stat["peak"]) <= 32 and int(stat["creates"]) == 1
        (ident,) = os.listdir(mnt / "default")
        held = (mnt / "default" / ident / "data").read_bytes()
        assert len(held) == 1 << 20
        # every page there is the pattern's page (pages still in the kernel are returned first)
        assert held == expected
        lines = trace_lines(mnt)
        assert any("memory_object_data_initialize(" in line for line in lines)
        # pages never written come back unavailable, and the task reads zeros
        session.command("k1 allocate fresh 256K")
        assert session.command("k1 read fresh+100000 4").endswith(" 00000000")
        session.command("k1 unmap anon")
        wait_until(lambda: os.listdir(mnt / "default") == [], what="the temporary to go")



SEED = int(os.environ.get("FUSEPAGER_SEED", "20261128"))
OBJECTS = {"none": "onone", "call": "ocall", "delay": "odelay"}
RANDOM_SIZE = 96 * 1024


@pytest.mark.parametrize("seed", sorted({20261128, SEED}))
def test_random_copies_writes_and_pageouts_match_a_reference_model(tmp_path, seed):
    """2,000 operations over three objects (one per copy strategy): writes and reads by a task
    in k1 (24 frames: it pages out), by k2 (16 KiB pages, 16 frames) and through the mount,
    forks of k1's task (each child holding copies of all three), children writing their
    copies, children ending.  Every read must match the reference model."""
    rng = random.Random(seed)
    with MountSession(tmp_path / "store", tmp_path / "mnt", ["k1:4096:24", "k2:16384:16"]) as session:
        mnt = session.mountpoint
        model = {}
        for strategy, name in OBJECTS.items():
            sh(f"mkdir {mnt}/objects/{name} && truncate -s {RANDOM_SIZE} {mnt}/objects/{name}/data")
            sh(f"setfattr -n user.mach.copy_strategy -v {strategy} {mnt}/objects/{name}")
            model[name] = bytearray(RANDOM_SIZE)
            session.command(f"k1 map {name} {RANDOM_SIZE}")
            session.command(f"k2 map {name} {RANDOM_SIZE}")
        children: dict[str, dict[str, bytearray]] = {}
        log: list[str] = []
        serial = 0

        def in_task(task: str, command: str) -> str:
            session.command(f"k1 task {task}")
            return session.command(command)

        try:
            for step in range(2000):
                name = rng.choice(list(OBJECTS.values()))
                offset = rng.randrange(RANDOM_SIZE)
                length = rng.randint(1, min(6000, RANDOM_SIZE - offset))
                kind = rng.random()
                if kind < 0.04 and len(children) < 4:
                    serial += 1
                    child = f"c{serial}"
                    log.append(f"{step} fork {child}")
                    in_task("t1", f"k1 fork {child}")
                    children[child] = {n: bytearray(data) for n, data in model.items()}
                elif kind < 0.06 and children:
                    child = rng.choice(sorted(children))
                    log.append(f"{step} end {child}")
                    for n in OBJECTS.values():
                        in_task(child, f"k1 unmap {n}")
                    del children[child]
                elif kind < 0.40:
                    who = rng.choice(["k1", "k2", "mount"] + sorted(children))
                    data = rng.randbytes(length)
                    log.append(f"{step} {who} write {name} {offset}+{length}")
                    if who == "mount":
                        (tmp_path / "chunk").write_bytes(data)
                        sh(f"dd if={tmp_path}/chunk of={mnt}/objects/{name}/data bs={length} seek={offset} oflag=seek_bytes conv=notrunc status=none")
                        model[name][offset : offset + length] = data
                    elif who == "k2":
                        session.command(f"k2 writehex {name}+{offset} {data.hex()}")
                        model[name][offset : offset + length] = data
                    elif who == "k1":
                        in_task("t1", f"k1 writehex {name}+{offset} {data.hex()}")
                        model[name][offset : offset + length] = data
                    else:
                        in_task(who, f"k1 writehex {name}+{offset} {data.hex()}")
                        children[who][name][offset : offset + length] = data
                else:
                    who = rng.choice(["k1", "k2", "mount"] + sorted(children))
                    log.append(f"{step} {who} read {name} {offset}+{length}")
                    if who == "mount":
                        got = subprocess.run(
                            ["dd", f"if={mnt}/objects/{name}/data", f"bs={length}", f"skip={offset}", "iflag=skip_bytes", "count=1", "status=none"],
                            capture_output=True, check=True,
                        ).stdout
                        expected = model[name][offset : offset + length]
                    elif who == "k2":
                        got = bytes.fromhex(session.command(f"k2 read {name}+{offset} {length}").split()[-1])
                        expected = model[name][offset : offset + length]
                    else:
                        task = "t1" if who == "k1" else who
                        got = bytes.fromhex(in_task(task, f"k1 read {name}+{offset} {length}").split()[-1])
                        source = model if who == "k1" else children[who]
                        expected = source[name][offset : offset + length]
                    assert got == expected, f"step {step}: {who} read {name} {offset}+{length} differs"
        except (AssertionError, Exception) as failure:
            (tmp_path.parent / "random-copies.log").write_text("\n".join(log))
            raise AssertionError(f"seed {seed} (rerun with FUSEPAGER_SEED={seed}); last steps:\n" + "\n".join(log[-10:])) from failure
        stat = dict(word.split("=") for word in session.command("k1 stat").split()[2:])
        assert int(stat["copies"]) > 0 and int(stat["evictions"]) > 0


def test_changing_the_copy_strategy_from_the_mount_applies_to_later_copies(tmp_path):
    with MountSession(tmp_path / "store", tmp_path / "mnt", ["k1:4096:64"]) as session:
        mnt = session.mountpoint
        obj = mnt / "objects" / "obj"
        sh(f"mkdir {obj} && truncate -s 16K {obj}/data")
        session.command("k1 map obj 16K")
        session.command("k1 read obj 1")
        session.command("k1 fork first")  # delay (the default): no memory_object_copy
        assert not any("memory_object_copy(" in line for line in trace_lines(mnt))
        sh(f"echo 'attributes copy=call' > {obj}/ctl")
        changes = [line for line in trace_lines(mnt) if "obj -> k1 memory_object_change_attributes(" in line]
        assert changes and "copy_strategy=call" in changes[-1]
        assert any("k1 -> obj memory_object_change_completed(may_cache=0 copy_strategy=call)" in line for line in trace_lines(mnt))
        session.command("k1 fork second")
        assert any("k1 -> obj memory_object_copy(" in line for line in trace_lines(mnt))
        assert len(os.listdir(obj / "snapshots")) == 1
        sh(f"setfattr -n user.mach.copy_strategy -v none {obj}")
        session.command("k1 fork third")
        assert len([line for line in trace_lines(mnt) if "k1 -> obj memory_object_copy(" in line]) == 1


def test_a_delayed_copy_stays_true_after_its_kernel_is_told_another_strategy(tmp_path):
    """Found by the model-based test: a kernel told copy=delay forks (a delayed copy), is then
    told copy=none; a write through the mount must still let the copy take the old page first
    (and not wait for the kernel, which waits for that page, until the lock timeout)."""
    # 8 frames for 16 pages: the pages the write changes are no longer in k1, so its copy must
    # ask for them while the kernel answers the write's flush.
    with MountSession(tmp_path / "store", tmp_path / "mnt", ["k1:4096:8"]) as session:
        as_of_fork, obj = set_up(session, "delay")
        sh(f"setfattr -n user.mach.copy_strategy -v none {obj}")
        now = change(session, obj, "dd")
        assert child_view(session) == as_of_fork
        assert bytes.fromhex(session.command(f"k1 read obj {SIZE}").split()[-1]) == now

"""Coherence on the real mount: kernels, the shell and mmapping programs see the same bytes."""

from __future__ import annotations

import ast
import hashlib
import os
import random
import re
import subprocess

import pytest

from fusepager.session import MountSession
from kernelsim.console import pattern_bytes
from mmap_program import MmapProgram
from mounting import sh, trace_lines, wait_until

MiB = 1 << 20


def new_object(mnt, name="hello", size="256K"):
    sh(f"mkdir {mnt}/objects/{name} && truncate -s {size} {mnt}/objects/{name}/data")
    return mnt / "objects" / name


def text_of(answer: str) -> bytes:
    """The bytes of a console `read ... text` answer: the console prints Python's repr of the
    bytes (without its b), read back as a literal, never run as code."""
    quoted = answer.split(" ", 4)[4]
    value = ast.literal_eval("b" + quoted)
    assert isinstance(value, bytes), f"not a bytes literal: {quoted!r}"
    return value


def test_a_task_write_is_visible_to_cat_with_no_sync(mounted):
    obj = new_object(mounted.mountpoint)
    mounted.command("k1 map hello 256K")
    mounted.command("k1 write hello+5000 seen by cat")
    assert sh(f"dd if={obj}/data bs=1 skip=5000 count=11 status=none").stdout == "seen by cat"
    # cat asked k1 for its changes: a clean, and k1 keeps a read-only copy
    assert any("hello -> k1 memory_object_lock_request(offset=0x1000 size=4096 should_return=dirty should_flush=0 lock_value=-w-" in line for line in trace_lines(mounted.mountpoint))
    assert (obj / "kernels/k1/pages").read_text() == "0x1000 4096 r-- -\n"  # zero-filled: not precious
    # and k1's next write asks again (data_unlock) before cat sees it too
    mounted.command("k1 write hello+5000 SEEN")
    assert sh(f"dd if={obj}/data bs=1 skip=5000 count=11 status=none").stdout == "SEEN by cat"


def test_dd_into_data_is_visible_to_tasks_in_both_kernels_right_after(mounted):
    obj = new_object(mounted.mountpoint)
    mounted.command("k1 map hello 256K")
    mounted.command("k2 map hello 256K")
    for kernel in ("k1", "k2"):
        assert text_of(mounted.command(f"{kernel} read hello+20000 5 text")) == b"\0" * 5
    mounted.command("k2 write hello+70000 k2-dirty")
    sh(f"printf 'fresh' | dd of={obj}/data bs=1 seek=20000 conv=notrunc status=none")
    for kernel in ("k1", "k2"):
        assert text_of(mounted.command(f"{kernel} read hello+20000 5 text")) == b"fresh"
    # k2's own change elsewhere in the range it gave up was kept, not lost
    assert text_of(mounted.command("k1 read hello+70000 8 text")) == b"k2-dirty"
    # truncate flushes too: everything past the new end is gone for every kernel
    sh(f"truncate -s 65536 {obj}/data")
    for kernel in ("k1", "k2"):
        assert text_of(mounted.command(f"{kernel} read hello+70000 8 text")) == b"\0" * 8


def test_write_ownership_moves_between_kernels_of_different_page_sizes(mounted):
    new_object(mounted.mountpoint)
    mounted.command("k1 map hello 256K")
    mounted.command("k2 map hello 256K")
    for round_ in range(20):
        writer, reader = ("k1", "k2") if round_ % 2 else ("k2", "k1")
        mounted.command(f"{writer} write hello+{16384 + round_ * 3} {writer}-{round_:02d}")
        assert text_of(mounted.command(f"{reader} read hello+{16384 + round_ * 3} 5 text")) == f"{writer}-{round_:02d}".encode()
    grants = [line for line in trace_lines(mounted.mountpoint) if "should_flush=1" in line]
    assert len(grants) >= 19  # each write took the page away from the other kernel


def test_a_kernel_limited_to_64_pages_streams_64_mib_and_loses_nothing(tmp_path):
    size = 64 * MiB
    with MountSession(tmp_path / "store", tmp_path / "mnt", ["s1:4096:64"]) as session:
        mnt = session.mountpoint
        sh(f"mkdir {mnt}/objects/big && truncate -s 64M {mnt}/objects/big/data")
        session.command("s1 map big 64M")
        session.command("s1 pattern big 64M 11", timeout=300)
        expected = pattern_bytes(11, 0, size)
        assert session.command("s1 sha256 big 64M", timeout=300).split()[-1] == hashlib.sha256(expected).hexdigest()
        stat = dict(word.split("=") for word in session.command("s1 stat").split()[2:])
        assert int(stat["peak"]) <= 64 and stat["limit"] == "64"
        assert int(stat["evictions"]) >= 2 * (size // 4096) - 2 * 64
        assert int(stat["pageout_daemon_runs"]) > 0
        returns = [line for line in trace_lines(mnt) if "s1 -> big memory_object_data_return" in line]
        assert any(re.search(r"data=<(\d+) bytes>", line) and int(re.search(r"data=<(\d+) bytes>", line).group(1)) > 4096 for line in returns), "no clustered return"
        session.command("s1 unmap big")
        wait_until(lambda: not (mnt / "objects/big/kernels/s1").exists(), what="terminate")
        digest = hashlib.sha256()
        with open(mnt / "objects/big/data", "rb") as data:
            for chunk in iter(lambda: data.read(MiB), b""):
                digest.update(chunk)
        assert digest.hexdigest() == hashlib.sha256(expected).hexdigest()
    assert (tmp_path / "store/objects/big/data").stat().st_size == size


def test_precious_pages_that_are_evicted_come_back_clean_and_nothing_is_lost(tmp_path):
    with MountSession(tmp_path / "store", tmp_path / "mnt", ["p1:4096:16"]) as session:
        mnt = session.mountpoint
        obj = new_object(mnt, "prec", "1M")
        sh(f"head -c 1M /dev/urandom > {tmp_path}/random && dd if={tmp_path}/random of={obj}/data conv=notrunc status=none")
        session.command("p1 map prec 1M")
        session.command("p1 write prec+100 changed")
        for page in range(1, 64):
            session.command(f"p1 read prec+{page * 4096} 1")
        lines = trace_lines(mnt)
        clean = [line for line in lines if "p1 -> prec memory_object_data_return" in line and "dirty=0" in line]
        dirty = [line for line in lines if "p1 -> prec memory_object_data_return" in line and "dirty=1" in line]
        clean_pages = sum(int(re.search(r"data=<(\d+) bytes>", line).group(1)) // 4096 for line in clean)
        assert clean_pages >= 40 and len(dirty) >= 1
        assert all("kernel_copy=0" in line for line in clean)
        # the pagemap followed every eviction: no more than the kernel's 16 pages are listed
        listed = sum(int(line.split()[1]) // 4096 for line in (obj / "kernels/p1/pages").read_text().splitlines())
        assert listed <= 16
        expected = bytearray((tmp_path / "random").read_bytes())
        expected[100:107] = b"changed"
        assert (obj / "data").read_bytes() == bytes(expected)


def test_a_program_with_data_mmapped_sees_a_task_write_and_a_task_sees_its_msync(mounted, tmp_path):
    obj = new_object(mounted.mountpoint)
    with MmapProgram(obj / "data") as program:
        assert program.read(4096, 4) == b"\0" * 4  # the program has the page in its cache now
        mounted.command("k1 map hello 256K")
        mounted.command("k1 write hello+4096 TASK")
        # Linux drops its copy of the page in the background when k1 gains write access;
        # the program's next touch after that reads through k1's change.
        wait_until(lambda: program.read(4096, 4) == b"TASK", timeout=5, what="the mmapped page to show TASK")
        mounted.command("k2 map hello 256K")
        assert text_of(mounted.command("k2 read hello+40000 4 text")) == b"\0" * 4
        program.write(40000, b"MMAP")  # returns once msync has
        assert text_of(mounted.command("k2 read hello+40000 4 text")) == b"MMAP"
        assert text_of(mounted.command("k1 read hello+40000 4 text")) == b"MMAP"
        mounted.command("k1 write hello+4100 again")
        wait_until(lambda: program.read(4096, 9) == b"TASKagain", timeout=5, what="the second task write")


SEED = int(os.environ.get("FUSEPAGER_SEED", "20261127"))


@pytest.mark.parametrize("seed", sorted({20261127, SEED}))
def test_random_interleavings_of_two_kernels_and_the_shell_match_a_reference_model(tmp_path, seed):
    """2,000 operations: writes and reads by k1 (4 KiB pages), k2 (16 KiB pages, 8 frames, so
    it pages out) and the shell (dd); every read must return the last write to each byte."""
    size = 256 * 1024
    rng = random.Random(seed)
    model = bytearray(size)
    with MountSession(tmp_path / "store", tmp_path / "mnt", ["k1:4096:32", "k2:16384:8"]) as session:
        obj = new_object(session.mountpoint, "shared", str(size))
        session.command(f"k1 map shared {size}")
        session.command(f"k2 map shared {size}")
        log = []
        try:
            for step in range(2000):
                who = rng.choice(("k1", "k2", "shell"))
                offset = rng.randrange(size)
                length = rng.randint(1, min(9000, size - offset))
                if rng.random() < 0.5:
                    data = rng.randbytes(length)
                    log.append(f"{step} {who} write {offset} {length}")
                    if who == "shell":
                        (session.store.parent / "chunk").write_bytes(data)
                        sh(f"dd if={session.store.parent}/chunk of={obj}/data bs={length} seek={offset} oflag=seek_bytes conv=notrunc status=none")
                    else:
                        session.command(f"{who} writehex shared+{offset} {data.hex()}")
                    model[offset : offset + length] = data
                else:
                    log.append(f"{step} {who} read {offset} {length}")
                    if who == "shell":
                        got = subprocess.run(
                            ["dd", f"if={obj}/data", f"bs={length}", f"skip={offset}", "iflag=skip_bytes", "count=1", "status=none"],
                            capture_output=True, check=True,
                        ).stdout
                    else:
                        got = bytes.fromhex(session.command(f"{who} read shared+{offset} {length}").split()[-1])
                    assert got == model[offset : offset + length], f"step {step}: {who} read {offset}+{length} differs"
        except AssertionError as failure:
            raise AssertionError(f"seed {seed} (rerun with FUSEPAGER_SEED={seed}); last steps:\n" + "\n".join(log[-8:])) from failure
        assert (obj / "data").read_bytes() == bytes(model)

"""The mount, driven with real shell tools, with kernels in the daemon process."""

from __future__ import annotations

import re

import pytest

from fusepager.session import SessionError
from mounting import TailFollow, fails_with, sh, trace_lines, wait_until


def new_object(mnt, name="hello", size="64K"):
    sh(f"mkdir {mnt}/objects/{name} && truncate -s {size} {mnt}/objects/{name}/data")
    return mnt / "objects" / name


def test_the_layout_and_objects_made_from_the_shell(mounted):
    mnt = mounted.mountpoint
    assert sh(f"ls {mnt}").stdout.split() == ["default", "objects", "stats", "trace"]
    obj = new_object(mnt)
    assert sh(f"ls {obj}").stdout.split() == ["ctl", "data", "kernels", "snapshots"]
    assert sh(f"stat -c '%s %F' {obj}/data").stdout.strip() == "65536 regular file"
    assert sh(f"ls {obj}/kernels {obj}/snapshots").stdout.split() == [f"{obj}/kernels:", f"{obj}/snapshots:"]
    # bytes in and out with dd, cat, od, xxd, cmp
    sh(f"printf 'hello from the shell' | dd of={obj}/data bs=1 seek=4096 conv=notrunc status=none")
    assert sh(f"dd if={obj}/data bs=1 skip=4096 count=20 status=none").stdout == "hello from the shell"
    assert sh(f"xxd -s 4096 -l 5 -p {obj}/data").stdout.strip() == b"hello".hex()
    assert sh(f"od -A d -t x1 -j 4096 -N 5 {obj}/data").stdout.split()[1:6] == ["68", "65", "6c", "6c", "6f"]
    expected = bytearray(65536)
    expected[4096:4116] = b"hello from the shell"
    (mounted.store.parent / "expected").write_bytes(expected)
    sh(f"cmp {obj}/data {mounted.store.parent}/expected")
    # the store holds the object as a real sparse file
    backing = mounted.store / "objects" / "hello" / "data"
    assert backing.read_bytes() == bytes(expected)
    assert backing.stat().st_blocks * 512 < 65536


def test_a_kernel_maps_and_faults_and_the_shell_sees_it(mounted):
    mnt = mounted.mountpoint
    obj = new_object(mnt)
    sh(f"printf 'page zero' | dd of={obj}/data conv=notrunc status=none")
    assert mounted.command("k1 map hello 64K") == "ok map hello 0x10000 65536"
    assert sh(f"ls {obj}/kernels").stdout.split() == []  # mapped, not yet faulted: no init yet
    assert mounted.command("k1 read hello 9 text") == "ok read 0x10000 9 'page zero'"
    kernel = obj / "kernels" / "k1"
    assert sh(f"ls {kernel}").stdout.split() == ["control", "name", "page_size", "pages", "ready"]
    assert (kernel / "page_size").read_text() == "4096\n"
    assert re.fullmatch(r"\d+\n", (kernel / "control").read_text())
    assert re.fullmatch(r"\d+\n", (kernel / "name").read_text())
    assert (kernel / "control").read_text() != (kernel / "name").read_text()
    assert (kernel / "ready").read_text() == "may_cache=0 copy=delay\n"
    assert (kernel / "pages").read_text() == "0x0 4096 r-- precious\n"
    # the name port vm_region reports is the one in the name file
    region = mounted.command("k1 region hello")
    assert f"name={(kernel / 'name').read_text().strip()}" in region
    # the trace tells it in order: init, ready, data_request, data_supply
    lines = trace_lines(mnt)
    kinds = [re.search(r"(memory_object_\w+)", line).group(1) for line in lines if "memory_object_" in line]
    assert kinds[:4] == ["memory_object_init", "memory_object_ready", "memory_object_data_request", "memory_object_data_supply"]
    assert any(re.search(r" k1 -> hello memory_object_init\(control=\d+ name=\d+ page_size=4096\)$", line) for line in lines)
    # a write: the page becomes writable in the pagemap, and the data reaches the store on sync
    mounted.command("k1 write hello+100 written by a task")
    assert (kernel / "pages").read_text() == "0x0 4096 rw- dirty,precious\n"
    sh(f"echo sync > {obj}/ctl")
    assert sh(f"dd if={obj}/data bs=1 skip=100 count=17 status=none").stdout == "written by a task"
    assert (kernel / "pages").read_text() == "0x0 4096 r-- precious\n"
    # unmapping terminates: the kernel's directory goes
    mounted.command("k1 unmap hello")
    wait_until(lambda: not (obj / "kernels" / "k1").exists(), what="kernels/k1 to go")
    assert "memory_object_terminate" in trace_lines(mnt)[-1]


def test_two_kernels_with_their_own_page_sizes(mounted):
    mnt = mounted.mountpoint
    obj = new_object(mnt, size="128K")
    sh(f"printf 'at 20000' | dd of={obj}/data bs=1 seek=20000 conv=notrunc status=none")
    mounted.command("k1 map hello 128K")
    mounted.command("k2 map hello 128K")
    assert mounted.command("k1 read hello+20000 8 text").endswith("'at 20000'")
    assert mounted.command("k2 read hello+20000 8 text").endswith("'at 20000'")
    assert mounted.command("k2 read hello+70000 1").endswith(" 00")
    assert sh(f"ls {obj}/kernels").stdout.split() == ["k1", "k2"]
    assert (obj / "kernels/k2/page_size").read_text() == "16384\n"
    assert (obj / "kernels/k1/pages").read_text() == "0x4000 4096 r-- precious\n"
    # k2's pages are 16 KiB ones: 20000 lies in [16384, 32768); 70000 in an unwritten hole
    assert (obj / "kernels/k2/pages").read_text() == "0x4000 16384 r-- precious\n0x10000 16384 rw- dirty\n"
    requests = [line for line in trace_lines(mnt) if "k2 -> hello memory_object_data_request" in line]
    assert all(int(re.search(r"offset=(0x[0-9a-f]+)", line).group(1), 16) % 16384 == 0 for line in requests)
    assert any("hello -> k2 memory_object_data_unavailable(offset=0x10000 size=16384)" in line for line in trace_lines(mnt))
    assert "user.mach.page_size=\"4096 16384\"" in sh(f"getfattr -d -m user.mach {obj}").stdout


def test_manual_ready_the_fault_waits_until_the_shell_writes_ready(mounted):
    mnt = mounted.mountpoint
    obj = new_object(mnt)
    sh(f"setfattr -n user.mach.auto_ready -v 0 {obj}")
    assert sh(f"getfattr --only-values -n user.mach.auto_ready {obj}").stdout == "0"
    mounted.command("k1 map hello 64K")
    mounted.send("k1 read hello 4")
    wait_until(lambda: (obj / "kernels" / "k1").exists(), what="kernels/k1")
    assert sh(f"ls {obj}/kernels/k1").stdout.split() == ["control", "name", "page_size", "pages"]
    with pytest.raises(SessionError, match="no answer"):
        mounted.answer(timeout=0.5)  # the task's fault is still waiting
    fails_with(f"echo 'may_cache=2' > {obj}/kernels/k1/ready", "Invalid argument")
    fails_with(f"echo 'copy=sideways' > {obj}/kernels/k1/ready", "Invalid argument")
    sh(f"echo 'may_cache=0 copy=call' > {obj}/kernels/k1/ready")
    assert mounted.answer() == "k1 ok read 0x10000 4 00000000"
    assert (obj / "kernels/k1/ready").read_text() == "may_cache=0 copy=call\n"
    assert any("hello -> k1 memory_object_ready(may_cache=0 copy_strategy=call)" in line for line in trace_lines(mnt))
    fails_with(f"echo 'may_cache=1' > {obj}/kernels/k1/ready", "Device or resource busy")


def test_extended_attributes(mounted):
    mnt = mounted.mountpoint
    obj = new_object(mnt)
    mounted.command("k1 map hello 64K")
    mounted.command("k1 read hello 1")
    dump = sh(f"getfattr -d -m user.mach {obj}").stdout
    for expected in ['user.mach.copy_strategy="delay"', 'user.mach.may_cache="0"', 'user.mach.auto_ready="1"', 'user.mach.size="65536"', 'user.mach.kernels="k1"']:
        assert expected in dump
    sh(f"setfattr -n user.mach.copy_strategy -v call {obj}")
    sh(f"setfattr -n user.mach.may_cache -v 1 {obj}")
    assert sh(f"getfattr --only-values -n user.mach.copy_strategy {obj}").stdout == "call"
    # every kernel was told, and the attributes were kept in the store
    assert (obj / "kernels/k1/ready").read_text() == "may_cache=1 copy=call\n"
    changes = [line for line in trace_lines(mnt) if "hello -> k1 memory_object_change_attributes" in line]
    assert re.search(r"memory_object_change_attributes\(may_cache=1 copy_strategy=call reply_to=\d+\)$", changes[-1])
    assert any("k1 -> hello memory_object_change_completed(may_cache=1 copy_strategy=call)" in line for line in trace_lines(mnt))
    assert '"copy_strategy": "call"' in (mounted.store / "objects/hello/meta.json").read_text()
    kernel_dump = sh(f"getfattr -d -m user.mach {obj}/kernels/k1").stdout
    assert 'user.mach.page_size="4096"' in kernel_dump and 'user.mach.ready="1"' in kernel_dump
    fails_with(f"setfattr -n user.mach.copy_strategy -v sideways {obj}", "Invalid argument")
    fails_with(f"setfattr -n user.mach.size -v 1 {obj}", "Read-only file system")
    fails_with(f"setfattr -n user.mach.colour -v red {obj}", "Invalid argument")
    fails_with(f"setfattr -n user.other -v 1 {obj}", "Operation not supported")
    fails_with(f"setfattr -n user.mach.page_size -v 8192 {obj}/kernels/k1", "Read-only file system")
    assert sh(f"getfattr --only-values -n user.mach.copy_strategy {obj}").stdout == "call"


def test_ctl_commands(mounted):
    mnt = mounted.mountpoint
    obj = new_object(mnt)
    mounted.command("k1 map hello 64K")
    mounted.command("k1 write hello+8192 dirty data")
    sh(f"echo 'clean 8K 4K' > {obj}/ctl")
    assert sh(f"dd if={obj}/data bs=1 skip=8192 count=10 status=none").stdout == "dirty data"
    mounted.command("k1 write hello+12288 more")
    sh(f"echo 'flush' > {obj}/ctl")
    assert (obj / "kernels/k1/pages").read_text() == ""
    assert sh(f"dd if={obj}/data bs=1 skip=12288 count=4 status=none").stdout == "more"
    # lock: a task's write waits until the shell lifts the lock
    mounted.command("k1 read hello 1")
    sh(f"echo 'lock 0 4096 w' > {obj}/ctl")
    mounted.send("k1 write hello hey")
    with pytest.raises(SessionError, match="no answer"):
        mounted.answer(timeout=0.5)
    sh(f"echo 'lock 0 4096 none' > {obj}/ctl")
    assert mounted.answer() == "k1 ok write 0x10000 3"
    sh(f"echo 'attributes may_cache=1 copy=none' > {obj}/ctl")
    assert sh(f"getfattr --only-values -n user.mach.copy_strategy {obj}").stdout == "none"
    # destroy: the kernel's faults fail with the reason, and it terminates
    sh(f"echo 'destroy KERN_MEMORY_FAILURE' > {obj}/ctl")
    wait_until(lambda: not (obj / "kernels/k1").exists(), what="kernels/k1 to go")
    mounted.send("k1 read hello+40000 1")
    answer = mounted.answer()
    assert answer.startswith("k1 error KERN_MEMORY_ERROR") and "KERN_MEMORY_FAILURE" in answer
    assert "Invalid argument" in fails_with(f"echo 'explode' > {obj}/ctl", "Invalid argument")
    assert "unknown command 'explode'" in trace_lines(mnt)[-1]
    help_text = (obj / "ctl").read_text()
    assert "sync" in help_text and "lock OFF LEN PROT" in help_text


def test_bad_input_gets_its_errno_and_a_trace_line_and_changes_nothing(mounted):
    mnt = mounted.mountpoint
    obj = new_object(mnt)
    sh(f"printf 'keep me' | dd of={obj}/data conv=notrunc status=none")
    mounted.command("k1 map hello 64K")
    mounted.command("k1 read hello 1")
    # (command, error, whether the daemon sees it: Linux answers some itself, from its cache
    # of names, before asking the file system)
    refusals = [
        (f"rmdir {obj}", "Device or resource busy", True),
        (f"rmdir {mnt}/objects/nothing", "No such file or directory", False),
        (f"mkdir {mnt}/objects/{'x' * 256}", "File name too long", False),
        (f"mkdir {mnt}/objects/hello", "File exists", False),
        (f"mkdir {mnt}/newdir", "Read-only file system", True),
        (f"touch {obj}/newfile", "Read-only file system", True),
        (f"echo x > {mnt}/trace", "Read-only file system", True),
        (f"echo x > {mnt}/stats", "Read-only file system", True),
        (f"echo x > {obj}/kernels/k1/pages", "Read-only file system", True),
        (f"rm {obj}/data", "Read-only file system", True),
        (f"mv {obj}/data {obj}/other", "Read-only file system", True),
        (f"rmdir {obj}/kernels/k1", "Read-only file system", True),
        (f"echo 'flush 1 2 3' > {obj}/ctl", "Invalid argument", True),
        (f"echo 'lock 0 4096 q' > {obj}/ctl", "Invalid argument", True),
        (f"printf '\\xff\\xfe' > {obj}/ctl", "Invalid argument", True),
        (f"cat {obj}/kernels/k9/pages", "No such file or directory", False),
        (f"truncate -s 0 {mnt}/stats", "Read-only file system", True),
    ]
    for command, message, traced in refusals:
        before = len(trace_lines(mnt))
        fails_with(command, message)
        new_lines = trace_lines(mnt)[before:]
        if traced:
            assert any("mount refused" in line for line in new_lines), f"no trace line for: {command}"
    assert sh(f"dd if={obj}/data bs=1 count=7 status=none").stdout == "keep me"
    assert sh(f"ls {mnt}/objects").stdout.split() == ["hello"]
    assert mounted.process.poll() is None  # the daemon is still up


def test_rmdir_of_an_unmapped_object_removes_it_from_the_store(mounted):
    mnt = mounted.mountpoint
    new_object(mnt, "gone")
    mounted.command("k1 map gone 4K")
    mounted.command("k1 read gone 1")
    fails_with(f"rmdir {mnt}/objects/gone", "Device or resource busy")
    mounted.command("k1 unmap gone")
    wait_until(lambda: not (mnt / "objects/gone/kernels/k1").exists(), what="terminate")
    sh(f"rmdir {mnt}/objects/gone")
    assert not (mounted.store / "objects" / "gone").exists()
    mounted.send("k1 map gone 4K")
    answer = mounted.answer()
    assert answer.startswith("k1 error") and "no object 'gone'" in answer


def test_tail_f_of_trace_shows_messages_as_they_happen(mounted):
    mnt = mounted.mountpoint
    new_object(mnt)
    # TailFollow returns once tail has printed the trace's last line: it is following.
    with TailFollow(mnt / "trace") as tail:
        mounted.command("k1 map hello 64K")
        mounted.command("k1 read hello 1")
        answer = tail.wait_for("-> k1 memory_object_data_", timeout=20)
        assert "memory_object_data_supply" in answer or "memory_object_data_unavailable" in answer
        assert any("memory_object_init" in line for line in tail.lines)


def test_stats_count_the_messages(mounted):
    mnt = mounted.mountpoint
    new_object(mnt)
    mounted.command("k1 map hello 64K")
    for page in range(5):
        mounted.command(f"k1 read hello+{page * 4096} 1")
    stats = dict(line.split(" ", 1) for line in (mnt / "stats").read_text().splitlines())
    assert stats["in.memory_object_data_request"] == "5"
    assert stats["faults_served"] == "5"
    assert stats["in.memory_object_init"] == "1" and stats["out.memory_object_ready"] == "1"
    assert int(stats["latency_max_us"]) > 0
    assert stats["kernels"] == "1" and stats["objects"] == "1"

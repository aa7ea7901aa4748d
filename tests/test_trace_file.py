"""The `trace` file tells the truth however long the trace grows (issue 14, defect 4).

It used to keep a 4 MiB window of the log while its size was the whole log's length, and a
read before the window gave the window's start: past 4 MiB `cat trace` repeated the window
over and over, a read at offset 0 and one at 1,000,000 returned the same bytes, and lines
came cut.  Now the trace is kept in the store in segments rotated at a cap (`--trace-size`):
`trace` is the current one, a real file whose size and bytes agree, `trace.1` ... the older
ones.  Here the cap is small so that a few thousand kernel commands rotate it many times, and
everything is checked through the mount with shell tools: cat, sort | uniq -d, grep -c, dd,
stat, real `tail -f`, and `fusepager trace`.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys

from fusepager.session import MountSession
from mounting import TailFollow, sh

SEGMENT = 64 * 1024
KEEP = 50  # enough that nothing is dropped here: every line logged is in some segment
LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{6} \S")
OBJECTS = 40


def _segments(mnt) -> list[str]:
    """The trace files in the mount, oldest first."""
    older = sorted((name for name in os.listdir(mnt) if name.startswith("trace.")), key=lambda name: -int(name.split(".")[1]))
    return [*older, "trace"]


def test_trace_rotates_and_every_read_tells_the_truth(tmp_path):
    args = ["--trace-size", str(SEGMENT), "--trace-keep", str(KEEP)]
    with MountSession(tmp_path / "store", tmp_path / "mnt", ["k1:4096:32"], extra_args=args) as session:
        mnt = session.mountpoint
        sh(f"mkdir {mnt}/objects/h && truncate -s 1M {mnt}/objects/h/data")
        session.command("k1 map h 1M")
        with TailFollow(mnt / "trace") as tail:
            # Thousands of kernel commands (faults, page-outs: several trace lines each) and
            # now and then an object made, whose trace line names it: countable lines.
            for round in range(OBJECTS):
                for page in range(50):
                    session.send(f"k1 write h+{((round * 50 + page) * 7 % 256) * 4096 + round} r{round}p{page}")
                for _ in range(50):
                    assert session.answer().startswith("k1 ok")
                sh(f"mkdir {mnt}/objects/m{round:03d}")
            sh(f"mkdir {mnt}/objects/last")
            # tail -f went on across every rotation: it saw the file shrink, and prints what
            # came last.
            tail.wait_for("manager created object last")
            assert any("file truncated" in line for line in tail.errors), tail.errors
            assert all(LINE.match(line) for line in tail.lines), [line for line in tail.lines if not LINE.match(line)][:3]
            assert len(set(tail.lines)) == len(tail.lines), "tail -f printed a line twice"

        segments = _segments(mnt)
        assert len(segments) > 5, f"the trace rotated: {segments}"
        for name in segments:
            path = mnt / name
            # Its size is the bytes a read gives, a segment stays under the cap, and it is
            # whole lines, none twice.
            size = int(sh(f"stat -c %s {path}").stdout)
            content = sh(f"cat {path}").stdout
            assert len(content.encode()) == size <= SEGMENT
            assert content.endswith("\n")
            assert sh(f"cat {path} | sort | uniq -d").stdout == ""
            assert all(LINE.match(line) for line in content.splitlines())
            # A read at an offset gives the bytes at that offset; past the end, nothing.
            middle = size // 2
            assert sh(f"dd if={path} bs=1 skip={middle} count=100 status=none").stdout.encode() == content.encode()[middle : middle + 100]
            assert sh(f"dd if={path} bs=1 count=100 status=none").stdout.encode() == content.encode()[:100]
            assert content.encode()[:100] != content.encode()[middle : middle + 100]
            assert sh(f"dd if={path} bs=1 skip={size + 10} count=100 status=none").stdout == ""
            # The store holds the same bytes.
            assert (session.store / "trace" / name).read_bytes() == content.encode()

        # All the segments together are the whole log, each line once: grep -c counts what
        # was logged.
        everything = " ".join(str(mnt / name) for name in segments)
        assert sh(f"cat {everything} | sort | uniq -d").stdout == ""
        assert sh(f"cat {everything} | grep -c 'manager created object m'").stdout == f"{OBJECTS}\n"
        for name in segments:
            made = sh(f"grep -o 'manager created object m[0-9]*' {mnt / name} || true").stdout.splitlines()
            assert int(sh(f"grep -c 'manager created object m' {mnt / name} || true").stdout) == len(made) == len(set(made))
        tail_lines = set(tail.lines)
        assert tail_lines <= set(sh(f"cat {everything}").stdout.splitlines())

        # `fusepager trace` draws only lifelines that exist: a kernel and objects.
        drawn = sh(f"{sys.executable} -m fusepager trace {mnt} --svg {tmp_path / 'trace.svg'}").stderr
        lifelines = re.search(r"lifelines (.*) ->", drawn)
        assert lifelines is not None, drawn
        assert set(lifelines.group(1).split()) <= {"k1", "h", "default"}, drawn


def test_each_mount_starts_a_new_segment_and_keeps_the_last_runs(tmp_path):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    with MountSession(store, mnt, []):
        sh(f"mkdir {mnt}/objects/first-run")
    with MountSession(store, mnt, [], extra_args=["--trace-keep", "1"]):
        assert sorted(os.listdir(mnt)) == ["default", "objects", "stats", "trace", "trace.1"]
        assert "manager serving store" in sh(f"head -n 1 {mnt}/trace").stdout
        assert "first-run" not in sh(f"cat {mnt}/trace").stdout
        assert "manager created object first-run" in sh(f"cat {mnt}/trace.1").stdout
        assert sh(f"cat {mnt}/trace.2", check=False).returncode != 0
        sh(f"mkdir {mnt}/objects/second-run")
    with MountSession(store, mnt, [], extra_args=["--trace-keep", "1"]):
        # Only one older segment is kept: the first run's lines are gone, the second's kept.
        assert "second-run" in sh(f"cat {mnt}/trace.1").stdout
        assert sorted(os.listdir(store / "trace")) == ["trace", "trace.1"]


def test_huge_offsets_and_a_read_of_a_gone_segment_give_nothing(tmp_path):
    with MountSession(tmp_path / "store", tmp_path / "mnt", [], extra_args=["--trace-size", "4K", "--trace-keep", "1"]) as session:
        mnt = session.mountpoint
        for offset in (2**31, 2**32, 2**63 - 2):
            assert sh(f"dd if={mnt}/trace bs=1 skip={offset} count=1 status=none").stdout == ""
        # trace.1 opened, then two rotations: the segment it showed is no longer kept, and its
        # handle reads nothing (never another segment's bytes in the middle).
        sh(f"for n in $(seq 100); do mkdir {mnt}/objects/first$n; done")
        assert os.path.exists(mnt / "trace.1")
        with open(mnt / "trace.1", "rb", buffering=0) as old:
            first = old.read(100)
            assert LINE.match(first.decode())
            sh(f"for n in $(seq 200); do mkdir {mnt}/objects/second$n; done")
            assert old.read(100) == b""
            old.seek(0)  # from the start: the segment trace.1 shows now
            assert old.read() == (mnt / "trace.1").read_bytes()


def test_a_link_planted_as_an_older_segment_shows_nothing_of_its_target(tmp_path):
    """Found by the attack: `MNT/trace.1` showed the size of whatever a symlink planted at
    STORE/trace/trace.1 pointed to (reads failed, the size leaked)."""
    target = tmp_path / "secret"
    target.write_bytes(b"s" * 12345)
    store = tmp_path / "store"
    with MountSession(store, tmp_path / "mnt", [], extra_args=["--trace-keep", "1"]):
        pass  # a first run: its trace becomes trace.1 at the next mount
    with MountSession(store, tmp_path / "mnt", [], extra_args=["--trace-keep", "1"]) as session:
        planted = store / "trace" / "trace.1"
        planted.unlink()
        planted.symlink_to(target)
        assert sh(f"stat -c %s {session.mountpoint}/trace.1").stdout.strip() == "0"
        assert b"s" not in subprocess.run(["cat", str(session.mountpoint / "trace.1")], capture_output=True).stdout


def test_a_smaller_trace_keep_removes_the_older_segments(tmp_path):
    """Found by the attack: segments a run with a larger --trace-keep left stayed for ever."""
    store = tmp_path / "store"
    for _ in range(4):
        with MountSession(store, tmp_path / "mnt", [], extra_args=["--trace-keep", "3"]):
            pass
    assert sorted(os.listdir(store / "trace")) == ["trace", "trace.1", "trace.2", "trace.3"]
    with MountSession(store, tmp_path / "mnt", [], extra_args=["--trace-keep", "1"]) as session:
        assert sorted(os.listdir(store / "trace")) == ["trace", "trace.1"]
        assert sorted(name for name in os.listdir(session.mountpoint) if name.startswith("trace")) == ["trace", "trace.1"]
    with MountSession(store, tmp_path / "mnt", [], extra_args=["--trace-keep", "0"]):
        assert os.listdir(store / "trace") == ["trace"]


def test_a_full_disk_keeps_trace_lines_in_memory_until_they_can_be_written(tmp_path):
    """The trace of a full store still tells why (its lines wait in memory, readable); those
    a rotation leaves unwritten are counted in the next segment; it is written once there is
    room again.  (In process: a Trace on a tiny tmpfs.)"""
    from fusepager.trace import Trace

    directory = tmp_path / "small"
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)], check=True)
    try:
        trace = Trace(directory / "trace", segment_size=32768, keep=1)
        trace.line("before the disk filled")
        trace.sync()
        filler = directory / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"x" * 4096):
                pass
        except OSError as error:
            assert error.errno == errno.ENOSPC
        finally:
            os.close(fd)
        for number in range(300):  # more than the page the file has begun
            trace.line(f"while full {number}")
        trace.sync()
        text = trace.read(0, 1 << 20).decode()
        assert "before the disk filled" in text and "while full 299" in text
        assert trace.size() == len(text.encode())
        assert "while full 299" not in (directory / "trace" / "trace").read_text()
        for number in range(1000):  # past the cap: the unwritten lines are rotated away
            trace.line(f"still full {number}")
        text = trace.read(0, 1 << 20).decode()
        assert re.search(r"trace: \d+ lines at the end of the last segment could not be written \(No space left on device\)", text), text[:300]
        filler.unlink()
        trace.line("room again")
        trace.sync()
        assert (directory / "trace" / "trace").read_bytes() == trace.read(0, 1 << 20)
        assert "room again" in (directory / "trace" / "trace").read_text()
        trace.close()
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)

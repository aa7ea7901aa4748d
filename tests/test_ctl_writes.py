"""Issue 14, defects 7 and 8: how writes to `ctl` become commands, and errnos that agree.

7. A write's lines are all checked before any runs; a command split across writes runs once
   its line is whole; a line without its newline runs at close; lines are bounded.
8. Setting times answers EPERM like chmod; a descriptor of an object that was removed (and
   perhaps made again) answers ESTALE.

Through a real mount with kernel process k1 mapping the object: it holds a dirty page, so
whether `sync` or `flush` ran shows in the store's file and in k1's `pages`.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from mounting import fails_with, sh, trace_lines, wait_until

EINVAL, EPERM, ESTALE = "Invalid argument", "Operation not permitted", "Stale file handle"


def _store_bytes(session, offset: int, length: int) -> bytes:
    """What the store's own file holds (not read through the mount, which would clean first)."""
    with open(session.store / "objects" / "h" / "data", "rb") as file:
        file.seek(offset)
        return file.read(length)


def _dirty_page(session, k1, obj) -> None:
    """k1 changes page 2 and keeps it: the store does not have the change yet."""
    k1.command("write h+8192 only in k1")
    assert _store_bytes(session, 8192, 10) == b"\0" * 10
    assert "8192 4096" in (obj / "kernels" / "k1" / "pages").read_text() or "0x2000 4096" in (obj / "kernels" / "k1" / "pages").read_text()


def _ctl_lines(session, since: int) -> list[str]:
    return [line for line in trace_lines(session.mountpoint)[since:] if "mount ctl h: " in line]


def test_a_bad_line_refuses_the_whole_write_and_runs_none_of_it(process_mapped):
    session, k1, obj = process_mapped
    _dirty_page(session, k1, obj)
    pages = (obj / "kernels" / "k1" / "pages").read_text()
    before = len(trace_lines(session.mountpoint))
    # One write (cat writes what it read at once) of three lines, the second bad.
    fails_with(f"printf 'sync\\nfrobnicate\\nflush\\n' | cat > {obj}/ctl", EINVAL)
    assert _ctl_lines(session, before) == []  # neither sync nor flush ran
    assert any("unknown command 'frobnicate'" in line for line in trace_lines(session.mountpoint)[before:])
    assert _store_bytes(session, 8192, 10) == b"\0" * 10  # sync did not store k1's page
    assert (obj / "kernels" / "k1" / "pages").read_text() == pages  # flush did not take it
    # The same lines without the bad one run, in order.
    sh(f"printf 'sync\\n\\nflush\\n' | cat > {obj}/ctl")
    assert [line.split("mount ctl h: ")[1] for line in _ctl_lines(session, before)] == ["sync", "flush"]
    assert _store_bytes(session, 8192, 10) == b"only in k1"


def test_nothing_written_after_a_refused_line_runs(process_mapped):
    """bash's printf writes each line on its own: `sync` runs before `frobnicate` comes; the
    refusal ends the open file, so `flush` does not run after it (it did)."""
    session, k1, obj = process_mapped
    _dirty_page(session, k1, obj)
    before = len(trace_lines(session.mountpoint))
    fails_with(f"printf 'sync\\nfrobnicate\\nflush\\n' > {obj}/ctl", EINVAL)
    assert [line.split("mount ctl h: ")[1] for line in _ctl_lines(session, before)] == ["sync"]
    assert _store_bytes(session, 8192, 10) == b"only in k1"  # sync ran
    assert "0x2000 4096" in (obj / "kernels" / "k1" / "pages").read_text()  # flush did not take page 2
    assert any("an earlier line on this open file was refused" in line for line in trace_lines(session.mountpoint)[before:])
    sh(f"echo flush > {obj}/ctl")  # a new open takes commands again
    assert [line.split("mount ctl h: ")[1] for line in _ctl_lines(session, before)] == ["sync", "flush"]


def test_a_command_split_across_writes_runs_when_its_line_is_whole(process_mapped):
    session, k1, obj = process_mapped
    _dirty_page(session, k1, obj)
    before = len(trace_lines(session.mountpoint))
    fd = os.open(obj / "ctl", os.O_WRONLY)
    try:
        assert os.write(fd, b"sy") == 2  # taken, waiting for the rest of its line
        assert _ctl_lines(session, before) == []
        assert _store_bytes(session, 8192, 10) == b"\0" * 10
        assert os.write(fd, b"nc\nfl") == 5  # sync is whole now and has run when write returns
        assert [line.split("mount ctl h: ")[1] for line in _ctl_lines(session, before)] == ["sync"]
        assert _store_bytes(session, 8192, 10) == b"only in k1"
        assert os.write(fd, b"ush 8192 4096\n") == 14
        assert [line.split("mount ctl h: ")[1] for line in _ctl_lines(session, before)] == ["sync", "flush 8192 4096"]
    finally:
        os.close(fd)
    # A multi-byte character cut between writes is text all the same.
    fd = os.open(obj / "ctl", os.O_WRONLY)
    try:
        os.write(fd, b"attributes copy=\xc3")
        with pytest.raises(OSError) as refused:
            os.write(fd, b"\xa9\n")  # "copy=é": one line, valid UTF-8, refused as a bad strategy
        assert refused.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert any("copy='é'" in line for line in trace_lines(session.mountpoint)[before:])
    assert k1.command("read h+8192 10 text").endswith("'only in k1'")


def test_a_line_without_its_newline_runs_at_close_and_close_reports_its_error(process_mapped):
    session, k1, obj = process_mapped
    _dirty_page(session, k1, obj)
    before = len(trace_lines(session.mountpoint))
    sh(f"echo -n sync > {obj}/ctl")
    assert [line.split("mount ctl h: ")[1] for line in _ctl_lines(session, before)] == ["sync"]
    assert _store_bytes(session, 8192, 10) == b"only in k1"
    fd = os.open(obj / "ctl", os.O_WRONLY)
    assert os.write(fd, b"frobnicate") == 10  # not known to be a whole line yet
    with pytest.raises(OSError) as refused:
        os.close(fd)
    assert refused.value.errno == errno.EINVAL
    assert any("unknown command 'frobnicate'" in line for line in trace_lines(session.mountpoint)[before:])


def test_a_line_longer_than_the_bound_is_refused_and_nothing_after_it_runs(process_mapped):
    session, k1, obj = process_mapped
    _dirty_page(session, k1, obj)
    before = len(trace_lines(session.mountpoint))
    fd = os.open(obj / "ctl", os.O_WRONLY)
    try:
        assert os.write(fd, b" " * 4000) == 4000  # may still be a line (of blanks and sync)
        for chunk in (b" " * 200, b" sync", b"\nsync\n", b"sync\n"):
            with pytest.raises(OSError) as refused:
                os.write(fd, chunk)  # too long, and then the open file takes nothing more
            assert refused.value.errno == errno.EINVAL
    finally:
        os.close(fd)  # nothing left to run: no error
    assert _ctl_lines(session, before) == []
    assert any("longer than 4096 bytes" in line for line in trace_lines(session.mountpoint)[before:])
    sh(f"echo sync > {obj}/ctl")
    assert [line.split("mount ctl h: ")[1] for line in _ctl_lines(session, before)] == ["sync"]
    assert session.process.poll() is None


def test_setting_times_answers_eperm_like_chmod_and_changes_nothing(process_mapped):
    session, k1, obj = process_mapped
    for path in (obj / "data", obj / "ctl", obj):  # (read-only files: touch opens them to write: EROFS)
        stamp = os.stat(path).st_mtime_ns
        fails_with(f"touch -d 2000-01-01 {path}", EPERM)
        fails_with(f"touch {path}", EPERM)
        fails_with(f"chmod 600 {path}", EPERM)
        assert os.stat(path).st_mtime_ns == stamp
    # What does change them still works: a truncate, and `echo cmd > ctl` (an O_TRUNC open).
    sh(f"truncate -s 128K {obj}/data && echo sync > {obj}/ctl")
    assert os.stat(obj / "data").st_size == 128 * 1024
    assert k1.command("read h+100 12 text").endswith("'kernel bytes'")


@pytest.mark.parametrize("made_again", [False, True], ids=["removed", "removed and made again"])
def test_a_descriptor_of_a_removed_object_answers_estale(process_mapped, made_again):
    session, k1, obj = process_mapped
    other = session.mountpoint / "objects" / "other"
    sh(f"mkdir {other} && printf 'old bytes' > {other}/data")
    data = os.open(other / "data", os.O_RDWR)
    ctl = os.open(other / "ctl", os.O_WRONLY)
    try:
        sh(f"rmdir {other}")
        if made_again:
            sh(f"mkdir {other} && printf 'new bytes' > {other}/data")
        before = len(trace_lines(session.mountpoint))
        calls = {
            "write": lambda: os.pwrite(data, b"stale", 0),
            "read": lambda: os.pread(data, 9, 0),
            "write ctl": lambda: os.write(ctl, b"sync\n"),
            "ftruncate": lambda: os.ftruncate(data, 0),
            "fsync": lambda: os.fsync(data),
        }
        # A cached read asks for the file's attributes first: of an object that is gone, that
        # is ENOENT; of one made again under the name, the read comes and is ESTALE.
        expected = {what: errno.ESTALE for what in calls} | {"read": errno.ESTALE if made_again else errno.ENOENT}
        for what, call in calls.items():
            with pytest.raises(OSError) as refused:
                call()
            assert refused.value.errno == expected[what], (what, refused.value)
        stale = sum(code == errno.ESTALE for code in expected.values())
        # Each traced (Linux tries a failed page read twice: one refusal may be two lines).
        assert sum("(ESTALE)" in line for line in trace_lines(session.mountpoint)[before:]) >= stale
    finally:
        os.close(data)
        os.close(ctl)
    if made_again:
        assert (other / "data").read_bytes() == b"new bytes"
    else:
        assert not other.exists()
    assert session.process.poll() is None
    assert k1.command("read h+100 12 text").endswith("'kernel bytes'")


def test_a_ctl_descriptor_kept_across_rmdir_does_not_end_the_daemon(process_mapped):
    """It did: `sync` written to it reached the store's ENOENT for the removed object, which
    no handler caught, and pyfuse3 ended the mount."""
    session, k1, obj = process_mapped
    other = session.mountpoint / "objects" / "other"
    sh(f"mkdir {other}")
    result = subprocess.run(
        ["bash", "-c", f"exec 3>{other}/ctl; rmdir {other}; echo sync >&3"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and ESTALE in result.stderr, result.stderr
    wait_until(lambda: session.process.poll() is None and os.path.isdir(obj), what="the mount serving")
    assert k1.command("read h+100 12 text").endswith("'kernel bytes'")
    assert sh(f"dd if={obj}/data bs=1 skip=100 count=12 status=none").stdout == "kernel bytes"

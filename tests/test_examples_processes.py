"""examples/dsm_counter.py and examples/manual_ready.sh, run as a user runs them.

Each example runs as a subprocess (the way its docstring says), with its work directory in
tmp_path (`--dir`).  The tests check the exit status, the lines a reader looks for (the final
counter, the page moving between the kernels, `ready` answered by the shell, the lock holding
the writer), what ended up in the store file, and that the example left nothing behind: no
mount under its directory in /proc/mounts and no process of its own still running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DSM = ROOT / "examples" / "dsm_counter.py"
MANUAL = ROOT / "examples" / "manual_ready.sh"
RUN_TIMEOUT = 120


def _fuse_mounts_under(path: Path) -> list[str]:
    """The lines of /proc/mounts (as `grep fuse /proc/mounts` shows them) that name `path`."""
    with open("/proc/mounts") as mounts:
        return [line.strip() for line in mounts if "fuse" in line and str(path) in line]


def _processes_mentioning(path: Path) -> list[int]:
    """Processes whose command line names `path`: the daemon and kernels an example started
    there (their store, socket and mount point are under it, and nothing else's are)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                words = cmdline.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if any(str(path).encode() in word for word in words):
            found.append(int(entry))
    return found


def _wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def workdir(tmp_path):
    """The example's work directory.  Afterwards, whatever happened: nothing may be left mounted
    or running there.  What is left is cleared (lazy unmount, then SIGKILL by PID) and the test
    errs, so a leak never goes unnoticed nor outlives the test."""
    work = tmp_path / "work"
    yield work
    # The examples end their processes before returning; a daemon may need a moment to exit
    # after its unmount.
    _wait_until(lambda: not _processes_mentioning(work) and not _fuse_mounts_under(work), 10.0)
    mounts, processes = _fuse_mounts_under(work), _processes_mentioning(work)
    for line in mounts:
        subprocess.run(["fusermount3", "-u", "-z", line.split()[1]], check=False, capture_output=True)
    for pid in processes:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if mounts or processes:
        pytest.fail(f"the example left behind mounts {mounts} and processes {processes}")


def _run(command: list[str], timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run an example to its end.  If it hangs, terminate it (SIGTERM: its cleanup runs), then
    kill it."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # both examples clean up on SIGTERM
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        pytest.fail(f"{command} did not finish within {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _index(lines: list[str], text: str, start: int = 0) -> int:
    """The index of the first line from `start` on that contains `text`."""
    for number in range(start, len(lines)):
        if text in lines[number]:
            return number
    raise AssertionError(f"no line with {text!r} after line {start}:\n" + "\n".join(lines[start:]))


# -- examples/dsm_counter.py -----------------------------------------------------------------------


def test_dsm_counter_moves_the_page_between_the_kernels_and_counts_to_twice_the_rounds(workdir):
    result = _run([sys.executable, str(DSM), "--rounds", "6", "--dir", str(workdir)])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()

    # The equivalent shell commands are shown: the mount and the two kernel processes.
    _index(lines, "$ .venv/bin/fusepager mount $DIR/store $MNT")
    _index(lines, "--name k1 --page-size 4096")
    _index(lines, "--name k2 --page-size 16384")

    # The page moves: turn 2 shows k1 asked to flush, its data_return, k2's request, unlock and
    # supply, and the pagemaps with 'rw- dirty' at k2 and nothing at k1.
    turn2 = _index(lines, "Turn 2: k2 increments the counter.")
    _index(lines, "k2 -> counter memory_object_data_request(", turn2)
    _index(lines, "k1 -> counter memory_object_data_return(", turn2)
    flush = _index(lines, "counter -> k1 memory_object_lock_request(", turn2)
    assert "should_flush=0" in lines[flush]  # the first one asks k1 for its changes ...
    flush = _index(lines, "counter -> k1 memory_object_lock_request(", flush + 1)
    assert "should_flush=1" in lines[flush]  # ... the second makes k1 give the page up
    _index(lines, "k2 -> counter memory_object_data_unlock(", turn2)
    _index(lines, "counter -> k2 memory_object_data_supply(", turn2)
    pages = _index(lines, "$ cat $OBJ/kernels/k2/pages", turn2)
    assert lines[pages + 1].strip() == "0x0 16384 rw- dirty,precious"
    assert "(nothing: k1 holds no page of the object)" in lines[pages + 3]
    _index(lines, "=> page 0 moved from k1 to k2", turn2)
    turn3 = _index(lines, "Turn 3: k1 increments the counter.")
    _index(lines, "=> page 0 moved from k2 to k1", turn3)
    # The turns not shown in full get a line each, with the owner changing every time.
    _index(lines, "turn   5: k1 read 00000004 wrote 00000005 | page 0: k2 -> k1")
    _index(lines, "turn  12: k2 read 00000011 wrote 00000012 | page 0: k1 -> k2")
    _index(lines, "Page 0 changed hands 11 times in 12 turns.")

    # The counter is 2 x 6, read by both kernels, cat and xxd.
    final = _index(lines, "Both kernels read the counter: it must be 12")
    for kernel in ("k1", "k2"):
        asked = _index(lines, f"{kernel}> read counter+8 8 text", final)
        assert lines[asked + 1].strip() == "ok read 0x10008 8 '00000012'"
    _index(lines, "counter=00000012", final)
    _index(lines, "00000000: 636f 756e 7465 723d 3030 3030 3030 3132  counter=00000012", final)
    # The message summary from stats: one data_request and one data_unlock per turn.
    assert lines[_index(lines, "in.memory_object_data_request")].split()[1:3] == ["12", "1.00"]
    assert lines[_index(lines, "in.memory_object_data_unlock")].split()[1:3] == ["12", "1.00"]
    assert int(lines[_index(lines, "in.memory_object_data_return")].split()[1]) >= 11
    assert "All checks held: the counter is 12" in lines[-1]

    # Independently of what it printed: the store file holds the counter.
    assert (workdir / "store" / "objects" / "counter" / "data").read_bytes()[:17] == b"counter=00000012\n"
    assert _fuse_mounts_under(workdir) == []


def test_dsm_counter_keep_leaves_the_mount_and_says_how_to_unmount(workdir):
    result = _run([sys.executable, str(DSM), "--rounds", "2", "--show", "1", "--dir", str(workdir), "--keep"])
    assert result.returncode == 0, result.stdout + result.stderr
    mnt = workdir / "mnt"
    assert len(_fuse_mounts_under(mnt)) == 1
    # The kernel processes have ended, giving their pages back: the mount shows the counter.
    assert (mnt / "objects" / "counter" / "data").read_bytes()[:16] == b"counter=00000004"
    assert os.listdir(mnt / "objects" / "counter" / "kernels") == []
    # The printed command unmounts.
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("Unmount with:")]
    command = line.split(":", 1)[1].split()
    assert command[1:] == ["umount", str(mnt)]
    unmounted = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert unmounted.returncode == 0, unmounted.stdout + unmounted.stderr
    assert _fuse_mounts_under(workdir) == []


def test_dsm_counter_fails_and_cleans_up_when_a_kernel_process_dies(workdir):
    """A kernel killed halfway: the example says so, exits 1, and still ends the other kernel and
    unmounts."""
    command = [sys.executable, str(DSM), "--rounds", "500", "--show", "0", "--dir", str(workdir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        seen = []
        assert process.stdout is not None
        for line in process.stdout:
            seen.append(line)
            if line.startswith("  turn  20:"):
                break
        assert seen and seen[-1].startswith("  turn  20:"), "".join(seen)
        (k2,) = [pid for pid in _children(process.pid) if b"--name\0k2\0" in _cmdline(pid)]
        os.kill(k2, signal.SIGKILL)
        out, err = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        if process.poll() is None:
            process.terminate()  # its cleanup runs
            process.communicate(timeout=30)
    assert process.returncode == 1, out + err
    # Killed holding the page, k2 took its last change with it (k1 then reads one less), or it
    # died after giving the page up (the next command to it fails): either way, said so.
    assert "dsm_counter: a kernel process failed: kernel process k2 " in err, err
    assert "All checks held" not in out
    assert "unmounted " in out
    assert _fuse_mounts_under(workdir) == []


def _children(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
            except OSError:
                pass
    return children


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read()


# -- examples/manual_ready.sh ----------------------------------------------------------------------


def test_manual_ready_the_shell_answers_ready_and_its_lock_holds_the_writer(workdir):
    result = _run([str(MANUAL), "--dir", str(workdir)])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()

    # kernels/k1 appears without ready, with its page size; the read waits.
    read = _index(lines, "k1> read notes 21 text")
    _index(lines, "(no ready: nobody has answered k1's init)", read)
    size = _index(lines, "$ cat $OBJ/kernels/k1/page_size", read)
    assert lines[size + 1].strip() == "4096"
    _index(lines, "k1 -> notes memory_object_init(", read)
    waiting = _index(lines, "=> k1's read is waiting: it has not answered.", read)
    # The shell answers ready; only then does the read answer.
    ready = _index(lines, "$ echo 'may_cache=0 copy=call' > $OBJ/kernels/k1/ready", waiting)
    assert lines[ready + 1].strip() == "ok read 0x10000 21 'written by: the shell'"
    assert not any(line.strip().startswith("ok read") for line in lines[read:ready])
    _index(lines, "notes -> k1 memory_object_ready(may_cache=0 copy_strategy=call)", ready)
    _index(lines, "=> ready answered by the shell", ready)

    # The lock holds the writer until 'lock 0 4096 none'.
    lock = _index(lines, "$ echo 'lock 0 4096 w' > $OBJ/ctl", ready)
    write = _index(lines, "k1> write notes+12 a k1 task", lock)
    _index(lines, "notes holds unlock from k1: range locked with 'lock'", write)
    _index(lines, "=> the lock holds the writer: k1 has not answered, the data is unchanged.", write)
    unlock = _index(lines, "$ echo 'lock 0 4096 none' > $OBJ/ctl", write)
    assert lines[unlock + 1].strip() == "ok write 0x1000c 9"
    assert not any(line.strip().startswith("ok write") for line in lines[write:unlock])
    pages = _index(lines, "$ cat $OBJ/kernels/k1/pages", unlock)
    assert lines[pages + 1].strip() == "0x0 4096 rw- dirty,precious"

    # flush takes the page back, sync stores it.
    flush = _index(lines, "$ echo flush > $OBJ/ctl", unlock)
    _index(lines, "k1 -> notes memory_object_data_return(", flush)
    _index(lines, "(nothing: k1 holds no page of the object)", flush)
    _index(lines, "$ echo sync > $OBJ/ctl", flush)
    _index(lines, "=> the same bytes in $OBJ/data and in the store.", flush)
    _index(lines, "All checks passed")

    # Independently: the store file holds the task's write, and the kernel said goodbye.
    assert (workdir / "store" / "objects" / "notes" / "data").read_bytes()[:21] == b"written by: a k1 task"
    assert _fuse_mounts_under(workdir) == []


def test_manual_ready_runs_from_anywhere_and_cleans_up_its_temporary_directory(tmp_path):
    """One command, from any directory, without --dir: a temporary directory, removed after."""
    result = _run([str(MANUAL)])
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("  $ DIR=")]
    work = Path(line.split("=", 1)[1].split(";", 1)[0])
    assert work.name.startswith("manual-ready.")
    assert not work.exists()
    assert _fuse_mounts_under(work) == []
    assert _processes_mentioning(work) == []


def test_manual_ready_reports_a_failed_step_and_still_unmounts(workdir):
    # An object called notes already in the store: the script's `mkdir $OBJ` fails.
    (workdir / "store" / "objects" / "notes").mkdir(parents=True)
    (workdir / "store" / "objects" / "notes" / "data").write_bytes(b"already here")
    result = _run([str(MANUAL), "--dir", str(workdir)])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "manual_ready.sh: FAILED: this command failed: mkdir $OBJ" in result.stderr
    assert "All checks passed" not in result.stdout
    assert "unmounted " in result.stdout
    assert _fuse_mounts_under(workdir) == []


def test_manual_ready_stopped_while_the_writer_waits_ends_the_kernel_and_unmounts(workdir):
    """Stopped (SIGTERM; Ctrl-C's SIGINT takes the same path) at the worst moment: the kernel's
    task waits on a held unlock and reads no more commands, so the script must kill it by PID
    before it unmounts."""
    process = subprocess.Popen([str(MANUAL), "--dir", str(workdir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        seen = []
        assert process.stdout is not None
        for line in process.stdout:
            seen.append(line)
            if "notes holds unlock from k1" in line:
                break
        assert "notes holds unlock from k1" in seen[-1], "".join(seen)
        process.terminate()
        out, err = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143, out + err
    assert "All checks passed" not in out
    assert "unmounted " in out
    assert _fuse_mounts_under(workdir) == []
    # The script may have run a few more commands before the trap (bash runs it between
    # commands), but the write completes only after the script's own 'lock 0 4096 none'.  If the
    # interrupt came before that, the kernel was still waiting and had to be killed.
    if "ok write" not in out:
        assert "kernel k1" in err and "did not exit; killing it" in err, err

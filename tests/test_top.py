"""`fusepager top`: the parsers and the page map on given text, `Pager.locks`, and the command
run as a subprocess against real mounts (its --once frame, the live screen in a terminal, its
errors), plus the mount's `locks` file it reads."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from mounting import sh, wait_until
from rich.console import Console

from fusepager import top
from fusepager.fs import render_locks
from fusepager.pager import LockState, Pager, PagerCallbacks
from fusepager.session import KernelProcess, MountSession
from kernelsim.interface import MEMORY_OBJECT_RETURN_DIRTY, VM_PROT_WRITE

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable


def run_top(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "80"}  # what a pipe gets by default, whatever runs the tests
    result = subprocess.run([PYTHON, "-m", "fusepager", "top", *args], check=False, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    if check:
        assert result.returncode == 0, f"fusepager top {' '.join(args)}: status {result.returncode}\n{result.stdout}{result.stderr}"
    return result


def plain(renderable, width: int = 100) -> str:
    console = Console(file=io.StringIO(), color_system=None, width=width)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def map_line(output: str, kernel: str) -> str:
    """The first map row of `kernel` in a frame: the line after its heading."""
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if re.match(rf"│ {re.escape(kernel)}  \d", line):
            match = re.search(r"0x00000000 (\S+)", lines[index + 1])
            assert match, lines[index + 1]
            return match.group(1)
    raise AssertionError(f"no map for {kernel} in:\n{output}")


# -- parsers ------------------------------------------------------------------------------------


def test_parse_pages():
    text = "0x0 4096 r-- precious\n0x2000 8192 rw- dirty,precious\n0x8000 4096 r-- -\n"
    assert top.parse_pages(text) == [
        top.PageRun(0, 4096, "r--", dirty=False, precious=True),
        top.PageRun(0x2000, 8192, "rw-", dirty=True, precious=True),
        top.PageRun(0x8000, 4096, "r--", dirty=False, precious=False),
    ]
    assert top.parse_pages("") == []
    for bad in ("0x0 4096\n", "zero 4096 r-- -\n", "0x0 4096 rw -\n"):
        with pytest.raises(ValueError, match="pages line 1"):
            top.parse_pages(bad)


def test_parse_stats():
    text = "objects 2\nfaults_served 7\nlatency_mean_us 150\nin.memory_object_data_request 7\nnonsense\nbad value\n"
    assert top.parse_stats(text) == {"objects": 2, "faults_served": 7, "latency_mean_us": 150, "in.memory_object_data_request": 7}


def test_parse_locks():
    text = (
        "manager * 0xc000 4096 -w-\n"
        "request k1 0x0 16384 -w- flush=0 return=dirty waited_ms=12\n"
        "unlock k2 0x4000 4096 -w-\n"
    )
    manager, request, unlock = top.parse_locks(text)
    assert (manager.kind, manager.kernel, manager.offset, manager.length, manager.prot) == ("manager", "*", 0xC000, 4096, "-w-")
    assert (request.kind, request.kernel, request.length, request.extra) == ("request", "k1", 16384, {"flush": "0", "return": "dirty", "waited_ms": "12"})
    assert request.waited_ms == 12 and manager.waited_ms is None
    assert (unlock.kind, unlock.kernel, unlock.offset) == ("unlock", "k2", 0x4000)
    for bad in ("manager * 0x0 4096\n", "other * 0x0 4096 -w-\n", "request k1 0x0 4096 -w- flush\n"):
        with pytest.raises(ValueError, match="locks line 1"):
            top.parse_locks(bad)


def test_the_locks_file_format_reads_back():
    locks = [
        LockState("manager", 0xC000, 4096, VM_PROT_WRITE),
        LockState("request", 0, 16384, VM_PROT_WRITE, "k1", flush=True, should_return=MEMORY_OBJECT_RETURN_DIRTY, waited=0.0124),
        LockState("unlock", 0x4000, 4096, VM_PROT_WRITE, "k2"),
    ]
    text = render_locks(locks)
    assert text == "manager * 0xc000 4096 -w-\nrequest k1 0x0 16384 -w- flush=1 return=dirty waited_ms=12\nunlock k2 0x4000 4096 -w-\n"
    assert [(lock.kind, lock.kernel, lock.offset, lock.length) for lock in top.parse_locks(text)] == [
        ("manager", "*", 0xC000, 4096),
        ("request", "k1", 0, 16384),
        ("unlock", "k2", 0x4000, 4096),
    ]


async def test_pager_locks_lists_the_manager_locks():
    pager = Pager(PagerCallbacks(), name="obj")
    assert pager.locks() == []
    await pager.lock(0x2000, 8192, VM_PROT_WRITE)
    await pager.lock(0, 4096, VM_PROT_WRITE)
    assert pager.locks() == [LockState("manager", 0, 4096, VM_PROT_WRITE), LockState("manager", 0x2000, 8192, VM_PROT_WRITE)]
    await pager.lock(0x2000, 8192, 0)
    assert pager.locks() == [LockState("manager", 0, 4096, VM_PROT_WRITE)]


# -- the page map -------------------------------------------------------------------------------


def kernel(pages_text: str, page_size: int = 4096) -> top.KernelView:
    return top.KernelView("k1", page_size, tuple(top.parse_pages(pages_text)))


def test_a_cell_per_page_shows_each_state():
    view = kernel("0x0 4096 r-- precious\n0x2000 8192 rw- dirty,precious\n0x6000 4096 r-- -\n")
    page_map = top.page_cells(view, 16 * 4096, [], max_cells=64)
    assert page_map.pages_per_cell == 1
    assert top.map_rows(page_map, 64) == ["p.WW..r........."]
    assert top.map_rows(page_map, 8) == ["p.WW..r.", "........"]


def test_manager_locks_show_over_the_pages_they_cover():
    view = kernel("0x0 4096 r-- precious\n0x2000 4096 rw- dirty\n")
    # A lock over part of page 1 covers the whole page (held: no); one over pages 2-3 (2 held).
    locks = top.parse_locks("manager * 0x1800 16 -w-\nmanager * 0x2000 8192 -w-\n")
    assert top.map_rows(top.page_cells(view, 8 * 4096, locks, 64), 64) == ["plLl...."]


def test_the_map_covers_pages_held_past_the_end_and_a_16k_kernel():
    assert top.map_rows(top.page_cells(kernel("0x5000 4096 r-- -\n"), 8192, [], 64), 64) == [".....r"]
    big = kernel("0x4000 16384 rw- dirty\n", page_size=16384)
    assert top.map_rows(top.page_cells(big, 65536, [], 64), 64) == [".W.."]
    assert top.map_rows(top.page_cells(kernel(""), 0, [], 64), 64) == []


def test_big_objects_group_pages_into_cells_with_the_strongest_state():
    # 1 GiB of 4 KiB pages in at most 256 cells: 1024 pages (4 MiB) a cell.
    view = kernel("0x0 4096 r-- -\n0x400000 4096 r-- precious\n0x401000 4096 rw- dirty\n0x800000 4096 r-- precious\n")
    locks = top.parse_locks("manager * 0xc00000 1 -w-\n")
    page_map = top.page_cells(view, 1 << 30, locks, max_cells=256)
    assert page_map.pages_per_cell == 1024 and len(page_map.cells) == 256
    assert "".join(top.map_rows(page_map, 64))[:5] == "rWpl."
    frame = plain(top.render_object(top.ObjectView("big", 1 << 30, (view,), tuple(locks)), per_row=64))
    assert "a cell is 1024 pages, 4 MiB" in frame
    assert re.search(r"0x00000000 rWpl\.{59}", frame) and re.search(r"0x10000000 \.{64}", frame)
    assert len(re.findall(r"0x[0-9a-f]{8} ", frame)) == 4


def test_rates_between_snapshots_and_since_the_mount():
    def snap(taken: float, stats: dict) -> top.Snapshot:
        return top.Snapshot("/m", taken, 1000.0 + taken, 1000.0, stats, ())

    first = snap(10.0, {"faults_served": 100, "latency_mean_us": 200, "in.memory_object_data_request": 100, "out.memory_object_data_supply": 90})
    second = snap(12.0, {"faults_served": 140, "latency_mean_us": 200, "in.memory_object_data_request": 140, "out.memory_object_data_supply": 90, "in.memory_object_data_unlock": 6})
    measured = top.rates(first, second)
    assert not measured.since_mount and measured.seconds == 2.0
    assert measured.messages == [
        ("in.memory_object_data_request", 140, 20.0),
        ("in.memory_object_data_unlock", 6, 3.0),
        ("out.memory_object_data_supply", 90, 0.0),
    ]
    assert measured.faults_per_second == 20.0 and measured.latency_us == 200.0
    since = top.rates(None, first)
    assert since.since_mount and since.seconds == 10.0 and since.faults_per_second == 10.0


def test_the_interval_latency_is_given_only_when_the_rounding_allows():
    assert top.interval_latency_us({"faults_served": 10, "latency_mean_us": 100}, {"faults_served": 20, "latency_mean_us": 150}) == 200.0
    # With the totals the mean over the interval is exact, however the means round.
    assert top.interval_latency_us(
        {"faults_served": 10**6, "latency_mean_us": 100, "latency_total_us": 10**8},
        {"faults_served": 10**6 + 2, "latency_mean_us": 100, "latency_total_us": 10**8 + 350},
    ) == 175.0
    assert top.interval_latency_us({"faults_served": 10, "latency_mean_us": 100}, {"faults_served": 10, "latency_mean_us": 100}) is None
    # 1 fault more after a million: the means' rounding hides its latency.
    assert top.interval_latency_us({"faults_served": 10**6, "latency_mean_us": 100}, {"faults_served": 10**6 + 1, "latency_mean_us": 100}) is None


def test_a_frame_has_maps_rates_and_locks():
    view = kernel("0x0 4096 r-- precious\n0x2000 4096 rw- dirty\n")
    locks = tuple(top.parse_locks("manager * 0x3000 4096 -w-\nunlock k1 0x3000 4096 -w-\n"))
    snapshot = top.Snapshot("/mnt", 5.0, 1005.0, 1000.0, {"faults_served": 2, "in.memory_object_data_request": 2}, (
        top.ObjectView("hello", 16384, (view,), locks),
        top.ObjectView("quiet", 0, (), ()),
    ))  # fmt: skip
    frame = plain(top.render_frame(snapshot, top.rates(None, snapshot), 100))
    assert map_line(frame, "k1") == "p.Wl"
    assert "no kernel: quiet" in frame
    assert re.search(r"in\.memory_object_data_request +2 +0\.4", frame)
    assert re.search(r"hello +ctl lock +\* +0x3000\+4096 +forbids -w-", frame)
    assert re.search(r"hello +held unlock +k1 +0x3000\+4096 +wants -w-", frame)
    assert "\x1b[" not in frame


# -- against a real mount -----------------------------------------------------------------------


def new_object(mnt: Path, name: str = "hello", size: str = "64K") -> Path:
    sh(f"mkdir {mnt}/objects/{name} && truncate -s {size} {mnt}/objects/{name}/data")
    return mnt / "objects" / name


def test_once_shows_objects_kernels_page_states_and_rates(mounted):
    mnt = mounted.mountpoint
    obj = new_object(mnt)
    new_object(mnt, "idle")
    sh(f"printf 'page zero' | dd of={obj}/data conv=notrunc status=none")
    mounted.command("k1 map hello 64K")
    mounted.command("k1 read hello 1")  # page 0: data, read-only, precious
    mounted.command("k1 write hello+8192 x")  # page 2: a hole written: writable, dirty
    mounted.command("k1 read hello+16384 1")  # page 4: a hole (granted writable) ...
    mounted.command("k1 write hello+24576 x")  # page 6
    sh(f"echo 'clean 16K 12K' > {obj}/ctl")  # ... read-only after a clean, as page 6: not precious
    mounted.command("k2 map hello 64K")
    mounted.command("k2 read hello+49152 1")  # k2's 16 KiB page 3
    assert (obj / "kernels/k1/pages").read_text() == "0x0 4096 r-- precious\n0x2000 4096 rw- dirty\n0x4000 4096 r-- -\n0x6000 4096 r-- -\n"
    stats = top.parse_stats((mnt / "stats").read_text())

    out = run_top(str(mnt), "--once", "--no-color").stdout
    assert "\x1b[" not in out
    assert re.search(r"hello +64 KiB, 2 kernels", out)
    assert map_line(out, "k1") == "p.W.r.r........."
    assert re.search(r"k1 +4 KiB pages, 4 held, 1 writable", out)
    assert map_line(out, "k2") == "...W"
    assert re.search(r"k2 +16 KiB pages, 1 held, 1 writable", out)
    assert "no kernel: idle" in out
    # rates: each message kind the stats count, with its total and its rate since the mount
    seconds = float(re.search(r"since the mount \((\d+\.\d) s\)", out).group(1))
    kinds = [key for key in stats if key.startswith(("in.", "out."))]
    assert {"in.memory_object_data_request", "in.memory_object_data_return", "out.memory_object_data_supply", "out.memory_object_lock_request"} <= set(kinds)
    for key in kinds:
        match = re.search(rf"{re.escape(key)} +(\d+) +(\d+\.\d)\b", out)
        assert match, f"no rate for {key}:\n{out}"
        total, rate = int(match.group(1)), float(match.group(2))
        assert total == stats[key]
        # rate = total / time since the mount, both shown to 0.1 (and the mount's age read later)
        assert abs(rate - total / seconds) <= 0.06 + total * 0.06 / seconds**2, (key, total, rate, seconds)
    assert f"faults served {stats['faults_served']} (" in out
    assert re.search(r"locks ─+╮\n│ none", out)


def test_the_locks_file_and_top_show_ctl_locks_and_held_unlocks(mounted):
    mnt = mounted.mountpoint
    obj = new_object(mnt)
    assert "locks" not in os.listdir(obj)  # only while there are some
    mounted.command("k1 map hello 64K")
    mounted.command("k1 read hello+0xc000 1")
    sh(f"echo 'lock 0xc000 4096 w' > {obj}/ctl")
    mounted.send("k1 write hello+0xc000 y")  # waits: its data_unlock is held
    wait_until(lambda: "unlock" in sh(f"cat {obj}/locks").stdout, what="the held unlock in locks")
    assert sh(f"cat {obj}/locks").stdout == "manager * 0xc000 4096 -w-\nunlock k1 0xc000 4096 -w-\n"
    assert "locks" in os.listdir(obj)
    sh(f"echo x > {obj}/locks", check=False)
    assert sh(f"cat {obj}/locks").stdout.startswith("manager")  # read-only

    out = run_top(str(mnt), "--once", "--no-color").stdout
    assert map_line(out, "k1") == "............L..."
    assert re.search(r"hello +ctl lock +\* +0xc000\+4096 +forbids -w-", out)
    assert re.search(r"hello +held unlock +k1 +0xc000\+4096 +wants -w-", out)

    sh(f"echo 'lock 0xc000 4096 none' > {obj}/ctl")
    assert mounted.answer() == "k1 ok write 0x1c000 1"
    wait_until(lambda: not (obj / "locks").exists(), what="locks to go")
    assert "No such file" in sh(f"cat {obj}/locks", check=False).stderr
    out = run_top(str(mnt), "--once", "--no-color").stdout
    assert map_line(out, "k1") == "............W..."
    assert re.search(r"locks ─+╮\n│ none", out)


@pytest.fixture
def daemon_and_kernel(tmp_path):
    """A mount listening for kernels, and kernel process k3 connected to it; a stopped k3 is
    continued before both are ended."""
    with MountSession(tmp_path / "store", tmp_path / "mnt", []) as session:
        process = KernelProcess(session.listen_address, "k3", workdir=tmp_path)
        try:
            yield session, process
        finally:
            if process.process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
            process.close(timeout=10)


def test_a_lock_request_the_engine_waits_on_shows_with_its_age(daemon_and_kernel):
    session, k3 = daemon_and_kernel
    mnt = session.mountpoint
    obj = new_object(mnt, "shared", "16K")
    k3.command("map shared 16K")
    k3.command("write shared+4096 changed")  # k3 holds page 1 writable
    os.kill(k3.pid, signal.SIGSTOP)  # it will not answer the lock request a sync sends
    syncing = subprocess.Popen(["sh", "-c", f"echo sync > {obj}/ctl"])
    try:
        line = wait_until(lambda: (obj / "locks").exists() and sh(f"cat {obj}/locks", check=False).stdout, what="a lock request in locks")
        assert re.fullmatch(r"request k3 0x0 16384 -w- flush=0 return=dirty waited_ms=\d+\n", line), line
        out = run_top(str(mnt), "--once", "--no-color").stdout
        assert re.search(r"shared +request +k3 +0x0\+16384 +lock -w- return=dirty +\d+ ms", out), out
        assert map_line(out, "k3") == ".r.."  # the lock request took write access away already
        assert syncing.poll() is None  # the sync waits for k3
        os.kill(k3.pid, signal.SIGCONT)
        assert syncing.wait(timeout=30) == 0
    finally:
        if syncing.poll() is None:
            os.kill(k3.pid, signal.SIGCONT)
            syncing.wait(timeout=60)
    wait_until(lambda: not (obj / "locks").exists(), what="locks to go")
    assert sh(f"dd if={obj}/data bs=1 skip=4096 count=7 status=none").stdout == "changed"


# -- the live screen, in a terminal -------------------------------------------------------------


def _in_terminal(args: list[str]) -> tuple[subprocess.Popen, int, int]:
    """`fusepager top ARGS` in a new pseudo-terminal (its controlling terminal, 40x140)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    process = subprocess.Popen(
        [PYTHON, "-m", "fusepager", "top", *args],
        stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, start_new_session=True,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "140", "LINES": "40"},
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # noqa: PLW1509 (one ioctl: no lock taken)
    )  # fmt: skip
    return process, master, slave


def _read_until(master: int, process: subprocess.Popen, seen: bytearray, wanted: bytes | None, timeout: float = 30.0) -> None:
    """Read the terminal into `seen` until `wanted` is in it (or, with None, the process exits)."""
    deadline = time.monotonic() + timeout
    while (wanted is None or wanted not in seen) and time.monotonic() < deadline:
        exited = process.poll() is not None
        ready, _, _ = select.select([master], [], [], 0 if exited else 0.1)
        if ready:
            seen += os.read(master, 65536)
        elif exited:
            break  # and all it wrote has been read
    if wanted is not None:
        assert wanted in seen, f"no {wanted!r} on the screen within {timeout} s:\n{seen.decode(errors='replace')[-3000:]}"


@pytest.mark.parametrize("key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_the_live_screen_refreshes_and_q_or_ctrl_c_quit_and_restore_the_terminal(mounted, key):
    mnt = mounted.mountpoint
    new_object(mnt)
    mounted.command("k1 map hello 64K")
    mounted.command("k1 write hello+4096 x")
    process, master, slave = _in_terminal([str(mnt), "--interval", "0.2"])
    seen = bytearray()
    try:
        _read_until(master, process, seen, b"over the last")  # a second frame: rates over an interval
        assert b"\x1b[?1049h" in seen  # the alternate screen
        assert b"hello" in seen and b"k1" in seen
        assert not termios.tcgetattr(slave)[3] & termios.ICANON  # keys come one by one
        os.write(master, key)
        process.wait(timeout=30)
        _read_until(master, process, seen, None)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        attributes = termios.tcgetattr(slave)
        os.close(master)
        os.close(slave)
    assert process.returncode == 0, seen.decode(errors="replace")[-2000:]
    assert b"\x1b[?1049l" in seen[seen.rfind(b"\x1b[?1049h") :]  # the screen given back
    assert attributes[3] & termios.ICANON and attributes[3] & termios.ECHO  # and the terminal's modes
    assert b"Traceback" not in seen


def test_once_in_a_terminal_has_colours_unless_no_color(mounted):
    mnt = mounted.mountpoint
    new_object(mnt)
    mounted.command("k1 map hello 64K")
    mounted.command("k1 write hello+8192 x")
    screens = {}
    for args in ([], ["--no-color"]):
        process, master, slave = _in_terminal([str(mnt), "--once", *args])
        seen = bytearray()
        try:
            _read_until(master, process, seen, None, timeout=60)  # reading as it writes
            process.wait(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            os.close(master)
            os.close(slave)
        assert process.returncode == 0, seen.decode(errors="replace")
        screens[bool(args)] = seen.decode(errors="replace")
    assert "\x1b[1;31mW" in screens[False]  # the writable page, in bold red
    assert "\x1b[" not in screens[True] and "0x00000000 ..W....." in screens[True]


# -- errors -------------------------------------------------------------------------------------


def test_a_path_that_is_not_a_fusepager_mount_is_refused(tmp_path):
    result = run_top(str(tmp_path), "--once", check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert f"fusepager top: {tmp_path} is not a mount point" in result.stderr
    result = run_top(str(tmp_path / "nowhere"), "--once", check=False)
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = run_top("/proc", "--once", check=False)
    assert result.returncode == 1 and "/proc is not a fusepager mount (proc is mounted there)" in result.stderr
    result = run_top(str(tmp_path), "--interval", "0", check=False)
    assert result.returncode == 2 and "--interval" in result.stderr


def test_into_a_pipe_it_prints_a_frame_each_interval_until_the_mount_goes(mounted):
    mnt = mounted.mountpoint
    new_object(mnt)
    process = subprocess.Popen(
        [PYTHON, "-m", "fusepager", "top", str(mnt), "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "80"},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        frames, titles = 0, []
        while frames < 3:  # the first frame has rates since the mount, the second over an interval
            line = process.stdout.readline()
            assert line, f"top ended early: {process.wait(timeout=10)} {process.stderr.read() if process.stderr else ''}"
            frames += line.startswith("fusepager top")
            titles += re.findall(r"messages per second, (since the mount|over the last)", line)
        assert titles[:2] == ["since the mount", "over the last"]
        sh(f"fusermount3 -u {mnt}")
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1
    assert err == f"fusepager top: {mnt} is no longer mounted\n"
    assert "\x1b[" not in out


def test_a_stale_mount_is_refused_with_the_way_out(tmp_path):
    session = MountSession(tmp_path / "store", tmp_path / "mnt", [])
    try:
        os.kill(session.pid, signal.SIGKILL)
        session.process.wait()
        result = run_top(str(session.mountpoint), "--once", check=False)
        assert result.returncode == 1
        assert "is a stale mount" in result.stderr and f"fusepager umount {session.mountpoint}" in result.stderr
    finally:
        session.close()

"""`fusepager import` and `fusepager sync` (issue [8/8], point 4): long work through a real mount,
run as a user runs them (a subprocess), with a progress bar on a terminal and a one-line summary
otherwise.  What they did is checked where it lands: the mount, the store's sparse file, and a
kernel task reading the object."""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import random
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from fusepager.session import MountSession
from kernelsim.console import pattern_bytes
from mounting import sh, trace_lines, wait_until

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
COMMAND = [str(PYTHON if PYTHON.exists() else Path(sys.executable)), "-m", "fusepager"]
BAR = "━"  # what rich draws its bars with

# 40 MiB: random and zero regions, some not on 1 MiB chunk boundaries, and a chunk of zeros with
# one byte set (it must be written).  The import's 1 MiB chunks that are all zeros: 3-10 MiB,
# 11-16 MiB and 25-37 MiB, 24 MiB in all.
LAYOUT = [("random", 3 * MiB), ("zero", 7 * MiB), ("random", MiB // 2), ("zero", 11 * MiB // 2), ("byte", MiB),
          ("random", 8 * MiB), ("zero", 12 * MiB), ("random", 3 * MiB)]  # fmt: skip
HOLES = 24 * MiB


def make_source(path: Path) -> bytes:
    rng = random.Random(8)
    parts = []
    for kind, size in LAYOUT:
        if kind == "random":
            parts.append(rng.randbytes(size))
        elif kind == "zero":
            parts.append(bytes(size))
        else:
            part = bytearray(size)
            part[12345] = 0x5A
            parts.append(bytes(part))
    data = b"".join(parts)
    assert len(data) == 40 * MiB
    path.write_bytes(data)
    return data


def fusepager(*argv: str, progress: str | None = None, stdin=None, input: bytes | None = None, timeout: float = 300):
    """The real command, as a subprocess; stdout and stderr as text."""
    env = dict(os.environ)
    env.pop("FUSEPAGER_PROGRESS", None)
    if progress is not None:
        env["FUSEPAGER_PROGRESS"] = progress
    result = subprocess.run(
        [*COMMAND, *argv], cwd=ROOT, env=env, stdin=stdin, input=input, capture_output=True, timeout=timeout
    )
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode(errors="replace"))


def on_a_terminal(*argv: str, timeout: float = 300) -> tuple[int, str, str]:
    """Run the command with stderr on a pseudo-terminal (100 columns), stdout on a pipe; the exit
    status, stdout and what the terminal showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    env = dict(os.environ, TERM="xterm", COLUMNS="100")
    env.pop("FUSEPAGER_PROGRESS", None)
    shown = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child's side closed
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        process = subprocess.Popen([*COMMAND, *argv], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        slave = -1
        stdout, _ = process.communicate(timeout=timeout)
        reader.join(timeout=30)
        assert not reader.is_alive(), "the terminal was never closed"
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return process.returncode, stdout.decode(), shown.decode(errors="replace")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_data(session: MountSession, name: str) -> Path:
    return session.store / "objects" / name / "data"


@pytest.fixture
def session(tmp_path):
    """A real mount with kernel k1 in the daemon: 4 KiB pages, 48 MiB of memory (a 40 MiB object
    fits), data requests of up to 16 pages."""
    with MountSession(tmp_path / "store", tmp_path / "mnt", ["k1:4096:12288:16"]) as mount:
        yield mount


@pytest.fixture
def small_store(tmp_path):
    """A store on a 1 MiB tmpfs, to fill."""
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(store)], check=True)
    try:
        yield store
    finally:
        subprocess.run(["umount", "-l", str(store)], capture_output=True)


def test_import_copies_a_large_file_exactly_and_keeps_the_zeros_as_holes(session, tmp_path):
    source = tmp_path / "big.bin"
    data = make_source(source)
    obj = session.mountpoint / "objects" / "big"

    result = fusepager("import", str(source), str(obj), "--create")
    assert result.returncode == 0, result.stderr
    # Not a terminal: no bar, and one line of summary.
    assert result.stderr == ""
    assert re.fullmatch(
        rf"imported {re.escape(str(source))} into {re.escape(str(obj))}: 40\.0 MiB \(41943040 bytes\) in [\d.]+ s, "
        r"\S+ \S+/s; 24\.0 MiB of zeros left as holes; synced\n",
        result.stdout,
    ), result.stdout

    # Byte for byte through the mount and in the store, and the store's file is sparse where the
    # zero chunks were: only the 16 MiB written take blocks.
    assert sha256((obj / "data").read_bytes()) == sha256(data)
    backing = store_data(session, "big")
    assert sha256(backing.read_bytes()) == sha256(data)
    allocated = os.stat(backing).st_blocks * 512
    assert allocated < len(data) - HOLES + MiB, f"{allocated} bytes allocated: the zero chunks were written"
    # It was synced (the ctl command is in the trace), so the bytes are durable.
    assert any(line.endswith("mount ctl big: sync") for line in trace_lines(session.mountpoint))

    # A kernel task mapping the object reads the same bytes.
    session.command("k1 map big 40M")
    answer = session.command("k1 sha256 big 40M", timeout=120)
    assert answer.split()[-1] == sha256(data)


def test_import_shows_a_progress_bar_on_a_terminal(session, tmp_path):
    source = tmp_path / "some.bin"
    source.write_bytes(random.Random(1).randbytes(6 * MiB) + bytes(2 * MiB))
    obj = session.mountpoint / "objects" / "shown"

    status, stdout, terminal = on_a_terminal("import", str(source), str(obj), "--create")
    assert status == 0, terminal
    assert "import shown" in terminal and BAR in terminal, terminal
    assert "8.0/8.0 MiB" in terminal, terminal  # the bar ends full, counting bytes
    assert stdout.startswith("imported ") and "8.0 MiB (8388608 bytes)" in stdout
    assert (obj / "data").read_bytes() == source.read_bytes()

    # FUSEPAGER_PROGRESS=1 shows it without a terminal too; --quiet shows nothing at all.
    forced = fusepager("import", str(source), str(obj), progress="1")
    assert forced.returncode == 0, forced.stderr
    assert BAR in forced.stderr and "8.0/8.0 MiB" in forced.stderr
    quiet = fusepager("import", "--quiet", str(source), str(obj), progress="1")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")


def test_import_from_stdin_of_unknown_size_replaces_an_existing_object(session, tmp_path):
    obj = session.mountpoint / "objects" / "piped"
    sh(f"mkdir {obj} && head -c 5M /dev/urandom > {obj}/data")
    data = random.Random(2).randbytes(2 * MiB + 4321) + bytes(3 * MiB // 2)  # ends with zeros
    # Through a pipe (no size known: the bar counts bytes without a total), into the object
    # that exists (no --create needed): its old bytes go.
    result = fusepager("import", "-", str(obj), progress="1", input=data)
    assert result.returncode == 0, result.stderr
    assert BAR in result.stderr
    assert f"({len(data)} bytes)" in result.stdout and "of zeros left as holes" in result.stdout
    assert (obj / "data").read_bytes() == data
    assert store_data(session, "piped").read_bytes() == data


def test_ctrl_c_stops_an_import_and_says_how_far_it_got(session, tmp_path):
    obj = session.mountpoint / "objects" / "stopped"
    env = dict(os.environ)
    env.pop("FUSEPAGER_PROGRESS", None)
    process = subprocess.Popen(
        [*COMMAND, "import", "-", str(obj), "--create"], cwd=ROOT, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdin is not None
        sent = random.Random(3).randbytes(3 * MiB)
        process.stdin.write(sent)
        process.stdin.flush()
        # Three chunks written; the command now waits for more input.
        wait_until(lambda: store_data(session, "stopped").exists() and store_data(session, "stopped").stat().st_size == 3 * MiB,
                   timeout=60, what="3 MiB imported")  # fmt: skip
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert stdout == b""
    assert b"fusepager import: interrupted after copying 3.0 MiB (3145728 bytes) from stdin" in stderr, stderr
    assert b"Traceback" not in stderr
    assert (obj / "data").read_bytes() == sent  # what it said it copied is there


def test_sync_stores_what_a_kernel_wrote_chunk_by_chunk_with_progress(session):
    obj = session.mountpoint / "objects" / "written"
    sh(f"mkdir {obj} && truncate -s 24M {obj}/data")
    session.command("k1 map written 24M")
    session.command("k1 pattern written 8M 7", timeout=120)  # 2048 dirty pages in the kernel
    backing = store_data(session, "written")
    assert backing.read_bytes()[: 8 * MiB] == bytes(8 * MiB)  # not stored yet
    expected = pattern_bytes(7, 0, 8 * MiB)

    # A range first: only it is cleaned (and the file fsynced).
    ranged = fusepager("sync", str(obj), "0", "2M", "--chunk", "1M")
    assert ranged.returncode == 0, ranged.stderr
    assert "2.0 MiB cleaned (0x0 to 0x200000)" in ranged.stdout and "stored and fsynced" in ranged.stdout
    stored = backing.read_bytes()
    assert stored[: 2 * MiB] == expected[: 2 * MiB]
    assert stored[2 * MiB : 8 * MiB] == bytes(6 * MiB)
    pages = (obj / "kernels" / "k1" / "pages").read_text()
    assert pages.startswith("0x0 2097152 r-- ") and "rw- dirty" in pages, pages

    # Then all of it, with the bar: one clean command per 1 MiB of the 24 MiB, then sync.
    before = len(trace_lines(session.mountpoint))
    result = fusepager("sync", str(obj), "--chunk", "1M", progress="1")
    assert result.returncode == 0, result.stderr
    assert BAR in result.stderr and "24.0/24.0 MiB" in result.stderr, result.stderr
    assert re.fullmatch(
        rf"synced {re.escape(str(obj))}: 24\.0 MiB cleaned \(0x0 to 0x1800000\) in [\d.]+ s, \S+ \S+/s, 1\.0 MiB at a time; "
        r"stored and synced\n",
        result.stdout,
    ), result.stdout
    commands = [line.split("mount ctl written: ")[1] for line in trace_lines(session.mountpoint)[before:] if "mount ctl written: " in line]
    assert commands == [f"clean {offset:#x} {MiB}" for offset in range(0, 24 * MiB, MiB)] + ["sync"]
    assert backing.read_bytes()[: 8 * MiB] == expected  # in the store's file itself
    assert "dirty" not in (obj / "kernels" / "k1" / "pages").read_text()


def test_errors_say_what_is_wrong_and_exit_1(session, tmp_path):
    mnt = session.mountpoint
    source = tmp_path / "small.bin"
    source.write_bytes(b"x" * 1000)
    sh(f"mkdir {mnt}/objects/there")
    cases = [
        (("import", str(tmp_path / "missing.bin"), f"{mnt}/objects/there"), f"fusepager import: cannot read {tmp_path}/missing.bin: No such file or directory"),
        (("import", str(tmp_path), f"{mnt}/objects/there"), "Is a directory"),
        (("import", str(source), str(tmp_path)), f"fusepager import: {tmp_path} is not a fusepager object directory"),
        (("import", str(source), f"{mnt}/objects/there/data"), f"(the object's directory, {mnt}/objects/there, not its data file)"),
        (("import", str(source), f"{mnt}/objects/absent"), f"{mnt}/objects/absent: no such object in {mnt} (add --create to create it)"),
        (("import", str(source), f"{tmp_path}/objects/x", "--create"), "is not a fusepager mount"),
        (("sync", str(tmp_path)), f"fusepager sync: {tmp_path} is not a fusepager object directory"),
        (("sync", f"{mnt}/objects/absent"), "no such object"),
        (("sync", f"{mnt}/objects/there", "0"), "give both OFF and LEN, or neither"),
        (("sync", f"{mnt}/objects/there", "0", "lots"), "length 'lots' is not a number"),
    ]
    (tmp_path / "objects" / "x").mkdir(parents=True)
    for argv, message in cases:
        result = fusepager(*argv)
        assert result.returncode == 1, (argv, result.stdout, result.stderr)
        assert message in result.stderr, (argv, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (mnt / "objects" / "absent").exists()  # no --create: nothing was made


def test_a_full_store_fails_import_and_sync_with_enospc(small_store, tmp_path):
    with MountSession(small_store, tmp_path / "mnt", ["k1:4096:256"], allow_errors=True) as full:
        mnt = full.mountpoint
        # Pages a kernel changed, not stored yet (made before the store fills: a mkdir on a full
        # store is another matter).
        sh(f"mkdir {mnt}/objects/kept && truncate -s 512K {mnt}/objects/kept/data")
        full.command("k1 map kept 512K")
        full.command("k1 fill kept 262144 7")

        # An import that does not fit.
        source = tmp_path / "too-big.bin"
        source.write_bytes(random.Random(4).randbytes(2 * MiB))
        result = fusepager("import", str(source), f"{mnt}/objects/big", "--create")
        assert result.returncode == 1, result.stdout
        assert f"fusepager import: writing {mnt}/objects/big/data at offset " in result.stderr, result.stderr
        assert "No space left on device (the store's disk is full)" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr

        # The kernel's pages cannot be stored now: the sync says so, with the mount's reason.
        result = fusepager("sync", f"{mnt}/objects/kept")
        assert result.returncode == 1, result.stdout
        assert "fusepager sync: " in result.stderr and "No space left on device" in result.stderr, result.stderr
        assert "(the mount says: " in result.stderr and "cannot be stored" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr

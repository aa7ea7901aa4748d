"""The manager and each kernel in its own process (issue [5/8]).

A real mount (`fusepager mount`, listening on its Unix socket) and kernels started with
`kernelsim run --connect ...`, all real processes driven through pipes; results are checked
through the mount with ordinary file tools.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusepager.session import KernelProcess, MountSession, SessionError
from mounting import GENEROUS

PAGE = 4096


def _make_object(mnt: Path, name: str, size: int) -> Path:
    subprocess.run(["mkdir", str(mnt / "objects" / name)], check=True)
    subprocess.run(["truncate", "-s", str(size), str(mnt / "objects" / name / "data")], check=True)
    return mnt / "objects" / name


def _read_file(path: Path, offset: int, length: int) -> bytes:
    """Bytes of a file in the mount, read by dd in another process."""
    result = subprocess.run(
        ["dd", f"if={path}", "bs=1", f"skip={offset}", f"count={length}", "status=none"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return result.stdout


def _kernels_of(obj: Path) -> list[str]:
    return sorted(os.listdir(obj / "kernels"))


def _wait_until(predicate, timeout: float, what: str) -> float:
    """Poll until `predicate()` holds; how long it took.  Fails after `timeout` seconds."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
def manager(tmp_path):
    """A mount with no kernels of its own, listening for kernel processes."""
    with MountSession(tmp_path / "store", tmp_path / "mnt", []) as session:
        yield session


def test_two_kernel_processes_share_an_object_through_the_manager(manager, kernels):
    obj = _make_object(manager.mountpoint, "shared", 64 * 1024)
    k1 = kernels(manager.listen_address, "k1", page_size=4096)
    k2 = kernels(manager.listen_address, "k2", page_size=16384)

    assert k1.command("map shared 64K").startswith("ok map shared")
    assert k2.command("map shared 64K").startswith("ok map shared")
    assert k1.command("read shared 4").endswith(" 00000000")  # a fault: the kernels are known now
    assert k2.command("read shared 4").endswith(" 00000000")
    assert _kernels_of(obj) == ["k1", "k2"]

    k1.command("write shared+100 written by k1")
    assert k2.command("read shared+100 13 text").endswith("'written by k1'")
    k2.command("write shared+40000 and by k2")
    assert k1.command("read shared+40000 9 text").endswith("'and by k2'")

    # What the tasks wrote is the object's: the mount shows it (the kernels give it back).
    assert _read_file(obj / "data", 100, 13) == b"written by k1"
    assert _read_file(obj / "data", 40000, 9) == b"and by k2"

    # A kernel that ends in order gives its pages back and leaves.
    k1.command("write shared+8000 last words")
    k1.close()
    assert k1.process.returncode == 0, k1.child_stderr()
    assert _kernels_of(obj) == ["k2"]
    assert _read_file(obj / "data", 8000, 10) == b"last words"
    assert k2.command("read shared+8000 10 text").endswith("'last words'")


def test_a_killed_kernel_process_is_forgotten_and_the_other_keeps_working(manager, kernels):
    obj = _make_object(manager.mountpoint, "shared", 64 * 1024)
    k1 = kernels(manager.listen_address, "k1")
    k2 = kernels(manager.listen_address, "k2")
    k1.command("map shared 64K")
    k2.command("map shared 64K")
    k2.command("write shared+4096 from k2")
    # k1 takes page 1 for writing: the manager takes it back from k2 first.
    k1.command("write shared+4100 K1")
    assert k2.command("read shared+4096 7 text").endswith("'fromK12'")
    k1.command("write shared+4100 k1 again")  # k1 is the page's writer when it dies
    assert _kernels_of(obj) == ["k1", "k2"]

    k1.kill()
    _wait_until(lambda: _kernels_of(obj) == ["k2"], GENEROUS, "k1's kernels/ directory gone")

    # k2 can take the page k1 held for writing (nothing waits for the dead kernel), and the
    # mount can read it.  k1's last write died with it; what k2 had synced before is there.
    k2.command("write shared+4096 k2 owns it")
    assert k2.command("read shared+4096 10 text").endswith("'k2 owns it'")
    assert _read_file(obj / "data", 4096, 10) == b"k2 owns it"


def test_a_read_waiting_on_a_kernel_completes_when_that_kernel_is_killed(manager, kernels):
    obj = _make_object(manager.mountpoint, "shared", 16 * 1024)
    k1 = kernels(manager.listen_address, "k1")
    k1.command("map shared 16K")
    k1.command("write shared+0 returned")
    subprocess.run(["sh", "-c", f"echo sync > {obj}/ctl"], check=True, timeout=60)
    k1.command("write shared+0 RETURNED")  # k1 holds page 0 dirty and writable
    os.kill(k1.pid, signal.SIGSTOP)  # it will not answer the lock request a read of data sends
    try:
        asked = _lock_requests_to_k1(manager)
        reader = subprocess.Popen(["dd", f"if={obj / 'data'}", "bs=8", "count=1", "status=none"], stdout=subprocess.PIPE)
        try:
            # The read waits for k1 to return page 0 (a lock request is out to it) ...
            _wait_until(lambda: _lock_requests_to_k1(manager) > asked, GENEROUS, "a lock request to k1")
            assert reader.poll() is None
            # ... and completes when k1 dies.
            k1.kill()
            out, _ = reader.communicate(timeout=10)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
    finally:
        if k1.process.poll() is None:
            os.kill(k1.pid, signal.SIGCONT)
    assert reader.returncode == 0
    # The read went on without the dead kernel: what the store had (k1's last write died with it).
    assert out == b"returned"
    _wait_until(lambda: _kernels_of(obj) == [], GENEROUS, "k1's kernels/ directory gone")


def _lock_requests_to_k1(session: MountSession) -> int:
    trace = (session.mountpoint / "trace").read_text(errors="replace")
    return sum(1 for line in trace.splitlines() if "-> k1 memory_object_lock_request" in line)


def test_a_killed_manager_fails_faults_at_once_and_gets_the_kernels_pages_back(tmp_path, kernels):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    first = MountSession(store, mnt, [], allow_errors=True)
    try:
        obj = _make_object(mnt, "shared", 64 * 1024)
        address = first.listen_address
        k1 = kernels(address, "k1", retries=100)
        k1.command("map shared 64K")
        k1.command("write shared+0 synced before the crash")
        # `sync` through ctl returns once the kernel's changes are in the store: acknowledged.
        subprocess.run(["sh", "-c", f"echo sync > {obj}/ctl"], check=True, timeout=60)
        k1.command("write shared+20000 only in k1")  # dirty in the kernel, never returned

        before_crash = len(k1.info)
        os.kill(first.pid, 9)
        first.process.wait()
        k1.wait_for_info("lost the manager", since=before_crash)
        # The fault fails (the manager's death, not a wait for an answer that cannot come).
        answer = k1.answer_to("read shared+40000 4", timeout=GENEROUS)
        assert answer.startswith("error KERN_MEMORY_ERROR") and "memory manager died" in answer, answer
        # The object is dead for the kernel's tasks now; its changed pages are kept aside.
        assert "memory manager died" in k1.answer_to("read shared+20000 4")
    finally:
        first.close()

    with MountSession(store, mnt, []) as second:
        assert second.listen_address == address
        k1.wait_for_info("connected to manager", timeout=GENEROUS, since=before_crash)
        # Acknowledged by sync before the crash: on disk.
        assert _read_file(obj / "data", 0, 23) == b"synced before the crash"
        # The kernel's dirty page comes back to the manager that came back, by itself.
        k1.wait_for_info("returned 1 changed pages of shared", timeout=GENEROUS, since=before_crash)
        _wait_until(lambda: _read_file(obj / "data", 20000, 10) == b"only in k1", GENEROUS, "k1's kept page in the store")
        # Mapping the object again works, and shows it.
        k1.command("unmap shared")
        answer = k1.command("map shared 64K")
        assert "returned=" not in answer, answer  # nothing left to return
        assert k1.command("read shared+20000 10 text").endswith("'only in k1'")
        k1.close()
        assert k1.process.returncode == 0, k1.child_stderr()


def test_a_kernel_process_without_a_manager_says_so_and_exits(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kernelsim", "run", "--connect", f"unix:{tmp_path}/nobody.sock", "--name", "k1", "--retries", "2"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1
    assert "attempt 2/2" in result.stdout and "gave up reaching the manager" in result.stdout
    assert f"kernelsim run: cannot reach the manager at unix:{tmp_path}/nobody.sock" in result.stderr
    assert "Traceback" not in result.stderr


def _free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_kernel_processes_connect_over_tcp_too(tmp_path, kernels):
    port = _free_tcp_port()
    with MountSession(tmp_path / "store", tmp_path / "mnt", [], extra_args=["--listen", f"tcp:127.0.0.1:{port}"]) as session:
        assert session.listen_address == f"tcp:127.0.0.1:{port}"
        obj = _make_object(session.mountpoint, "shared", 16 * 1024)
        k1 = kernels(session.listen_address, "k1")
        k1.command("map shared 16K")
        k1.command("write shared+5 over tcp")
        assert _read_file(obj / "data", 5, 8) == b"over tcp"
        k1.close()
        assert k1.process.returncode == 0, k1.child_stderr()


def test_a_second_daemon_does_not_take_a_live_daemons_socket(manager, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "store2").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "fusepager", "mount", str(tmp_path / "store2"), str(other), "--listen", manager.listen_address],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "another manager is listening there" in result.stdout + result.stderr
    assert not os.path.ismount(other)
    # The first daemon still takes kernels on it.
    assert os.path.exists(_unix_path(manager.listen_address))


def _unix_path(address: str) -> str:
    return address.removeprefix("unix:")


@pytest.mark.parametrize("strategy", ["none", "call", "delay"])
def test_copies_across_processes_keep_the_old_bytes(manager, kernels, tmp_path, strategy):
    """Rights that move (memory_object_copy's new object, its init) cross the socket too: a
    child forked in one kernel process keeps the bytes as of the fork while another kernel
    process and the mount change the original."""
    obj = _make_object(manager.mountpoint, "obj", 64 * 1024)
    subprocess.run(["setfattr", "-n", "user.mach.copy_strategy", "-v", strategy, str(obj)], check=True)
    k1 = kernels(manager.listen_address, "k1", page_size=4096)
    k2 = kernels(manager.listen_address, "k2", page_size=16384)
    k1.command("map obj 64K")
    k1.command("fill obj 65536 97")  # 'a' everywhere, dirty in k1
    k1.command("fork child")
    k2.command("map obj 64K")
    k2.command("write obj+100 k2 changed it")
    (tmp_path / "change").write_bytes(b"dd changed it")
    subprocess.run(["dd", f"if={tmp_path / 'change'}", f"of={obj / 'data'}", "bs=1", "seek=40000", "conv=notrunc", "status=none"], check=True)

    k1.command("task child")
    child = bytes.fromhex(k1.command("read obj 65536").split()[-1])
    k1.command("task t1")
    assert child == b"a" * 65536
    parent = k1.command("read obj+100 13 text") + k1.command("read obj+40000 13 text")
    assert "'k2 changed it'" in parent and "'dd changed it'" in parent
    if strategy == "call":
        (snapshot,) = os.listdir(obj / "snapshots")
        (tmp_path / "child-view").write_bytes(child)
        subprocess.run(["cmp", str(obj / "snapshots" / snapshot), str(tmp_path / "child-view")], check=True)


def test_a_kernel_process_that_died_is_a_session_error_naming_the_signal(tmp_path):
    """Whoever drives a kernel process hears how it ended, whether its output ends first (the
    answer it waits for) or its input breaks (the next command)."""
    with MountSession(tmp_path / "store", tmp_path / "mnt", []) as session:
        with KernelProcess(session.listen_address, "k1", workdir=tmp_path) as kernel:
            os.kill(kernel.pid, signal.SIGKILL)  # behind the session's back: not yet reaped
            with pytest.raises(SessionError, match="kernel process k1 exited \\(killed by signal 9\\)"):
                kernel.answer(timeout=10)
            with pytest.raises(SessionError, match="killed by signal 9"):
                kernel.answer_to("stat")


def test_a_kernel_process_that_ends_its_input_hangs_up_cleanly(tmp_path):
    """The daemon reads the end of the stream, never a reset: a clean exit does not look like a
    crash in `trace`.  (Closing with the daemon's last frames unread used to reset it.)"""
    with MountSession(tmp_path / "store", tmp_path / "mnt", []) as session:
        obj = session.mountpoint / "objects" / "o"
        subprocess.run(["sh", "-c", f"mkdir {obj} && printf hello > {obj}/data && truncate -s 64K {obj}/data"], check=True)
        for round in range(4):
            kernel = KernelProcess(session.listen_address, f"k{round}", workdir=tmp_path)
            try:
                kernel.command("map o 64K")
                assert kernel.command("read o 5 text").endswith("'hello'")
                kernel.command("write o+8192 changed")
            finally:
                kernel.close()
            assert kernel.process.returncode == 0
        trace = (session.mountpoint / "trace").read_text()
        closes = [line for line in trace.splitlines() if "connection with k" in line]
        assert len(closes) == 4 and all(line.endswith("the peer closed the connection") for line in closes), closes
        assert sh_read(obj / "data", 8192, 7) == b"changed"


def sh_read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(length)

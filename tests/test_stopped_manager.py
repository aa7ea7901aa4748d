"""Issue 14, defect 6: a fault waiting on a stopped daemon is not silent.

Mach waits for its manager as long as it takes, and so does kernelsim by default; but a kernel
process warns (naming the object, the offset and the manager) once a fault has waited
--fault-warning seconds, `stat` lists the waiting faults with how long each has waited, and
with --fault-timeout S a fault fails after S seconds with KERN_MEMORY_ERROR instead.  The
daemon is stopped for real (SIGSTOP), with a real mount and kernel processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from fusepager.session import MountSession, SessionError
from mounting import GENEROUS

STOP = 8.0
"""How long the daemon stays stopped while a fault waits: well past the warning below."""
WARNING = 2.0


@pytest.fixture
def manager(tmp_path):
    """A mount with no kernels of its own, listening for kernel processes, and object `o`."""
    with MountSession(tmp_path / "store", tmp_path / "mnt", []) as session:
        subprocess.run(["sh", "-c", f"mkdir {session.mountpoint}/objects/o && truncate -s 64K {session.mountpoint}/objects/o/data"], check=True)
        yield session


@contextmanager
def stopped(session: MountSession):
    """The daemon stopped (SIGSTOP) for the block; it runs again afterwards, whatever happens."""
    os.kill(session.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(session.pid, signal.SIGCONT)


def _stat(answer: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in answer.split()[2:])


def test_a_fault_on_a_stopped_daemon_waits_with_a_warning_and_stat_shows_it(manager, kernels):
    k1 = kernels(manager.listen_address, "k1", fault_warning=WARNING)
    k1.command("map o 64K")
    assert k1.command("read o 4").endswith(" 00000000")  # initialized and ready: faults ask for data now
    since = len(k1.info)
    with stopped(manager):
        sent = time.monotonic()
        k1.send("read o+8192 4")
        warning = k1.wait_for_info("warning: fault still waiting", since=since, timeout=GENEROUS)
        assert "object o offset 0x2000" in warning and "manager fusepager" in warning and "memory_object_data_request" in warning, warning
        # `stat` answers while the read waits, and shows it waiting.
        stat = k1.answer_to("stat")
        assert stat.startswith("ok stat kernel=k1"), stat
        fields = _stat(stat)
        assert fields["faults_waiting"] == "1" and float(fields["longest_wait"]) >= WARNING, stat
        detail = k1.wait_for_info("# fault object o offset 0x2000", since=since)
        assert "for manager fusepager to answer memory_object_data_request" in detail, detail
        # Mach waits for its manager: no answer (no error either) while the daemon is stopped.
        with pytest.raises(SessionError, match="no answer"):
            k1.answer(timeout=max(0.0, STOP - (time.monotonic() - sent)))
    assert k1.answer(timeout=GENEROUS) == "ok read 0x12000 4 00000000"
    answered = k1.wait_for_info("was answered after", since=since)
    assert "object o offset 0x2000" in answered, answered
    assert _stat(k1.command("stat"))["faults_waiting"] == "0"


def test_fault_timeout_fails_faults_on_a_stopped_daemon_with_kern_memory_error(manager, kernels):
    """Each way a fault waits for its manager (memory_object_ready after init, a data request,
    a data unlock) ends in a clear error naming the offset and the reason; the kernel goes on,
    and once the daemon runs again the same accesses work."""
    subprocess.run(["sh", "-c", f"printf 'abcd' | dd of={manager.mountpoint}/objects/o/data conv=notrunc status=none"], check=True)
    k1 = kernels(manager.listen_address, "k1", fault_timeout=2)
    k1.command("map o 64K")
    with stopped(manager):
        # The object's first fault: memory_object_init, and no memory_object_ready comes.
        first = k1.answer_to("read o+4096 4", timeout=GENEROUS)
    assert first.startswith("error KERN_MEMORY_ERROR: no answer from manager fusepager to memory_object_init within 2 s"), first
    assert "object offset 0x1000" in first, first
    assert k1.command("read o 4 text", timeout=GENEROUS).endswith("'abcd'")  # ready now: it came meanwhile
    with stopped(manager):
        request = k1.answer_to("read o+8192 4", timeout=GENEROUS)
        # A page it may only read: writing it asks the manager to unlock it.
        unlock = k1.answer_to("write o+2 xy", timeout=GENEROUS)
    assert request.startswith("error KERN_MEMORY_ERROR: no answer from manager fusepager to memory_object_data_request within 2 s"), request
    assert "object offset 0x2000" in request and "reason KERN_MEMORY_ERROR" in request, request
    assert unlock.startswith("error KERN_MEMORY_ERROR: no answer from manager fusepager to memory_object_data_unlock within 2 s"), unlock
    assert "object offset 0x0" in unlock, unlock
    assert _stat(k1.command("stat"))["fault_timeouts"] == "3"
    # The daemon runs again: what was asked for came, and the accesses work.
    assert k1.command("read o+8192 4", timeout=GENEROUS).endswith(" 00000000")
    assert k1.command("write o+2 xy", timeout=GENEROUS).startswith("ok write")
    assert k1.command("read o 4 text").endswith("'abxy'")


@pytest.mark.parametrize("option", ["--fault-timeout", "--fault-warning"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1e400", "9223372036854775808", "two", ""])
def test_fault_wait_options_are_range_checked(tmp_path, option, value):
    result = subprocess.run(
        [sys.executable, "-m", "kernelsim", "run", "--connect", f"unix:{tmp_path}/none.sock", "--name", "k1", option, value],
        capture_output=True, text=True, timeout=GENEROUS, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert f"kernelsim run: {option} {value!r}" in result.stderr and "number of seconds" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_zero_fault_timeout_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kernelsim", "run", "--connect", f"unix:{tmp_path}/none.sock", "--name", "k1", "--fault-timeout", "0"],
        capture_output=True, text=True, timeout=GENEROUS, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2 and "--fault-timeout '0': give a number of seconds above 0" in result.stderr, result.stderr

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=100)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def root() -> Path:
    return ROOT


def pytest_sessionstart(session):
    """A test run that was killed can leave its FUSE mounts behind; clear the stale ones (their
    daemon is gone) so they never break this run.  Live ones belong to a run still going."""
    import subprocess

    from fusepager.mount import mount_state

    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[0] == "fusepager" and "/pytest-of-" in line.split()[1]]
    for point in points:
        point = point.encode().decode("unicode_escape")
        try:
            stale = mount_state(point) == "stale"
        except OSError:
            stale = True  # neither live nor free: clearing it is the safe side
        if stale:
            subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True)


@pytest.fixture
def mounted(tmp_path):
    """A real mount of a new store, with kernels k1 (4 KiB pages) and k2 (16 KiB) in the daemon;
    unmounted and its daemon ended whatever happens."""
    from fusepager.session import MountSession

    with MountSession(tmp_path / "store", tmp_path / "mnt", ["k1:4096:256", "k2:16384:64"]) as session:
        yield session


@pytest.fixture
def process_mapped(tmp_path):
    """A real mount listening for kernel processes, object `h` of 64 KiB, and kernel process k1
    (`kernelsim run --connect`) mapping it, having written `kernel bytes` at +100 and returned
    the page (`sync`); the mount, the daemon and k1 are ended by PID whatever happens.
    Yields (session, k1, the object's directory in the mount)."""
    from mounting import mapped_by_kernel_process

    with mapped_by_kernel_process(tmp_path, "h", ("write h+100 kernel bytes", "sync")) as mapped:
        yield mapped


@pytest.fixture
def kernels(tmp_path):
    """Start kernel processes (`kernelsim run --connect`) with `kernels(address, name, ...)`
    (KernelProcess's options); all of them are ended, by PID, whatever happens."""
    from fusepager.session import KernelProcess

    started: list[KernelProcess] = []

    def start(address: str, name: str, **options) -> KernelProcess:
        process = KernelProcess(address, name, workdir=tmp_path, **options)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.close(timeout=10)

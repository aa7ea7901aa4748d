"""The fusepager command: background and foreground mounts, signals, stale mounts, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from fusepager.mount import mount_state
from fusepager.session import MountSession
from mounting import fails_with, sh, wait_until

FUSEPAGER = str(Path(sys.executable).parent / "fusepager")


def fusepager(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FUSEPAGER, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def places(tmp_path):
    """A store and a mount point; whatever a test leaves mounted or running is cleared."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    store.mkdir()
    mnt.mkdir()
    pids: list[int] = []
    try:
        yield store, mnt, pids
    finally:
        if mount_state(mnt) in ("mounted", "stale"):
            try:
                pids.append(int(os.getxattr(mnt, "user.fusepager.pid")))
            except OSError:
                pass
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def daemon_pid(mnt: Path) -> int:
    return int(os.getxattr(mnt, "user.fusepager.pid"))


def test_help_explains_with_examples():
    result = fusepager("--help")
    assert result.returncode == 0
    for text in ("fusepager mount", "fusepager umount", "fusepager demo", "examples:", "tail -f"):
        assert text in result.stdout
    mount_help = fusepager("mount", "--help").stdout
    for text in ("-f, --foreground", "-d, --debug", "-o OPT", "--kernel", "--console", "STORE/objects/NAME/data"):
        assert text in mount_help


def test_background_mount_status_and_umount(places):
    store, mnt, pids = places
    result = fusepager("mount", str(store), str(mnt))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"fusepager: mounted {store} at {mnt} (pid ")
    pid = daemon_pid(mnt)
    pids.append(pid)
    assert fusepager("status", str(mnt)).stdout.strip() == f"{mnt}: mounted"
    assert sh(f"ls {mnt}").stdout.split() == ["default", "objects", "stats", "trace"]
    sh(f"mkdir {mnt}/objects/a && echo hi > {mnt}/objects/a/data")
    result = fusepager("umount", str(mnt))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"unmounted {mnt}; daemon {pid} finished"
    assert mount_state(mnt) == "free"
    status = fusepager("status", str(mnt))
    assert status.returncode == 1 and status.stdout.strip() == f"{mnt}: free"
    assert (store / "objects/a/data").read_text() == "hi\n"
    assert "fusepager.log" in os.listdir(store)


def test_a_store_given_by_a_relative_path_is_shown_by_its_absolute_one(places):
    store, mnt, pids = places
    result = subprocess.run([FUSEPAGER, "mount", "store", "mnt"], capture_output=True, text=True, timeout=60, cwd=store.parent)
    assert result.returncode == 0, result.stderr
    pids.append(daemon_pid(mnt))
    assert os.getxattr(mnt, "user.fusepager.store").decode() == str(store)
    assert fusepager("umount", str(mnt)).returncode == 0


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_unmounts_cleanly(places, signal_number):
    store, mnt, pids = places
    daemon = subprocess.Popen([FUSEPAGER, "mount", str(store), str(mnt), "-f"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids.append(daemon.pid)
    assert daemon.stdout.readline().startswith("fusepager: mounted")
    sh(f"mkdir {mnt}/objects/x")
    daemon.send_signal(signal_number)
    assert daemon.wait(timeout=30) == 0
    assert mount_state(mnt) == "free"
    assert (store / "objects/x/meta.json").exists()


def test_a_stale_mount_is_explained_and_cleared(places):
    store, mnt, pids = places
    assert fusepager("mount", str(store), str(mnt)).returncode == 0
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: mount_state(mnt) == "stale", what="the mount to go stale")
    result = sh(f"ls {mnt}", check=False)
    assert result.returncode != 0 and ("Transport endpoint is not connected" in result.stderr or "connection abort" in result.stderr)
    again = fusepager("mount", str(store), str(mnt))
    assert again.returncode == 1
    assert "stale" in again.stderr and f"fusepager umount {mnt}" in again.stderr
    assert fusepager("status", str(mnt)).stdout.strip() == f"{mnt}: stale"
    cleared = fusepager("umount", str(mnt))
    assert cleared.returncode == 0 and "stale" in cleared.stdout
    assert mount_state(mnt) == "free"
    # and it mounts again
    assert fusepager("mount", str(store), str(mnt)).returncode == 0
    pids.append(daemon_pid(mnt))


def test_mount_refuses_bad_arguments_clearly(places, tmp_path):
    store, mnt, pids = places
    result = fusepager("mount", str(tmp_path / "nothing"), str(mnt))
    assert result.returncode == 1 and "is not a directory" in result.stderr
    result = fusepager("mount", str(store), str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = fusepager("mount", str(store), str(mnt), "--kernel", "k1")
    assert result.returncode == 2 and "NAME:PAGE_SIZE" in result.stderr
    result = fusepager("mount", str(store), str(mnt), "--kernel", "k1:4096", "--console")
    assert result.returncode == 2 and "add -f" in result.stderr
    result = fusepager("umount", str(mnt))
    assert result.returncode == 1 and "is not mounted" in result.stderr
    assert mount_state(mnt) == "free"


def test_fuse_options_and_debug_reach_fuse(places):
    store, mnt, pids = places
    daemon = subprocess.Popen(
        [FUSEPAGER, "mount", str(store), str(mnt), "-d", "-o", "ro"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pids.append(daemon.pid)
    try:
        assert daemon.stdout.readline().startswith("fusepager: mounted")
        options = next(line for line in open("/proc/mounts") if f" {mnt} " in line).split()[3]
        assert "ro" in options.split(",")
        fails_with(f"mkdir {mnt}/objects/x", "Read-only file system")
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
    assert "unique:" in stderr  # libfuse's debug output


def test_a_restarted_pager_serves_the_same_bytes_and_nothing_a_kernel_wrote_is_lost(tmp_path):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    with MountSession(store, mnt, ["k1:4096"]) as session:
        sh(f"mkdir {mnt}/objects/keep && truncate -s 1M {mnt}/objects/keep/data")
        sh(f"head -c 300000 /dev/urandom | dd of={mnt}/objects/keep/data conv=notrunc status=none")
        session.command("k1 map keep 1M")
        session.command("k1 write keep+500000 written by k1 and never synced")
        before = (store / "objects/keep/data").read_bytes()[:300000]
    # the unmount shut the kernel down: its dirty page came back to the store
    with MountSession(store, mnt, ["k1:4096"]) as session:
        data = (mnt / "objects/keep/data").read_bytes()
        assert len(data) == 1 << 20
        assert data[:300000] == before
        written = b"written by k1 and never synced"
        assert data[500000 : 500000 + len(written)] == written
        session.command("k1 map keep 1M")
        assert session.command("k1 read keep+500000 10 text") == "ok read 0x8a120 10 'written by'"


def test_the_demo_narrates_a_real_mount_and_cleans_up(tmp_path):
    result = fusepager("demo", "--dir", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for text in (
        "k1> map hello 64K",
        "ok read 0x10000 28 'Hello from the shell, page 0'",
        "may_cache=0 copy=delay",
        "k1 -> hello memory_object_init(",
        "hello -> k1 memory_object_data_supply(",
        "hello -> k2 memory_object_data_unavailable(offset=0x4000 size=16384)",
        "k1 -> hello memory_object_data_unlock(",
        "Written by a task in kernel k1",
        "0x0 4096 r-- precious",
        "k2> read hello+64 30 text\n    ok read 0x10040 30 'SHELLen by a task in kernel k1'",
        "Unmounted",
    ):
        assert text in out, text
    assert out.index("memory_object_init(") < out.index("memory_object_data_request(")
    assert mount_state(tmp_path / "mnt") == "free"


def test_the_demo_keep_leaves_it_mounted_and_says_how_to_unmount(tmp_path):
    mnt = tmp_path / "mnt"
    try:
        result = fusepager("demo", "--keep", "--dir", str(tmp_path), timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"Unmount with:  fusepager umount {mnt}" in result.stdout
        assert mount_state(mnt) == "mounted"
        assert (mnt / "objects/hello/kernels/k1/page_size").read_text() == "4096\n"
        # The tools it suggests work on what it left.
        assert f"fusepager top {mnt}    fusepager trace {mnt} --svg trace.svg" in result.stdout
        top = fusepager("top", str(mnt), "--once", "--no-color")
        assert top.returncode == 0 and "k1" in top.stdout and "hello" in top.stdout, top.stdout + top.stderr
        drawn = fusepager("trace", str(mnt), "--svg", str(tmp_path / "trace.svg"))
        assert drawn.returncode == 0, drawn.stderr
        svg = ElementTree.parse(tmp_path / "trace.svg").getroot()
        assert svg.tag == "{http://www.w3.org/2000/svg}svg" and "data_request 0x0+4096 r--" in "".join(svg.itertext())
        assert fusepager("umount", str(mnt)).returncode == 0
    finally:
        if mount_state(mnt) != "free":
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)

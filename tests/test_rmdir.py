"""rmdir of an object kernels use (issue 14, defect 5).

An object a kernel has initialised (memory_object_init received, no terminate since) is EBUSY
to rmdir.  A kernel that has mapped an object but not faulted yet has not initialised it (a
kernel introduces itself to the manager at its first fault): rmdir succeeds, and that kernel's
first fault then hears memory_object_destroy, so it fails with "destroyed by its manager",
never "memory manager died" while the manager lives.  Checked with kernels in the daemon and
in processes of their own, through the real mount.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fusepager.session import KernelProcess, MountSession
from mounting import fails_with, sh, wait_until


def _make(mnt: Path, name: str, text: str) -> Path:
    sh(f"mkdir {mnt}/objects/{name} && truncate -s 64K {mnt}/objects/{name}/data")
    sh(f"printf '{text}' | dd of={mnt}/objects/{name}/data conv=notrunc status=none")
    return mnt / "objects" / name


@pytest.fixture(params=["in-process", "process"])
def kernel(request, tmp_path):
    """(mount session, run(command) -> answer, kernel label) for a kernel of each kind."""
    kernels = [] if request.param == "process" else ["k1:4096"]
    with MountSession(tmp_path / "store", tmp_path / "mnt", kernels) as session:
        if request.param == "in-process":
            yield session, lambda command: session.answer_to(f"k1 {command}"), "k1"
        else:
            with KernelProcess(session.listen_address, "kp", workdir=tmp_path) as process:
                yield session, process.answer_to, "kp"


def test_rmdir_is_busy_while_a_kernel_has_initialised_the_object_and_destroyed_before(kernel):
    session, run, label = kernel
    mnt = session.mountpoint

    # Initialised (a fault sent memory_object_init): EBUSY, and the kernel goes on unharmed.
    used = _make(mnt, "used", "in use")
    assert run("map used 64K").startswith("ok map used")
    assert run("read used 6 text").endswith("'in use'")
    assert os.listdir(used / "kernels") == [label]
    fails_with(f"rmdir {used}", "Device or resource busy")
    refusals = [line for line in (mnt / "trace").read_text().splitlines() if "refused (EBUSY)" in line]
    assert refusals and label in refusals[-1] and "used" in refusals[-1], refusals
    assert run("write used+100 still mine").startswith("ok")
    assert run("read used 6 text").endswith("'in use'")
    # Once the kernel has let go (memory_object_terminate), rmdir removes it.
    assert run("unmap used").startswith("ok")
    wait_until(lambda: os.listdir(used / "kernels") == [], timeout=30, what=f"{label} to terminate")
    sh(f"rmdir {used}")
    assert not (session.store / "objects" / "used").exists()

    # Mapped but never faulted: no kernel has initialised it, so it can be removed ...
    early = _make(mnt, "early", "old bytes")
    assert run("map early 64K").startswith("ok map early")
    assert os.listdir(early / "kernels") == []
    sh(f"rmdir {early}")
    # ... and the kernel's first fault hears that the object was destroyed; the daemon lives.
    answer = run("read early 9 text")
    assert answer.startswith("error") and "destroyed by its manager" in answer and "KERN_TERMINATED" in answer, answer
    assert "died" not in answer
    assert "early was removed before" in (mnt / "trace").read_text()
    assert run("read early 9 text").startswith("error")  # the object stays dead for that mapping
    # A new object of the same name is a new object: mapped anew, it serves its own bytes.
    _make(mnt, "early", "new bytes")
    assert run("unmap early").startswith("ok")
    assert run("map early 64K").startswith("ok map early")
    assert run("read early 9 text").endswith("'new bytes'")


def test_rmdir_after_destroy_and_a_cached_object(kernel):
    """may_cache keeps an unmapped object initialised (cached in the kernel): EBUSY until
    `destroy` makes the kernel let go; its mappings then hear destroyed, not died.  (This held
    before issue 14 too; it guards the other half of the rule.)"""
    session, run, label = kernel
    mnt = session.mountpoint
    obj = _make(mnt, "cached", "cached bytes")
    sh(f"setfattr -n user.mach.may_cache -v 1 {obj}")
    assert run("map cached 64K").startswith("ok map cached")
    assert run("read cached 12 text").endswith("'cached bytes'")
    assert run("unmap cached").startswith("ok")
    assert os.listdir(obj / "kernels") == [label]  # cached: still initialised
    fails_with(f"rmdir {obj}", "Device or resource busy")
    assert run("map cached 64K").startswith("ok map cached")
    sh(f"echo destroy > {obj}/ctl")
    wait_until(lambda: os.listdir(obj / "kernels") == [], timeout=30, what=f"{label} to terminate")
    answer = run("read cached 12 text")
    assert answer.startswith("error") and "destroyed by its manager" in answer and "died" not in answer, answer
    sh(f"rmdir {obj}")

"""The model-based stateful test (issue [7/8]): hypothesis drives a real mount with three kernels
(4, 8 and 16 KiB pages, memory limits below the object's size, so they page out), writes from
their tasks, through the mount and through a shared mmap of `data`, forks (copies under all three
strategies), destroy, and a manager restart; after every step every view — each kernel's task,
each child's copy, the mount's `data`, the mmap — is checked against a reference model.

CI runs a bounded profile.  FUSEPAGER_MODEL=long runs at least 100,000 steps (hours: about 80 ms a
step on 2 cores); FUSEPAGER_MODEL_RUNS=N sets how many runs (of 60 steps with `long`) for a
shorter or longer one."""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fusepager.session import MountSession
from mounting import sh

SIZE = 64 * 1024
KERNELS = {"k1": 4096, "k2": 8192, "k3": 16384}
FRAMES = {"k1": 10, "k2": 6, "k3": 3}  # fewer frames than the object has pages: pageouts
STRATEGIES = ["none", "call", "delay"]
MAX_CHILDREN = 3

LONG = os.environ.get("FUSEPAGER_MODEL") == "long"
PROFILE = settings(
    max_examples=int(os.environ.get("FUSEPAGER_MODEL_RUNS") or (2000 if LONG else 6)),
    stateful_step_count=60 if LONG else 25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

offsets = st.integers(min_value=0, max_value=SIZE - 1)
payloads = st.binary(min_size=1, max_size=6000)
kernels = st.sampled_from(sorted(KERNELS))


class MountModel(RuleBasedStateMachine):
    runs = 0  # across the whole test, for the figures printed after each run (pytest -s)
    checks = 0

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="fusepager-model-"))
        self.model = bytearray(SIZE)
        self.children: dict[str, tuple[str, bytearray]] = {}  # name -> (kernel, its copy's bytes)
        self.serial = 0
        self.session: MountSession | None = None
        self.view: mmap.mmap | None = None
        self._start()

    # -- the world -----------------------------------------------------------------------------

    def _start(self) -> None:
        specs = [f"{name}:{page}:{FRAMES[name]}" for name, page in KERNELS.items()]
        self.session = MountSession(self.tmp / "store", self.tmp / "mnt", specs)
        self.data = self.session.mountpoint / "objects" / "obj" / "data"
        if not self.data.exists():
            sh(f"mkdir {self.data.parent} && truncate -s {SIZE} {self.data}")
        for kernel in KERNELS:
            self.session.command(f"{kernel} map obj {SIZE}")
        fd = os.open(self.data, os.O_RDWR)
        try:
            self.view = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)
        finally:
            os.close(fd)

    def _stop(self) -> None:
        if self.view is not None:
            self.view.close()
            self.view = None
        if self.session is not None:
            self.session.close()
            self.session = None

    def teardown(self) -> None:
        try:
            self._stop()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        MountModel.runs += 1
        print(f"model-based: {MountModel.runs} runs, {MountModel.checks} checks of every view passed", flush=True)

    def _in(self, kernel: str, task: str, command: str) -> str:
        self.session.command(f"{kernel} task {task}")
        return self.session.command(f"{kernel} {command}")

    def _read(self, kernel: str, task: str) -> bytes:
        return bytes.fromhex(self._in(kernel, task, f"read obj {SIZE}").split()[-1])

    # -- rules ---------------------------------------------------------------------------------

    @rule(kernel=kernels, offset=offsets, data=payloads)
    def task_writes(self, kernel, offset, data):
        data = data[: SIZE - offset]
        self._in(kernel, "t1", f"writehex obj+{offset} {data.hex()}")
        self.model[offset : offset + len(data)] = data

    @rule(offset=offsets, data=payloads)
    def mount_writes(self, offset, data):
        data = data[: SIZE - offset]
        fd = os.open(self.data, os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, offset) == len(data)
        finally:
            os.close(fd)
        self.model[offset : offset + len(data)] = data

    @rule(offset=offsets, data=payloads)
    def mmap_writes(self, offset, data):
        data = data[: SIZE - offset]
        self.view[offset : offset + len(data)] = data
        self.view.flush()  # msync: Linux writes the pages back through the mount
        self.model[offset : offset + len(data)] = data

    @precondition(lambda self: len(self.children) < MAX_CHILDREN)
    @rule(kernel=kernels, strategy=st.sampled_from(STRATEGIES))
    def fork(self, kernel, strategy):
        sh(f"setfattr -n user.mach.copy_strategy -v {strategy} {self.data.parent}")
        self.serial += 1
        child = f"c{self.serial}"
        self._in(kernel, "t1", f"fork {child}")
        self.children[child] = (kernel, bytearray(self.model))

    @precondition(lambda self: self.children)
    @rule(data=st.data(), offset=offsets, payload=payloads)
    def child_writes(self, data, offset, payload):
        child = data.draw(st.sampled_from(sorted(self.children)))
        kernel, copy = self.children[child]
        payload = payload[: SIZE - offset]
        self._in(kernel, child, f"writehex obj+{offset} {payload.hex()}")
        copy[offset : offset + len(payload)] = payload

    @precondition(lambda self: self.children)
    @rule(data=st.data())
    def child_ends(self, data):
        child = data.draw(st.sampled_from(sorted(self.children)))
        kernel, _ = self.children.pop(child)
        self._in(kernel, child, "unmap obj")

    @rule()
    def destroy(self):
        """`sync`, then `destroy` from the mount: every kernel's mapping fails from then on
        (they are mapped again); the object's bytes are what the sync stored."""
        sh(f"echo sync > {self.data.parent}/ctl")
        sh(f"echo destroy > {self.data.parent}/ctl")
        for kernel in KERNELS:
            self.session.command(f"{kernel} task t1")
            answer = self.session.answer_to(f"{kernel} read obj 1")
            assert "error" in answer and "KERN_MEMORY_ERROR" in answer, answer
        for child, (kernel, _) in list(self.children.items()):
            self._in(kernel, child, "unmap obj")
            del self.children[child]
        for kernel in KERNELS:
            self._in(kernel, "t1", "unmap obj")
            self.session.command(f"{kernel} map obj {SIZE}")

    @rule()
    def restart(self):
        """Unmount and mount again: the kernels return what they changed, then end with the
        daemon (their children with them); new ones map the object."""
        self._stop()
        self.children.clear()
        self._start()

    # -- the check -----------------------------------------------------------------------------

    @invariant()
    def every_view_matches_the_model(self):
        if self.session is None:
            return
        for kernel in KERNELS:
            assert self._read(kernel, "t1") == self.model, f"{kernel}'s task differs from the model"
        for child, (kernel, copy) in self.children.items():
            assert self._read(kernel, child) == copy, f"child {child} in {kernel} differs from its copy"
        assert self.data.read_bytes() == self.model, "the mount's data differs from the model"
        assert self.view[:] == self.model, "the mmap differs from the model"
        MountModel.checks += 1


MountModel.TestCase.settings = PROFILE
test_every_view_of_an_object_matches_a_reference_model = MountModel.TestCase

"""Verified I/O through the mount with fio (issue [7/8]): random writes of 256 MiB checked with
crc32c, with the psync and the mmap engines, while kernels hold and write pages of the same
object.  fio checks every block it wrote; the kernels check their own writes."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading

import pytest

from fusepager.session import MountSession
from mounting import sh

FIO_SIZE = 256 << 20
TAIL = 1 << 20  # after fio's range: the kernels' own bytes, in the same object
PAUSE = 0.02  # between the kernels' rounds


class _Kernels(threading.Thread):
    """k1 (4 KiB pages) and k2 (16 KiB) in the daemon: they read pages of fio's range (so the
    mount must take them back before each fio write lands) and write and check their own
    bytes after it, until told to stop."""

    def __init__(self, session: MountSession, seed: int) -> None:
        super().__init__(daemon=True)
        self.session = session
        self.rng = random.Random(seed)
        self.done = threading.Event()
        self.rounds = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.done.is_set():
                self.rounds += 1
                for kernel in ("k1", "k2"):
                    self.session.command(f"{kernel} read f+{self.rng.randrange(FIO_SIZE)} 8")
                    where = FIO_SIZE + self.rng.randrange(TAIL - 64)
                    text = f"{kernel} round {self.rounds}"
                    self.session.command(f"{kernel} write f+{where} {text}")
                    answer = self.session.command(f"{kernel} read f+{where} {len(text)} text")
                    assert answer.endswith(f"'{text}'"), answer
                # Sharing, not a flood: fio must get most of the daemon.
                self.done.wait(PAUSE)
        except BaseException as error:
            self.failure = error


@pytest.mark.parametrize("engine", ["psync", "mmap"])
def test_fio_verifies_every_block_it_wrote_while_kernels_share_the_object(tmp_path, engine):
    assert shutil.which("fio"), "fio is missing: scripts/setup installs it (Debian package fio)"
    with MountSession(tmp_path / "store", tmp_path / "mnt", ["k1:4096:256", "k2:16384:64"]) as session:
        data = session.mountpoint / "objects" / "f" / "data"
        sh(f"mkdir {data.parent} && truncate -s {FIO_SIZE + TAIL} {data}")
        for kernel in ("k1", "k2"):
            session.command(f"{kernel} map f {FIO_SIZE + TAIL}")
        kernels = _Kernels(session, seed=7)
        kernels.start()
        try:
            result = subprocess.run(
                [
                    "fio", "--name=verified", f"--filename={data}", f"--ioengine={engine}",
                    "--rw=randwrite", "--bs=4k", f"--size={FIO_SIZE}", "--verify=crc32c",
                    "--do_verify=1", "--verify_fatal=1", "--randseed=20261127", "--output-format=json",
                ],
                capture_output=True, text=True, timeout=600, cwd=tmp_path,  # its verify state files go there
            )  # fmt: skip
        finally:
            kernels.done.set()
            kernels.join(timeout=60)
        assert kernels.failure is None, f"a kernel failed while fio ran: {kernels.failure!r}"
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
        assert job["error"] == 0
        # Every byte written was read back and verified.
        assert job["write"]["io_bytes"] == FIO_SIZE and job["read"]["io_bytes"] == FIO_SIZE
        assert kernels.rounds > 0
        print(f"fio {engine}: {FIO_SIZE >> 20} MiB written and verified, 0 errors; {kernels.rounds} kernel rounds meanwhile")

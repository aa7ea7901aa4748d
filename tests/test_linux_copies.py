"""Issue 14, defect 2: Linux's copies of `data` and kernels' writes.

A program with `data` mmapped MAP_SHARED holds copies of its pages in Linux's page cache, outside
the EMM protocol, and writes a dirty page back whole.  A kernel must not be given write access
to bytes Linux may still hold (it first writes back and drops its pages), so a kernel's
acknowledged write is never undone by a page Linux wrote back from before it.  Real mount, real
kernel process, real program (tests/mmap_program.py).
"""

from __future__ import annotations

import subprocess

from fusepager.session import KernelProcess, MountSession
from mmap_program import MmapProgram
from mounting import sh

PAGE = 4096
ROUNDS = 24


def _data_bytes(path, offset: int, length: int) -> bytes:
    """Bytes of `data`, read by dd in a process of its own."""
    return subprocess.run(
        ["dd", f"if={path}", f"bs={length}", f"skip={offset}", "iflag=skip_bytes", "count=1", "status=none"],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip


def _kernel_bytes(kernel: KernelProcess, where: str, length: int) -> bytes:
    return bytes.fromhex(kernel.command(f"read {where} {length}").split()[-1])


def test_a_kernels_acknowledged_write_is_not_undone_by_a_programs_msync_of_the_same_page(tmp_path):
    """The issue's scenario, with no gap between the steps: the program dirties bytes 0-8 of a
    page, a kernel process writes +200 of it and answers ok, the program writes bytes 0-5 again
    and msyncs.  On f7177d2 the program's stale copy of the page overwrote +200 in most rounds."""
    with MountSession(tmp_path / "store", tmp_path / "mnt", []) as session:
        obj = session.mountpoint / "objects" / "shared"
        sh(f"mkdir {obj} && truncate -s 256K {obj}/data")
        with KernelProcess(session.listen_address, "k1", workdir=tmp_path) as k1, MmapProgram(obj / "data") as program:
            k1.command("map shared 256K")
            lost = []
            for round_ in range(ROUNDS):
                page = PAGE * (1 + round_ % 4)  # a few pages, each used again and again
                mine, kernels, again = f"A{round_:02d}aaaaaa".encode(), f"K{round_:02d}".encode(), f"B{round_:02d}bb".encode()
                program.store(page, mine)  # bytes 0-8 dirty in Linux's page, no msync
                assert k1.command(f"write shared+{page + 200} {kernels.decode()}").startswith("ok write")
                program.write(page, again)  # bytes 0-5 again, and msync
                expected_start = again + mine[len(again) :]
                # What the kernel wrote, and was told was done, is still there for everyone.
                seen = {
                    "kernel": _kernel_bytes(k1, f"shared+{page + 200}", 3),
                    "data": _data_bytes(obj / "data", page + 200, 3),
                    "mmap": program.read(page + 200, 3),
                }
                if any(value != kernels for value in seen.values()):
                    lost.append((round_, seen))
                assert program.read(page, len(mine)) == expected_start
                assert _data_bytes(obj / "data", page, len(mine)) == expected_start
            assert not lost, f"the kernel's acknowledged write was undone in {len(lost)} of {ROUNDS} rounds: {lost[:3]}"
            # And the store has every page as the last writer of each byte left it.
            k1.command("sync")
            program.sync()
            sh(f"echo sync > {obj}/ctl")
        for index in range(4):
            last = max(r for r in range(ROUNDS) if r % 4 == index)
            page = PAGE * (1 + index)
            stored = (tmp_path / "store/objects/shared/data").read_bytes()
            assert stored[page + 200 : page + 203] == f"K{last:02d}".encode()
            assert stored[page : page + 9] == f"B{last:02d}bb".encode() + f"A{last:02d}aaaaaa".encode()[5:]

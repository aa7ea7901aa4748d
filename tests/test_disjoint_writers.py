"""Three writers at once on disjoint 16-byte cells of one object, as fast as they can: a program
with `pwrite(2)` on `data`, kernel process k1 (4 KiB pages) and kernel process k2 (16 KiB pages,
so each of its pages covers cells of all three).  No writer touches another's cells, so after a
`sync` every cell must hold the last value its writer was told was written: in the store's file,
through `data` and in both kernels.

Found by attacking issue 14's fixes: a kernel told copy=delay asked for a page while a change
waited for it to flush; the page was served at once (read-only, as before the change), a second
flush crossed that answer and took the page out of the pagemap, so no flush took it back after
the change, and a later unlock let the kernel write over its old copy: its write-back undid the
change (1 to 9 cells of about 2,000 per run).
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from fusepager.session import KernelProcess, MountSession, SessionError
from mounting import sh

SIZE = 64 * 1024
CELL = 16
CELLS = SIZE // CELL
SECONDS = 3.0


@pytest.mark.parametrize("seed", [3, 4])
def test_disjoint_writers_of_three_page_sizes_lose_no_acknowledged_cell(tmp_path, seed):
    acked: dict[int, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[str] = []
    with MountSession(tmp_path / "store", tmp_path / "mnt", []) as session:
        obj = session.mountpoint / "objects" / "o"
        sh(f"mkdir {obj} && truncate -s {SIZE} {obj}/data")
        k1 = KernelProcess(session.listen_address, "k1", page_size=4096, workdir=tmp_path)
        k2 = KernelProcess(session.listen_address, "k2", page_size=16384, workdir=tmp_path)
        try:
            for kernel in (k1, k2):
                kernel.command(f"map o {SIZE}")

            def program(chooser: random.Random) -> None:
                fd = os.open(obj / "data", os.O_RDWR)
                try:
                    number = 0
                    while not stop.is_set():
                        cell = chooser.randrange(CELLS // 3) * 3
                        value = f"P{number:014d}|".encode()
                        os.pwrite(fd, value, cell * CELL)
                        with lock:
                            acked[cell] = value
                        number += 1
                except OSError as error:
                    failures.append(f"pwrite: {error}")
                finally:
                    os.close(fd)

            def kernel_writer(kernel: KernelProcess, residue: int, chooser: random.Random) -> None:
                number = 0
                try:
                    while not stop.is_set():
                        cell = chooser.randrange(CELLS // 3) * 3 + residue
                        value = f"{kernel.name}{number:013d}|".encode()
                        answer = kernel.answer_to(f"write o+{cell * CELL} {value.decode()}")
                        if not answer.startswith("ok"):
                            failures.append(f"{kernel.name}: {answer}")
                            return
                        with lock:
                            acked[cell] = value
                        number += 1
                except SessionError as error:
                    failures.append(f"{kernel.name}: {error}")

            writers = [
                threading.Thread(target=program, args=(random.Random(seed),)),
                threading.Thread(target=kernel_writer, args=(k1, 1, random.Random(seed + 100))),
                threading.Thread(target=kernel_writer, args=(k2, 2, random.Random(seed + 200))),
            ]
            for writer in writers:
                writer.start()
            time.sleep(SECONDS)
            stop.set()
            for writer in writers:
                writer.join(60)
            assert not failures, failures
            assert len(acked) > 300, f"too few writes to mean anything: {len(acked)}"
            sh(f"echo sync > {obj}/ctl")
            views = {"data": (obj / "data").read_bytes(), "store": (session.store / "objects" / "o" / "data").read_bytes()}
            for kernel in (k1, k2):
                text = kernel.command(f"read o {SIZE}").split()[-1]
                views[kernel.name] = bytes.fromhex(text) if len(text) == 2 * SIZE else None
            lost = {
                view: [(cell, value, data[cell * CELL : (cell + 1) * CELL]) for cell, value in sorted(acked.items()) if data is None or data[cell * CELL : (cell + 1) * CELL] != value]
                for view, data in views.items()
            }
            assert not any(lost.values()), {view: cells[:5] for view, cells in lost.items() if cells}
        finally:
            k1.close(timeout=10)
            k2.close(timeout=10)

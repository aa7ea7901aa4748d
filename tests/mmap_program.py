"""A real program with a file mmapped MAP_SHARED, driven line by line (a helper of the tests).

Run as a script (`python mmap_program.py FILE`), it maps FILE shared, read-write, prints
`ready`, then answers one line per command on its stdin:

    store OFFSET HEX     put the bytes in the mapping (dirty pages in Linux, no msync) -> stored
    write OFFSET HEX     the same, then msync of the pages written                     -> written
    sync                 msync of the whole mapping                                    -> synced
    read OFFSET LENGTH   the bytes in the mapping                                      -> HEX

`MmapProgram` starts it as a child process (ended by PID) and drives it; each call returns when
the program has answered, so a `write` has returned from msync when `write()` returns.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from pathlib import Path

ANSWER_TIMEOUT = 60.0


class MmapProgram:
    def __init__(self, path: str | Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        try:
            self._expect("ready")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> MmapProgram:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _ask(self, line: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self._answer()

    def _answer(self) -> str:
        assert self.process.stdout is not None
        answer = self.process.stdout.readline()
        if not answer:
            raise AssertionError(f"the mmap program ended (status {self.process.wait(timeout=ANSWER_TIMEOUT)})")
        return answer.rstrip("\n")

    def _expect(self, wanted: str) -> None:
        answer = self._answer()
        assert answer == wanted, f"the mmap program answered {answer!r}, not {wanted!r}"

    def store(self, offset: int, data: bytes) -> None:
        """Dirty the mapping's pages (Linux holds the change; no msync)."""
        answer = self._ask(f"store {offset} {data.hex()}")
        assert answer == "stored", answer

    def write(self, offset: int, data: bytes) -> None:
        """Store and msync: returns once msync has returned."""
        answer = self._ask(f"write {offset} {data.hex()}")
        assert answer == "written", answer

    def sync(self) -> None:
        answer = self._ask("sync")
        assert answer == "synced", answer

    def read(self, offset: int, length: int) -> bytes:
        return bytes.fromhex(self._ask(f"read {offset} {length}"))

    def close(self) -> None:
        """End the program (by PID): its mapping goes with it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass


def _serve(path: str) -> None:
    descriptor = os.open(path, os.O_RDWR)
    view = mmap.mmap(descriptor, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    print("ready", flush=True)
    for line in sys.stdin:
        verb, *words = line.split()
        if verb in ("store", "write"):
            offset, data = int(words[0]), bytes.fromhex(words[1])
            view[offset : offset + len(data)] = data
            if verb == "write":
                start = offset - offset % mmap.ALLOCATIONGRANULARITY
                view.flush(start, offset + len(data) - start)  # msync(MS_SYNC) of those pages
            print("stored" if verb == "store" else "written", flush=True)
        elif verb == "sync":
            view.flush()
            print("synced", flush=True)
        elif verb == "read":
            offset, length = int(words[0]), int(words[1])
            print(view[offset : offset + length].hex(), flush=True)
        else:
            print(f"error unknown command {verb!r}", flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1])

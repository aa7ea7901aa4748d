"""Driving a mount daemon from another process: what the demo and the tests use.

`MountSession` starts `fusepager mount STORE MNT -f --console` with in-process kernels as a
child process, waits until it has mounted, sends kernel console commands to its stdin and reads
the answers from its stdout.  `close()` unmounts and ends the daemon by PID, killing it if it
does not finish; use it as a context manager so that happens even when the caller fails.

This is ordinary blocking code: it must never run in the event loop of the process that serves
the mount (here that is another process, so all is well).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .mount import mount_state

START_TIMEOUT = 30.0
ANSWER_TIMEOUT = 30.0


class SessionError(Exception):
    pass


class MountSession:
    def __init__(
        self,
        store: str | Path,
        mountpoint: str | Path,
        kernels: list[str] = ("k1:4096",),
        *,
        extra_args: list[str] = (),
        argv: list[str] | None = None,
        allow_errors: bool = False,
    ) -> None:
        """`argv`, when given, is the whole daemon command (it must mount in the foreground
        with --console); otherwise it is built from the other arguments."""
        self.store = Path(store)
        self.mountpoint = Path(mountpoint)
        self.kernels = list(kernels)
        self.allow_errors = allow_errors
        self.store.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "fusepager", "mount", str(self.store), str(self.mountpoint), "-f", "--console"]
        for spec in self.kernels:
            command += ["--kernel", spec]
        command += list(extra_args)
        if argv is not None:
            command = list(argv)
        self.stderr_path = self.store.parent / f"{self.store.name}.daemon-stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            # Its own session: a Ctrl-C meant for us must not kill it before we unmount.
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            first = self._next_line(START_TIMEOUT)
            if not first.startswith("fusepager: mounted"):
                raise SessionError(f"daemon did not mount: {first}\n{self.daemon_stderr()}")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> MountSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _next_line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise SessionError(f"no answer from the daemon within {timeout} s") from None
        if line is None:
            raise SessionError(f"the daemon exited (status {self.process.poll()}):\n{self.daemon_stderr()}")
        return line

    def daemon_stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def send(self, line: str) -> None:
        """Send one console command without waiting for its answer."""
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def answer(self, timeout: float = ANSWER_TIMEOUT) -> str:
        """The next answer line (information lines, starting with '#', are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line(max(0.0, deadline - time.monotonic()))
            if not line.startswith("#"):
                return line

    def command(self, line: str, timeout: float = ANSWER_TIMEOUT) -> str:
        """Send a command and return its answer, without the kernel prefix.  An answer that is
        not `ok` raises SessionError."""
        self.send(line)
        answer = self.answer(timeout)
        words = answer.split(" ", 1)
        if len(words) == 2 and words[0] in {spec.split(":")[0] for spec in self.kernels}:
            answer = words[1]
        if not answer.startswith("ok"):
            raise SessionError(f"{line!r} -> {answer}")
        return answer

    def close(self, timeout: float = 30.0) -> None:
        """Unmount and end the daemon (by PID), whatever state it is in."""
        if self.process.poll() is None:
            if mount_state(self.mountpoint) in ("mounted", "stale"):
                subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if mount_state(self.mountpoint) in ("mounted", "stale"):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        if self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
        self._stderr.close()
        log = self.stderr_path.read_text(errors="replace")
        if "Traceback (most recent call last)" in log and not self.allow_errors:
            # The daemon survived a bug (it logs and goes on): whoever drives it must hear.
            raise SessionError(f"the daemon logged an error:\n{log[-4000:]}")

"""Driving a mount daemon and kernel processes from another process: what the demo, the
benchmarks and the tests use.

`MountSession` starts `fusepager mount STORE MNT -f --console` with in-process kernels as a
child process, waits until it has mounted, sends kernel console commands to its stdin and reads
the answers from its stdout.  `close()` unmounts and ends the daemon by PID, killing it if it
does not finish; use it as a context manager so that happens even when the caller fails.
`KernelProcess` does the same for `kernelsim run --connect ADDR`: a kernel in a process of its
own, connected to the daemon.

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


class _Child:
    """A child process answering console commands, one line each, on its stdout."""

    process: subprocess.Popen
    label = "the child"

    def _start(self, command: list[str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            # Its own session: a Ctrl-C meant for us must not kill it before we clean up.
            start_new_session=True,
        )
        self.info: list[str] = []  # the '#' lines seen so far
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

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
            raise SessionError(f"no answer from {self.label} within {timeout} s") from None
        if line is None:
            raise self._exited()
        return line

    def _exited(self) -> SessionError:
        """The child has gone (its output ended, or its input broke): say with what status.  Its
        output can end a moment before it is reaped, so wait for that, briefly."""
        try:
            status: int | None = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            status = None
        how = f"status {status}" if status is None or status >= 0 else f"killed by signal {-status}"
        return SessionError(f"{self.label} exited ({how}):\n{self.child_stderr()}")

    def child_stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def send(self, line: str) -> None:
        """Send one console command without waiting for its answer."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):  # ValueError: its stdin was closed already
            raise self._exited() from None

    def answer(self, timeout: float = ANSWER_TIMEOUT) -> str:
        """The next answer line (information lines, starting with '#', are kept in `info`)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line(max(0.0, deadline - time.monotonic()))
            if not line.startswith("#"):
                return line
            self.info.append(line)

    def _strip(self, answer: str) -> str:
        return answer

    def answer_to(self, line: str, timeout: float = ANSWER_TIMEOUT) -> str:
        """Send a command and return its answer, `ok` or `error`."""
        self.send(line)
        return self._strip(self.answer(timeout))

    def command(self, line: str, timeout: float = ANSWER_TIMEOUT) -> str:
        """Send a command and return its answer.  An answer that is not `ok` raises
        SessionError."""
        answer = self.answer_to(line, timeout)
        if not answer.startswith("ok"):
            raise SessionError(f"{line!r} -> {answer}")
        return answer

    def _end(self, timeout: float) -> None:
        """Wait for the process to exit; kill it (by PID) if it does not in time."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
        self._stderr.close()


class MountSession(_Child):
    label = "the daemon"

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
        self._start(command, self.store.parent / f"{self.store.name}.daemon-stderr")
        try:
            self.mounted_line = self._next_line(START_TIMEOUT)
            if not self.mounted_line.startswith("fusepager: mounted"):
                raise SessionError(f"daemon did not mount: {self.mounted_line}\n{self.daemon_stderr()}")
        except BaseException:
            self.close()
            raise

    @property
    def listen_address(self) -> str:
        """Where kernel processes connect (`kernelsim run --connect`), as the daemon said."""
        _, found, address = self.mounted_line.partition("kernels connect to ")
        if not found:
            raise SessionError(f"the daemon does not listen for kernels: {self.mounted_line}")
        return address.strip()

    def daemon_stderr(self) -> str:
        return self.child_stderr()

    def _strip(self, answer: str) -> str:
        # The daemon's consoles prefix their answers with the kernel's name.
        words = answer.split(" ", 1)
        if len(words) == 2 and words[0] in {spec.split(":")[0] for spec in self.kernels}:
            return words[1]
        return answer

    def close(self, timeout: float = 30.0) -> None:
        """Unmount and end the daemon (by PID), whatever state it is in."""
        if self.process.poll() is None and mount_state(self.mountpoint) in ("mounted", "stale"):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        self._end(timeout)
        if mount_state(self.mountpoint) in ("mounted", "stale"):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        log = self.stderr_path.read_text(errors="replace")
        if "Traceback (most recent call last)" in log and not self.allow_errors:
            # The daemon survived a bug (it logs and goes on): whoever drives it must hear.
            raise SessionError(f"the daemon logged an error:\n{log[-4000:]}")


class KernelProcess(_Child):
    """`kernelsim run --connect ADDRESS --name NAME` in a child process, driven on its stdin.

    Starting waits until the kernel has connected to the manager (or given up: SessionError).
    `close()` ends its input, lets it give its pages back and exit, and kills it (by PID) if it
    does not; `kill()` is `kill -9`."""

    def __init__(
        self,
        address: str,
        name: str,
        *,
        page_size: int = 4096,
        memory_pages: int = 256,
        cluster_pages: int = 1,
        retries: int = 10,
        fault_warning: float | None = None,
        fault_timeout: float | None = None,
        workdir: str | Path,
    ) -> None:
        self.name = name
        self.label = f"kernel process {name}"
        command = [
            sys.executable, "-m", "kernelsim", "run", "--connect", address, "--name", name,
            "--page-size", str(page_size), "--memory", str(memory_pages), "--cluster", str(cluster_pages),
            "--retries", str(retries),
        ]  # fmt: skip
        if fault_warning is not None:
            command += ["--fault-warning", str(fault_warning)]
        if fault_timeout is not None:
            command += ["--fault-timeout", str(fault_timeout)]
        command.append("-")
        self._start(command, Path(workdir) / f"kernel-{name}.stderr")
        try:
            while True:
                line = self._next_line(START_TIMEOUT)
                self.info.append(line)
                if line.startswith("# gave up"):
                    raise SessionError(f"{self.label} could not connect: {line}")
                if line.startswith(f"# kernel {name}:"):
                    break
        except BaseException:
            self.close()
            raise

    def wait_for_info(self, text: str, timeout: float = ANSWER_TIMEOUT, *, since: int = 0) -> str:
        """The first information line that contains `text`, among those seen already from
        `self.info[since]` on or those coming."""
        for line in self.info[since:]:
            if text in line:
                return line
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line(max(0.0, deadline - time.monotonic()))
            if line.startswith("#"):
                self.info.append(line)
                if text in line:
                    return line

    def kill(self) -> None:
        """kill -9: the kernel dies without a word to its manager."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def close(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            try:
                self.process.stdin.close()  # end of commands: the kernel shuts down in order
            except BrokenPipeError:
                pass
        self._end(timeout)

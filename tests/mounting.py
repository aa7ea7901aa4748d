"""Helpers for tests that mount for real and drive the mount with shell tools."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from pathlib import Path

SHELL_TIMEOUT = 60
GENEROUS = 30.0
"""Seconds to wait for something that happens at once on an idle machine: a bound that only a
hang reaches, not a measure of speed (the suite runs beside other work on two cores)."""


def sh(command: str, *, check: bool = True, input: str | None = None, timeout: float = SHELL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a shell command line (bash) and return what it did; `check` fails the test on a
    non-zero status, showing its output."""
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, input=input, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"$ {command}\nstatus {result.returncode}\n{result.stdout}{result.stderr}")
    return result


def fails_with(command: str, message: str) -> str:
    """Run a command that must fail with `message` (a strerror text) in its output."""
    result = sh(command, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"$ {command} succeeded:\n{output}"
    assert message in output, f"$ {command}: expected {message!r} in:\n{output}"
    return output


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def trace_lines(mountpoint: Path) -> list[str]:
    return (mountpoint / "trace").read_text().splitlines()


class SyscallWatch:
    """`strace -f -y -e trace=SYSCALLS -p PID`: the system calls a running process (every
    thread of it) makes, with the paths of their file descriptors.  Use as a context manager;
    `lines()` is what strace logged so far.  strace is ended (by its PID) on leaving."""

    def __init__(self, pid: int, syscalls: str, log: Path) -> None:
        self.log = log
        self._stderr = open(log.with_suffix(".stderr"), "w+")
        self.process = subprocess.Popen(
            ["strace", "-f", "-y", "-qq", "-e", f"trace={syscalls}", "-o", str(log), "-p", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    def __enter__(self) -> SyscallWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # strace detaches and leaves the process running
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stderr.close()

    def lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def wait_for(self, text: str, poke, timeout: float = 30.0) -> None:
        """Call `poke()` until strace has logged a call mentioning `text`: then strace is
        attached and logging what the process does for us."""

        def seen() -> bool:
            if self.process.poll() is not None:
                self._stderr.seek(0)
                raise AssertionError(f"strace exited ({self.process.returncode}): {self._stderr.read()}")
            poke()
            return any(text in line for line in self.lines())

        wait_until(seen, timeout=timeout, interval=0.1, what=f"strace to log a call on {text}")


class TailFollow:
    """A real GNU `tail -f` of a file (it polls: FUSE gives no inotify events), its output
    lines and its stderr collected by threads.  Started once it has printed the file's last
    line, so it is following when the constructor returns.  Use as a context manager: tail is
    ended by its PID on leaving."""

    def __init__(self, path: Path, *, interval: float = 0.1, timeout: float = 30.0) -> None:
        self.path = path
        self.process = subprocess.Popen(
            ["tail", "-n", "1", "-s", str(interval), "-f", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._collect, args=(self.process.stdout, self.lines), daemon=True),
            threading.Thread(target=self._collect, args=(self.process.stderr, self.errors), daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        try:
            wait_until(lambda: self.lines, timeout=timeout, what=f"tail -f to print the last line of {path}")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _collect(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def __enter__(self) -> TailFollow:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        """The first line tail printed that contains `text`, waiting for it."""

        def found() -> str | None:
            return next((line for line in list(self.lines) if text in line), None)

        return wait_until(found, timeout=timeout, what=f"tail -f to print a line with {text!r}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)
        for thread in self._threads:
            thread.join(timeout=10)


@contextlib.contextmanager
def mapped_by_kernel_process(tmp_path: Path, name: str, setup: tuple[str, ...] = ()):
    """A real mount listening for kernel processes, a 64 KiB object `name`, and kernel process
    k1 (`kernelsim run --connect`) mapping it whole, having run the console commands `setup`;
    the mount, the daemon and k1 are ended by PID whatever happens.
    Yields (session, k1, the object's directory in the mount)."""
    from fusepager.session import KernelProcess, MountSession

    with MountSession(tmp_path / "store", tmp_path / "mnt", []) as session:
        obj = session.mountpoint / "objects" / name
        subprocess.run(["mkdir", str(obj)], check=True)
        subprocess.run(["truncate", "-s", "64K", str(obj / "data")], check=True)
        k1 = KernelProcess(session.listen_address, "k1", workdir=tmp_path)
        try:
            k1.command(f"map {name} 64K")
            for command in setup:
                k1.command(command)
            yield session, k1, obj
        finally:
            k1.close(timeout=10)

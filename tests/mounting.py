"""Helpers for tests that mount for real and drive the mount with shell tools."""

from __future__ import annotations

import subprocess
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

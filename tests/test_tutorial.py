"""docs/tutorial.md, run as written: every command, in the page's order, against a real mount
and real kernel processes, and what each one prints compared with what the page shows.

The page's convention (it explains it to the reader too):

- A fenced block with the info string `shell-session` is the shell terminal.  A line starting
  with `$ ` is a command; the lines after it, up to the next `$ `, are what it prints (stdout
  and stderr, as a terminal shows them).  All of these blocks are one bash session, run here
  as one bash process: `cd`, `export` and variables carry over from block to block.
- A fenced block with the info string `kernel NAME` is kernel NAME's terminal.  Its first line
  may start it: `$ .venv/bin/kernelsim run --connect ADDR --name NAME [options]`, followed by
  the `#` lines it prints when it connects.  A line `NAME:TASK> COMMAND` is a console command
  typed at the prompt (which names the kernel and its current task); the lines after it are its
  answer.  A command shown with no answer as the last line of its block waits: its answer is
  the first lines of that kernel's next block, before any prompt.  `NAME:TASK> (Ctrl-D)` ends
  the kernel's input: it gives back what it changed and exits (status 0); the lines after it
  are what it prints on the way out.
- Any other fenced block is an error: everything the page shows is run.

What legitimately differs from run to run is normalised on both sides: the time of day in the
trace, process ids, Mach port names, the latency counters in `stats`, file dates in `ls -l`,
and the directory (the page's `/tmp/tut` is a temporary directory here).  A line that is just
`...` stands for any number of lines, zero included.  Nothing else is tolerated.

Ordering: after a console command that waits, or a kernel's exit, what the shell shows next
depends on messages still on their way between processes (a person typing is slower than
they are).  So the first shell command after such an event is repeated until it shows what the
page says (for at most ASYNC_WAIT seconds); every other command must show it the first time.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fusepager.mount import mount_state
from fusepager.session import KernelProcess

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "tutorial.md"
DOC_DIR = "/tmp/tut"  # the page's working directory; a temporary one here
SHELL_TIMEOUT = 30.0
ASYNC_WAIT = 10.0
MARKER = "\x1eTUTORIAL-END"
LOOKING = ("ls", "cat", "head", "tail", "grep", "getfattr", "xxd")

# --- reading the page ------------------------------------------------------------------------


@dataclass
class Step:
    terminal: str  # "shell" or a kernel's name
    kind: str  # "shell", "start", "console", "answer" (of a waiting command), "eof"
    command: str
    shown: list[str] = field(default_factory=list)
    line: int = 0  # where in the page
    prompt_task: str | None = None
    waits: bool = False  # a console command whose answer comes in a later block


PROMPT = re.compile(r"^(?P<kernel>[\w-]+):(?P<task>[\w-]+)> (?P<command>.*)$")
FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)


def read_steps(text: str) -> list[Step]:
    steps: list[Step] = []
    for block in FENCE.finditer(text):
        info = block["info"].strip()
        first_line = text.count("\n", 0, block.start("body")) + 1
        lines = block["body"].splitlines()
        if info == "shell-session":
            steps += _shell_steps(lines, first_line)
        elif info.startswith("kernel "):
            steps += _kernel_steps(info.split()[1], lines, first_line)
        else:
            raise AssertionError(f"docs/tutorial.md line {first_line}: a ```{info} block; use shell-session or kernel NAME")
    return steps


def _shell_steps(lines: list[str], first_line: int) -> list[Step]:
    steps: list[Step] = []
    for number, line in enumerate(lines, first_line):
        if line.startswith("$ "):
            steps.append(Step("shell", "shell", line[2:], line=number))
        else:
            assert steps, f"docs/tutorial.md line {number}: output before any command"
            steps[-1].shown.append(line)
    return steps


def _kernel_steps(name: str, lines: list[str], first_line: int) -> list[Step]:
    steps: list[Step] = []
    for number, line in enumerate(lines, first_line):
        prompt = PROMPT.match(line)
        if line.startswith("$ "):
            assert not steps, f"docs/tutorial.md line {number}: a kernel starts on its block's first line"
            steps.append(Step(name, "start", line[2:], line=number))
        elif prompt:
            assert prompt["kernel"] == name, f"docs/tutorial.md line {number}: a prompt of {prompt['kernel']} in {name}'s block"
            kind = "eof" if prompt["command"] == "(Ctrl-D)" else "console"
            steps.append(Step(name, kind, prompt["command"], line=number, prompt_task=prompt["task"]))
        elif not steps:
            steps.append(Step(name, "answer", "", [line], line=number))
        else:
            steps[-1].shown.append(line)
    if steps and steps[-1].kind == "console" and not steps[-1].shown:
        steps[-1].waits = True
    for step in steps[:-1]:
        assert step.kind != "console" or step.shown, f"docs/tutorial.md line {step.line}: a console command shows no answer"
    return steps


# --- comparing -------------------------------------------------------------------------------

NORMALISE = [
    (re.compile(r"\b\d\d:\d\d:\d\d\.\d{6}\b"), "HH:MM:SS.SSSSSS"),  # the trace's times
    (re.compile(r"\b(pid|daemon) \d+\b"), r"\1 N"),  # the daemon's pid
    (re.compile(r'\buser\.fusepager\.pid="\d+"'), 'user.fusepager.pid="N"'),
    (re.compile(r"\b(control|name|reply_to|old_control|new_control|new_name|new_object)=\d+\b"), r"\1=N"),  # port names
    (re.compile(r'\buser\.mach\.(control|name)="\d+"'), r'user.mach.\1="N"'),
    (re.compile(r"^(latency_(?:mean|max|total)_us) \d+$"), r"\1 N"),  # stats
    (re.compile(r"\b[A-Z][a-z]{2} [ \d]\d \d\d:\d\d\b"), "MMM DD HH:MM"),  # ls -l dates
]


def normalise(line: str) -> str:
    for pattern, replacement in NORMALISE:
        line = pattern.sub(replacement, line)
    return line.rstrip()


def matches(actual: list[str], shown: list[str]) -> bool:
    """`actual` is what `shown` shows, a `...` line standing for any number of lines."""
    actual = [normalise(line) for line in actual]
    shown = [normalise(line) for line in shown]
    # can[i][j]: shown[i:] matches actual[j:]
    can = [[False] * (len(actual) + 1) for _ in range(len(shown) + 1)]
    can[len(shown)][len(actual)] = True
    for i in range(len(shown) - 1, -1, -1):
        for j in range(len(actual), -1, -1):
            if shown[i] == "...":
                can[i][j] = can[i + 1][j] or (j < len(actual) and can[i][j + 1])
            else:
                can[i][j] = j < len(actual) and shown[i] == actual[j] and can[i + 1][j + 1]
    return can[0][0]


# --- running ---------------------------------------------------------------------------------


class Shell:
    """One bash process, the page's shell terminal: commands go in one at a time, each one's
    output (stdout and stderr) comes back with its exit status."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        # A terminal's `ls` lists in columns; bash in a pipe would list one name a line.
        self._send("ls() { command ls -C -T 0 \"$@\"; }")

    def _send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")
        self.process.stdin.flush()

    def run(self, command: str, timeout: float = SHELL_TIMEOUT) -> tuple[int, str]:
        # stdin from /dev/null: a command that reads its input must not eat the next ones.
        self._send(f"{{ {command}\n}} < /dev/null 2>&1\nprintf '\\n{MARKER} %d\\n' $?")
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        output = b""
        deadline = time.monotonic() + timeout
        end = re.compile(rb"\n" + MARKER.encode() + rb" (\d+)\n$")
        while not (found := end.search(output)):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"$ {command}\ndid not finish within {timeout} s; it printed:\n{output.decode(errors='replace')}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"$ {command}\nthe shell exited; it printed:\n{output.decode(errors='replace')}")
            output += chunk
        return int(found[1]), output[: found.start()].decode(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


class Tutorial:
    """Runs the page's steps; `close()` unmounts and ends every process it started, by PID."""

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, COLUMNS="80", LC_ALL="C.UTF-8")
        env.pop("PS1", None)
        self.shell = Shell(ROOT, env)
        self.kernels: dict[str, KernelProcess] = {}
        self.tasks: dict[str, str] = {}  # each kernel's current task, as its prompt shows it
        self.waiting: dict[str, str] = {}  # kernel -> the command still waiting for its answer
        self.daemon_pids: set[int] = set()
        self.after_async = False

    # the page's paths and this run's
    def local(self, text: str) -> str:
        return text.replace(DOC_DIR, str(self.base))

    def as_shown(self, text: str) -> str:
        return text.replace(str(self.base), DOC_DIR)

    def run(self, step: Step, check) -> None:
        where = f"docs/tutorial.md line {step.line}"
        if step.kind == "shell":
            self._shell(step, check, where)
        elif step.kind == "start":
            self._start(step, check, where)
        elif step.kind == "console":
            self._console(step, check, where)
        elif step.kind == "answer":
            assert step.terminal in self.waiting, f"{where}: an answer, but no command of {step.terminal} is waiting"
            del self.waiting[step.terminal]
            kernel = self.kernels[step.terminal]
            since = len(kernel.info)
            answer = kernel.answer()
            self._remember_task(step.terminal, answer)
            check(step, [self.as_shown(line) for line in kernel.info[since:] + [answer]], where)
        elif step.kind == "eof":
            self._eof(step, check, where)

    def _shell(self, step: Step, check, where: str) -> None:
        deadline = time.monotonic() + (ASYNC_WAIT if self.after_async else 0)
        if self.after_async:
            # Only a command that changes nothing may be asked again.
            assert step.command.split()[0] in LOOKING, f"{where}: after a waiting command or a kernel's exit, the page must look ({', '.join(LOOKING)}) first"
        self.after_async = False
        while True:
            status, output = self.shell.run(self.local(step.command))
            lines = self.as_shown(output).splitlines()
            for pid in re.findall(r"fusepager: mounted .* \(pid (\d+)\)", output):
                self.daemon_pids.add(int(pid))
            if status == 0 and (time.monotonic() >= deadline or matches(lines, step.shown)):
                break
            if status != 0 and time.monotonic() >= deadline:
                raise AssertionError(f"{where}: $ {step.command}\nfailed with status {status}:\n{output}")
            # The page's output is not there yet (a file the waiting command makes may not be
            # there either: ls fails until it is); ask again, until the deadline.
            time.sleep(0.05)
        check(step, lines, where)

    def _start(self, step: Step, check, where: str) -> None:
        words = shlex.split(step.command)
        assert words[:2] in ([".venv/bin/kernelsim", "run"], ["kernelsim", "run"]), f"{where}: not kernelsim run: {step.command}"
        options = dict(zip(words[2::2], words[3::2]))
        assert len(words) % 2 == 0 and set(options) <= {"--connect", "--name", "--page-size", "--memory", "--cluster"}, (
            f"{where}: the test knows --connect, --name, --page-size, --memory and --cluster: {step.command}"
        )
        name = options["--name"]
        assert name == step.terminal and name not in self.kernels, f"{where}: kernel {name} in {step.terminal}'s block"
        kernel = KernelProcess(
            self.local(options["--connect"]),
            name,
            page_size=int(options.get("--page-size", 4096)),
            memory_pages=int(options.get("--memory", 1024)),  # kernelsim run's defaults
            cluster_pages=int(options.get("--cluster", 1)),
            workdir=self.base.parent,
        )
        self.kernels[name] = kernel
        self.tasks[name] = "t1"
        check(step, [self.as_shown(line) for line in kernel.info], where)

    def _console(self, step: Step, check, where: str) -> None:
        name = step.terminal
        assert name in self.kernels and self.kernels[name].process.poll() is None, f"{where}: kernel {name} is not running"
        assert name not in self.waiting, f"{where}: {name} still waits for {self.waiting[name]!r}"
        assert step.prompt_task == self.tasks[name], f"{where}: the prompt says task {step.prompt_task}, {name}'s current task is {self.tasks[name]}"
        kernel = self.kernels[name]
        if step.waits:
            kernel.send(step.command)
            self.waiting[name] = step.command
            self.after_async = True
            return
        since = len(kernel.info)
        answer = kernel.answer_to(step.command)
        self._remember_task(name, answer)
        check(step, [self.as_shown(line) for line in kernel.info[since:] + [answer]], where)

    def _remember_task(self, name: str, answer: str) -> None:
        if answer.startswith("ok task "):
            self.tasks[name] = answer.split()[2]

    def _eof(self, step: Step, check, where: str) -> None:
        name = step.terminal
        assert step.prompt_task == self.tasks[name], f"{where}: the prompt says task {step.prompt_task}, {name}'s is {self.tasks[name]}"
        assert name not in self.waiting, f"{where}: {name} still waits for {self.waiting[name]!r}"
        kernel = self.kernels[name]
        since = len(kernel.info)
        kernel.close(timeout=30)
        assert kernel.process.returncode == 0, f"{where}: kernel {name} exited with status {kernel.process.returncode}"
        lines = []
        while (line := kernel._lines.get(timeout=5)) is not None:  # what it printed on its way out
            lines.append(line)
        self.after_async = True
        check(step, [self.as_shown(line) for line in kernel.info[since:] + lines], where)

    def close(self) -> list[str]:
        """What was wrong (kernels still running); the rest is cleaned up whatever happened."""
        problems = []
        for name, kernel in self.kernels.items():
            if kernel.process.poll() is None:
                kernel.kill()
                problems.append(f"kernel {name} was still running")
        mnt = self.base / "mnt"
        if mount_state(mnt) in ("mounted", "stale"):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
        for pid in self.daemon_pids:
            _end_pid(pid)
        if mount_state(mnt) in ("mounted", "stale"):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
        self.shell.close()
        return problems


def _end_pid(pid: int) -> None:
    """End the daemon (not our child: it daemonized) by PID, SIGTERM first."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def assert_shown(step: Step, actual: list[str], where: str) -> None:
    if not matches(actual, step.shown):
        prompt = "$ " if step.kind in ("shell", "start") else f"{step.terminal}> "
        raise AssertionError(
            f"{where}: {prompt}{step.command}\n"
            + "the page shows:\n" + "".join(f"  | {line}\n" for line in step.shown)
            + "it printed:\n" + "".join(f"  | {line}\n" for line in actual)
        )


# --- the tests -------------------------------------------------------------------------------


def test_the_page_is_read_as_the_convention_says():
    steps = read_steps(DOC.read_text())
    kinds = {step.kind for step in steps}
    assert kinds == {"shell", "start", "console", "answer", "eof"}
    assert len([step for step in steps if step.kind == "shell"]) >= 40
    # Every kernel it starts, it ends; the mount is the first thing and the unmount near the end.
    started = [step.terminal for step in steps if step.kind == "start"]
    ended = [step.terminal for step in steps if step.kind == "eof"]
    assert sorted(started) == sorted(ended) and len(started) >= 3
    shell = [step.command for step in steps if step.kind == "shell"]
    assert any(command.startswith("fusepager mount ") for command in shell[:5])
    assert any(command.startswith("fusepager umount ") for command in shell)
    # The normalisation is narrow: a changed byte, a missing line or an extra one fails.
    assert matches(["07:35:30.249662 k1 -> notes memory_object_init(control=6 name=7 page_size=4096)"],
                   ["12:00:00.000001 k1 -> notes memory_object_init(control=9 name=10 page_size=4096)"])  # fmt: skip
    assert not matches(["k1 -> notes memory_object_init(control=6 name=7 page_size=8192)"],
                       ["k1 -> notes memory_object_init(control=6 name=7 page_size=4096)"])  # fmt: skip
    assert not matches(["a", "b"], ["a"]) and not matches(["a"], ["a", "b"]) and not matches([], ["a"])
    assert matches(["a", "b", "c"], ["a", "...", "c"]) and matches(["a", "c"], ["a", "...", "c"])
    assert not matches(["a", "b", "d"], ["a", "...", "c"])
    assert not matches(["ok read 0x10000 5 'Hello'"], ["ok read 0x10000 5 'HELLO'"])


def test_the_tutorial_runs_as_written(tmp_path):
    steps = read_steps(DOC.read_text())
    tutorial = Tutorial(tmp_path / "tut")
    try:
        for step in steps:
            tutorial.run(step, assert_shown)
        assert not tutorial.waiting, f"commands still waiting at the end: {tutorial.waiting}"
        assert mount_state(tutorial.base / "mnt") == "free", "the tutorial ends unmounted"
    finally:
        problems = tutorial.close()
    assert not problems, problems
    log = (tutorial.base / "store" / "fusepager.log").read_text()
    assert "Traceback" not in log, f"the daemon logged an error:\n{log[-4000:]}"
    for name in tutorial.kernels:
        stderr = (tmp_path / f"kernel-{name}.stderr").read_text()
        assert stderr == "", f"kernel {name} wrote to stderr:\n{stderr}"

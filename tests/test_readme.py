"""The README's walkthrough, step by step, as a new user would type it."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from fusepager.session import KernelProcess, MountSession
from mounting import sh, wait_until

ROOT = Path(__file__).resolve().parent.parent


def walkthrough() -> list[tuple[str, list[str]]]:
    """(kind, lines) for each block marked `<!-- walkthrough: KIND -->` in the README."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- walkthrough: (\w+) -->\n```[a-z]*\n(.*?)```", text, re.S)
    return [(kind, [line for line in body.splitlines() if line.strip()]) for kind, body in blocks]


def test_the_readme_walkthrough_works_as_written(tmp_path):
    steps = walkthrough()
    assert [kind for kind, _ in steps][:2] == ["mount", "shell"]
    store, mnt = tmp_path / "store", tmp_path / "mnt"

    def local(line: str) -> str:
        return line.replace("/tmp/store", str(store)).replace("/tmp/mnt", str(mnt))

    (_, mount_lines) = steps[0]
    sh(local(mount_lines[0]))
    argv = shlex.split(local(mount_lines[1]))
    argv[0] = str(ROOT / argv[0])
    answers, outputs, k2_answers = [], [], []
    k2 = None
    with MountSession(store, mnt, argv=argv) as session:
        try:
            for kind, lines in steps[1:]:
                for line in lines:
                    if kind == "shell":
                        outputs.append((line, sh(local(line)).stdout))
                    elif kind == "kernel":
                        k2 = _start_kernel(line, session, tmp_path)
                    elif kind == "k2":
                        k2_answers.append(k2.command(line))
                    else:
                        answers.append(session.command(line))
        finally:
            if k2 is not None:
                k2.close(timeout=10)
    # what the README says the user sees
    assert answers[0] == "ok map hello 0x10000 65536"
    assert answers[1] == "ok read 0x10000 13 'Hello, pager!'"
    seen: dict[str, str] = {}
    for line, text in outputs:
        seen.setdefault(line, text)  # what each command showed the first time
    assert seen["ls /tmp/mnt/objects/hello"].split() == ["ctl", "data", "kernels", "snapshots"]
    assert seen["ls /tmp/mnt/objects/hello/kernels"] == ""
    assert seen["ls /tmp/mnt/objects/hello/kernels/k1"].split() == ["control", "name", "page_size", "pages", "ready"]
    assert seen["cat /tmp/mnt/objects/hello/kernels/k1/page_size"] == "4096\n"
    assert seen["cat /tmp/mnt/objects/hello/kernels/k1/ready"] == "may_cache=0 copy=delay\n"
    pages = [text for line, text in outputs if line == "cat /tmp/mnt/objects/hello/kernels/k1/pages"]
    # read-only after the read; writable after the write; read-only again after cat cleaned it
    assert pages == ["0x0 4096 r-- precious\n", "0x0 4096 rw- dirty,precious\n", "0x0 4096 r-- precious\n"]
    trace = seen["grep memory_object /tmp/mnt/trace"]
    for kind in ("memory_object_init", "memory_object_ready", "memory_object_data_request", "memory_object_data_supply"):
        assert kind in trace
    assert seen["cat /tmp/mnt/objects/hello/data"] == "Hello, kernel\n"
    assert 'user.mach.kernels="k1"' in seen["getfattr -d -m user.mach /tmp/mnt/objects/hello"]

    # The kernel process: it found the object by name, read what k1 left, and its write reached
    # the file; killed, it is forgotten.
    assert [kind for kind, _ in steps].count("kernel") == 1
    assert k2_answers[0] == "ok map hello 0x10000 65536"
    assert k2_answers[1] == "ok read 0x10000 13 'Hello, kernel'"
    assert k2_answers[2] == "ok write 0x10007 6"
    listings = [text for line, text in outputs if line.startswith("ls /tmp/mnt/objects/hello/kernels") or "; ls /tmp/mnt/objects/hello/kernels" in line]
    assert listings[-2].split() == ["k1", "k2"]
    datas = [text for line, text in outputs if line == "cat /tmp/mnt/objects/hello/data"]
    assert datas[-1] == "Hello, pager!\n"
    assert listings[-1].split() == ["k1"]
    assert k2.process.returncode == -9


def _start_kernel(line: str, session: MountSession, workdir: Path) -> KernelProcess:
    """`kernelsim run --connect ADDR --name NAME --page-size N` as the README gives it, at the
    address the daemon said it listens on (the README's is for /tmp/store)."""
    words = shlex.split(line)
    assert words[:2] == [".venv/bin/kernelsim", "run"], words
    options = dict(zip(words[2::2], words[3::2]))
    assert options["--connect"] == "unix:/tmp/store/fusepager.sock"
    return KernelProcess(session.listen_address, options["--name"], page_size=int(options["--page-size"]), workdir=workdir)

"""The commands a user runs: the CLIs, the example, the README's code, the benchmark smoke run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_kernelsim_help_works_as_command_and_module():
    for argv in ([str(BIN / "kernelsim"), "--help"], [sys.executable, "-m", "kernelsim", "--help"]):
        result = run(*argv)
        assert result.returncode == 0, result.stderr
        assert "usage: kernelsim" in result.stdout
        assert "messages" in result.stdout and "examples:" in result.stdout


def test_kernelsim_messages_lists_the_gnu_mach_numbers():
    result = run(str(BIN / "kernelsim"), "messages")
    assert result.returncode == 0, result.stderr
    rows = dict(re.findall(r"^\s*(\d+)\s+(\S+)", result.stdout, re.M))
    assert rows["2200"] == "memory_object_init"
    assert rows["2203"] == "memory_object_data_request"
    assert rows["2093"] == "memory_object_data_supply"
    assert rows["2251"] == "memory_object_data_initialize"
    one_way = run(str(BIN / "kernelsim"), "messages", "--direction", "manager-to-kernel").stdout
    assert "memory_object_ready" in one_way and "memory_object_init" not in one_way


def test_fusepager_command_exists():
    result = run(str(BIN / "fusepager"), "--version")
    assert result.returncode == 0 and result.stdout.startswith("fusepager ")


def test_the_demo_example_runs_and_narrates_the_protocol():
    result = run(sys.executable, "examples/hello_pager.py")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    order = [
        "memory_object_init(",
        "memory_object_ready(",
        "memory_object_data_request(",
        "memory_object_data_supply(",
        "read b'page  0 of the hello objec'",
        "memory_object_data_return(",
        "memory_object_terminate(",
        "now reads: b'PAGE  1 rewritten by task'",
    ]
    positions = [out.index(text) for text in order]
    assert positions == sorted(positions), out
    # the seqnos the manager printed count up from 1 without a gap
    seqnos = [int(n) for n in re.findall(r"<- #(\d+)", out)]
    assert seqnos == list(range(1, len(seqnos) + 1))


def test_the_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "b'hello, page!'"


def test_bench_quick_smoke_run_of_the_in_process_cases(tmp_path):
    # the mount case has its own test (tests/test_bench_mount.py), the others tests/test_bench_cases.py
    cases = ["fault-rate", "ping-pong", "stream-64"]
    arguments = [argument for case in cases for argument in ("--case", case)]
    result = run(sys.executable, "scripts/bench.py", *arguments, "--quick", "--runs", "1", "--output", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {r["case"] for r in report["results"]} == set(cases)
    for figure in report["results"]:
        assert figure["value"] > 0 and figure["anchor_value"] > 0
        assert abs(figure["ratio"] - figure["value"] / figure["anchor_value"]) < 1e-9
        assert f"| {figure['case']} |" in result.stdout
    with open("/proc/mounts") as mounts:
        assert not [line for line in mounts if "fusepager-bench-" in line], "the benchmark left a mount behind"

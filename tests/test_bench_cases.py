"""scripts/bench's page-in, mmap-touch and memory cases, run for real at their --quick size:
the JSON they report has the right shape, and nothing is left mounted or running.  (No timing
is asserted: the figures are the benchmark's business.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

def _mounts_under(directory: Path) -> list[str]:
    with open("/proc/mounts") as mounts:
        points = [line.split()[1].encode().decode("unicode_escape") for line in mounts]
    return [point for point in points if point.startswith(f"{directory}/")]


def _processes_naming(directory: Path) -> list[str]:
    """Command lines of live processes that name a path under `directory` (a daemon serving a
    store there, a kernel process connecting to its socket)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(directory) in command:
            found.append(f"{entry}: {command}")
    return found


def _run_case(case: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    work = tmp_path / "work"  # the case's temporary directories (store, mount point) go here
    work.mkdir()
    output = tmp_path / "out"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--case", case, "--quick", "--runs", "1", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, TMPDIR=str(work)))

    left = _mounts_under(tmp_path)
    for point in left:  # never break later tests, whatever this one finds
        subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True)
    running = _processes_naming(tmp_path)
    assert not left, f"the benchmark left mounts behind: {left}"
    assert not running, f"the benchmark left processes behind: {running}"
    assert os.listdir(work) == [], "the benchmark left its temporary directory behind"
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads((output / "bench.json").read_text())["results"]
    assert figures and all(figure["case"] == case for figure in figures)
    for figure in figures:
        assert figure["value"] > 0 and figure["anchor_value"] > 0
        assert figure["ratio"] == pytest.approx(figure["value"] / figure["anchor_value"], rel=1e-9)
        assert figure["runs"] == 1
        assert figure["command"] == f"scripts/bench --case {case} --runs 1 --quick"
        assert figure["figure"] and figure["anchor"] and figure["unit"] and figure["target"] is not None
    assert f"| {case} |" in result.stdout
    return result, figures


def test_bench_page_in_quick_run(tmp_path):
    _, (figure,) = _run_case("page-in", tmp_path)
    assert figure["unit"] == "MB/s" and figure["target"] == 0.5 and not figure["lower_is_better"]
    assert "cat" in figure["anchor"] and "cluster 256 pages" in figure["figure"]
    details = figure["details"]
    assert details["bytes"] == 16 << 20 and details["cluster_pages"] == 256
    assert all(len(runs) == 1 and runs[0] > 0 for runs in details["runs_MB_per_s"].values())
    # The kernel asked for whole clusters: 16 MiB in 1 MiB requests.
    assert details["kernel_counters"]["data_requests"] == 16
    assert details["kernel_counters"]["pages_requested"] == 4096


def test_bench_mmap_touch_quick_run(tmp_path):
    _, (figure,) = _run_case("mmap-touch", tmp_path)
    assert figure["unit"] == "pages/s" and figure["target"] == 0.15 and not figure["lower_is_better"]
    assert "mmapped" in figure["anchor"]
    details = figure["details"]
    assert details["pages"] == 4096
    assert all(len(runs) == 1 and runs[0] > 0 for runs in details["runs_pages_per_s"].values())


def test_bench_memory_quick_run(tmp_path):
    _, figures = _run_case("memory", tmp_path)
    # Lower is better: each figure over its ceiling, at most 1.
    assert all(figure["unit"] == "MiB" and figure["lower_is_better"] and figure["target"] == 1.0 for figure in figures)
    assert len(figures) == 4
    assert sorted("VmHWM" in figure["figure"] for figure in figures) == [False, False, True, True]
    manager = [figure for figure in figures if figure["figure"].startswith("manager")]
    kernel = [figure for figure in figures if figure["figure"].startswith("kernel")]
    assert {figure["anchor_value"] for figure in manager} == {150}
    (run,) = figures[0]["details"]["runs"]
    limit_mib = run["kernel_stat"]["limit"] * 4096 / (1 << 20)
    assert {figure["anchor_value"] for figure in kernel} == {limit_mib + 64}
    # The kernel kept to its limit, paged out along the way, and made one request a touch.
    assert run["kernel_stat"]["peak"] <= run["kernel_stat"]["limit"] < run["kernel_stat"]["data_requests"]
    assert run["kernel_stat"]["evictions"] > 0
    assert run["manager"]["VmRSS"] <= run["manager"]["VmHWM"] and run["kernel"]["VmRSS"] <= run["kernel"]["VmHWM"]

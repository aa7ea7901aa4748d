"""scripts/bench's mount-read case, run for real at its --quick size."""

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


def test_bench_mount_read_quick_run_reports_and_leaves_no_mount(tmp_path):
    work = tmp_path / "work"  # the case's temporary directories (store, mount points) go here
    work.mkdir()
    output = tmp_path / "out"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--case", "mount-read", "--quick", "--runs", "1", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, TMPDIR=str(work)))

    left = _mounts_under(tmp_path)
    for point in left:  # never break later tests, whatever this one finds
        subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True)
    assert not left, f"the benchmark left mounts behind: {left}"
    assert os.listdir(work) == [], "the benchmark left its temporary directory behind"
    # (CI reaches PyPI: a failed download of passthroughfs.py is a failure like any other)
    assert result.returncode == 0, result.stdout + result.stderr

    report = json.loads((output / "bench.json").read_text())
    figures = [r for r in report["results"] if r["case"] == "mount-read"]
    assert figures and len(figures) == len(report["results"])
    for figure in figures:
        assert figure["unit"] == "MB/s"
        assert figure["value"] > 0 and figure["anchor_value"] > 0
        assert figure["ratio"] == pytest.approx(figure["value"] / figure["anchor_value"], rel=1e-9)
        assert figure["runs"] == 1 and "--case mount-read" in figure["command"] and "--quick" in figure["command"]
        assert figure["details"]["bytes"] == 32 << 20
        for runs in figure["details"]["runs_MB_per_s"].values():
            assert len(runs) == 1 and runs[0] > 0
    against_passthrough = [f for f in figures if "passthroughfs.py" in f["anchor"] and f["target"] is not None]
    against_raw = [f for f in figures if f["anchor"] == "raw backing file"]
    assert against_passthrough and all(f["target"] == 2.0 for f in against_passthrough)
    assert against_raw and all(f["target"] is None for f in against_raw)
    # One regime's figures share the mount's value: the same reads, judged against two anchors.
    for passthrough in against_passthrough:
        (raw,) = [f for f in against_raw if f["figure"] == passthrough["figure"]]
        assert raw["value"] == passthrough["value"]
    # As root the cold figure (page cache dropped before each read) is there.
    if os.geteuid() == 0:
        assert any("page cache dropped" in f["figure"] for f in against_passthrough)
    assert "| mount-read |" in result.stdout


def test_bench_cross_process_quick_run_reports_and_leaves_nothing_behind(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    output = tmp_path / "out"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--case", "cross-process", "--quick", "--runs", "2", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, TMPDIR=str(work)))

    left = _mounts_under(tmp_path)
    for point in left:
        subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True)
    assert not left, f"the benchmark left mounts behind: {left}"
    assert os.listdir(work) == [], "the benchmark left its temporary directory behind"
    assert result.returncode == 0, result.stdout + result.stderr

    (figure,) = json.loads((output / "bench.json").read_text())["results"]
    assert figure["case"] == "cross-process" and figure["target"] == 0.6
    assert figure["value"] > 0 and figure["anchor_value"] > 0
    assert figure["ratio"] == pytest.approx(figure["value"] / figure["anchor_value"], rel=1e-9)
    assert "two processes" in figure["anchor"] and "--case cross-process" in figure["command"]
    assert "| cross-process |" in result.stdout

"""scripts/bench's mount case (and cross-process), run for real at their --quick sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PASSTHROUGH = "pyfuse3 examples/passthroughfs.py, same file"
BARE = "bare pyfuse3 file system, one cached buffer (ceiling)"
RAW = "raw backing file"


def _mounts_under(directory: Path) -> list[str]:
    with open("/proc/mounts") as mounts:
        points = [line.split()[1].encode().decode("unicode_escape") for line in mounts]
    return [point for point in points if point.startswith(f"{directory}/")]


def test_bench_mount_quick_run_reports_every_figure_and_leaves_no_mount(tmp_path):
    work = tmp_path / "work"  # the case's temporary directories (store, mount points) go here
    work.mkdir()
    output = tmp_path / "out"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--case", "mount", "--quick", "--runs", "1", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, TMPDIR=str(work)))

    left = _mounts_under(tmp_path)
    for point in left:  # never break later tests, whatever this one finds
        subprocess.run(["fusermount3", "-u", "-z", point], capture_output=True)
    assert not left, f"the benchmark left mounts behind: {left}"
    assert os.listdir(work) == [], "the benchmark left its temporary directory behind"
    # (CI reaches PyPI: a failed download of passthroughfs.py is a failure like any other)
    assert result.returncode == 0, result.stdout + result.stderr

    report = json.loads((output / "bench.json").read_text())
    figures = [r for r in report["results"] if r["case"] == "mount"]
    assert figures and len(figures) == len(report["results"])
    for figure in figures:
        assert figure["unit"] in ("MB/s", "reads/s")
        assert figure["value"] > 0 and figure["anchor_value"] > 0
        assert figure["ratio"] == pytest.approx(figure["value"] / figure["anchor_value"], rel=1e-9)
        assert figure["runs"] == 1 and figure["command"] == "scripts/bench --case mount --runs 1 --quick"
        assert figure["details"]["bytes"] == 32 << 20
        assert figure["anchor"] in (PASSTHROUGH, BARE, RAW)
        per_run = figure["details"]["per_run"]
        assert set(per_run) == {"mount", {PASSTHROUGH: "passthrough", BARE: "bare", RAW: "raw"}[figure["anchor"]]}
        for runs in per_run.values():
            assert len(runs) == 1 and runs[0] > 0
        assert len(figure["details"]["ratio_per_run"]) == 1
        cpu = figure["details"]["cpu_us_per_op"]  # CPU time per MiB (per read): daemon and benchmark
        assert set(cpu) == set(per_run) and cpu["mount"]["daemon"] is not None
        assert (cpu["raw"]["daemon"] is None) if "raw" in cpu else all(c["daemon"] is not None for c in cpu.values())
    by_regime: dict[str, list[dict]] = {}
    for figure in figures:
        by_regime.setdefault(figure["details"]["regime"], []).append(figure)
    # As root the cold figures (page cache dropped before each read) are there too.
    expected = {"fuse": {BARE, PASSTHROUGH, RAW}, "kept": {PASSTHROUGH}, "random": {BARE, PASSTHROUGH, RAW}, "write": {BARE, PASSTHROUGH, RAW}}
    if os.geteuid() == 0:
        expected["cold"] = {PASSTHROUGH, RAW}
    assert {regime: {f["anchor"] for f in found} for regime, found in by_regime.items()} == expected
    targets = {
        ("cold", PASSTHROUGH): 2.0,
        ("fuse", BARE): 0.8,
        ("fuse", PASSTHROUGH): 2.0,
        ("random", BARE): 0.8,
        ("random", PASSTHROUGH): 2.0,
        ("write", PASSTHROUGH): 1.5,
    }
    for regime, found in by_regime.items():
        # One regime's figures share the mount's value: the same runs, judged against each anchor.
        assert len({(f["figure"], f["value"]) for f in found}) == 1
        for figure in found:
            assert figure["target"] == targets.get((regime, figure["anchor"]))
    (random_figure, *_) = by_regime["random"]
    assert random_figure["unit"] == "reads/s" and random_figure["details"]["reads"] == 2_000
    assert random_figure["details"]["read_size"] == 4096
    (write_figure, *_) = by_regime["write"]
    assert write_figure["details"]["fsync"] is False and "no fsync" in write_figure["figure"]
    assert all(f["unit"] == "MB/s" for regime in ("fuse", "kept", "write") for f in by_regime[regime])
    assert "| mount |" in result.stdout


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

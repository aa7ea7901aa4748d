"""Case mount: an object's `data` through the mount, read and written, vs a bare pyfuse3 file
system (the ceiling), pyfuse3's examples/passthroughfs.py and the raw backing file."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .common import (
    DROP_CACHES,
    BenchError,
    MiB,
    Result,
    _command,
    _fill,
    _lazy_unmount,
    _mounted,
    drop_caches,
    evict,
    fusepager_mount,
    progress,
    read_throughput,
)
from .passthrough import (
    _read_ahead_kb,
    foreground_mount,
    passthrough_example,
    passthrough_mount,
)

CASE = "mount"
PAGE = 4096
RANDOM_SEED = 4
BARE_FS = Path(__file__).with_name("bare_fs.py")

PASSTHROUGH = "pyfuse3 examples/passthroughfs.py, same file"
BARE = "bare pyfuse3 file system, one cached buffer (ceiling)"
RAW = "raw backing file"
READ_TARGETS = {"bare": 0.8, "passthrough": 2.0}
WRITE_TARGETS = {"passthrough": 1.5}


def bare_mount(mountpoint: Path, size: int, log: Path):
    """scripts/benchmarks/bare_fs.py serving one `data` file of `size` bytes at `mountpoint`,
    with fusepager's FUSE options and read-ahead (in place once it says so)."""
    from .bare_fs import READY

    return foreground_mount([sys.executable, str(BARE_FS), str(mountpoint), str(size)], mountpoint, log, ready=READY)


def write_throughput(path: Path, size: int, block: bytes) -> float:
    """MB/s of writing `size` bytes over the file in 1 MiB writes, timed from open to close (no
    fsync).  Without a writeback cache (none of the daemons asks for one) each write(2) to a FUSE
    file returns once its daemon has answered, so at close every byte is with the daemon:
    for the mount and the example, in the backing file's page cache, as for the raw file.
    (The case runs os.sync() first, untimed: no writeback of earlier work runs beside it.)"""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in range(0, size, MiB):
            piece = block[: min(MiB, size - offset)]
            if os.pwrite(fd, piece, offset) != len(piece):
                raise BenchError(f"short write to {path} at {offset}")
    finally:
        os.close(fd)
    return size / (time.perf_counter() - start) / 1e6


def random_read_rate(path: Path, offsets: list[int]) -> float:
    """4 KiB preads per second at `offsets`, with POSIX_FADV_RANDOM (Linux reads no more than
    asked: one FUSE read per pread that misses its cache), timed from open to close."""
    buffer = bytearray(PAGE)
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for offset in offsets:
            if os.preadv(fd, [buffer], offset) != PAGE:
                raise BenchError(f"short read of {path} at {offset}")
    finally:
        os.close(fd)
    return len(offsets) / (time.perf_counter() - start)


def case_mount(args: argparse.Namespace) -> list[Result]:
    """One object's `data` through the mount (`fusepager mount`), beside three anchors over the
    same bytes: bare_fs.py (pyfuse3 answering from one cached buffer, discarding writes, with
    fusepager's FUSE options: the most any pyfuse3 file system gets here), pyfuse3's
    passthroughfs.py over the object's directory in the store, and the backing file itself.
    Every run measures each figure for all of them in turn, in a rotating order (a shared
    machine drifts); the median of the runs is reported.

    Figures:
      read, cold   sequential 1 MiB reads, drop_caches before each (disk, Linux and the daemon;
                   skipped where drop_caches cannot be written, and said so); no bare anchor,
                   which has no disk
      read, fuse   sequential 1 MiB reads, the backing file cached and the FUSE file's own pages
                   evicted before each: every byte comes through the daemon
      read, kept   for information, a repeat read with whatever Linux keeps cached between opens
      random       4 KiB preads at seeded random pages (POSIX_FADV_RANDOM), regime as "fuse"
      write        sequential 1 MiB writes over the existing bytes (O_WRONLY), open to close, no
                   fsync: without a writeback cache every write(2) returns once the daemon has
                   the bytes (in the backing file's page cache), so close is a fair end; an
                   fsync would time the disk, the same for all
    """
    size = 32 * MiB if args.quick else 1024 * MiB
    reads = 2_000 if args.quick else 20_000
    size_text = f"{size // MiB} MiB" if size < 1024 * MiB else f"{size // (1024 * MiB)} GiB"
    pages = random.Random(RANDOM_SEED)
    offsets = [pages.randrange(size // PAGE) * PAGE for _ in range(reads)]
    example = passthrough_example(args.cache)
    cold = drop_caches()
    names = ["mount", "bare", "passthrough", "raw"]
    figures = (["cold"] if cold else []) + ["fuse", "kept", "random", "write"]
    systems = {
        "cold": ["mount", "passthrough", "raw"],
        "fuse": names,
        "kept": ["mount", "passthrough"],  # the raw file's cache is the "fuse" regime's raw figure
        "random": names,
        "write": names,
    }
    values: dict[str, dict[str, list[float]]] = {figure: {name: [] for name in systems[figure]} for figure in figures}
    cpu: dict[str, dict[str, list[tuple[float | None, float]]]] = {figure: {name: [] for name in systems[figure]} for figure in figures}
    with tempfile.TemporaryDirectory(prefix="fusepager-bench-") as work:
        work_path = Path(work)
        store, mnt, mnt_passthrough, mnt_bare = (work_path / name for name in ("store", "mnt", "mnt-passthrough", "mnt-bare"))
        for directory in (store, mnt, mnt_passthrough, mnt_bare):
            directory.mkdir()
        try:
            with fusepager_mount(store, mnt) as mount_pid:
                progress(f"mount: writing {size_text} through the mount")
                (mnt / "objects" / "big").mkdir()
                block = _fill(mnt / "objects" / "big" / "data", size)
                backing = store / "objects" / "big" / "data"
                recorded = json.loads((backing.parent / "meta.json").read_text())["size"]
                if recorded != size or backing.stat().st_size != size:
                    raise BenchError(f"the store holds {backing.stat().st_size} bytes, meta.json says {recorded}; expected {size}")
                with (
                    passthrough_mount(example, backing.parent, mnt_passthrough, work_path / "passthroughfs.log") as passthrough,
                    bare_mount(mnt_bare, size, work_path / "bare_fs.log") as bare,
                ):
                    daemons = {"mount": mount_pid, "bare": bare.pid, "passthrough": passthrough.pid, "raw": None}
                    paths = {
                        "mount": mnt / "objects" / "big" / "data",
                        "bare": mnt_bare / "data",
                        "passthrough": mnt_passthrough / "data",
                        "raw": backing,
                    }
                    _check_contents(paths, block)
                    mountpoints = {"mount": mnt, "bare": mnt_bare, "passthrough": mnt_passthrough}
                    read_ahead = {name: _read_ahead_kb(point) for name, point in mountpoints.items()}
                    for name, path in paths.items():
                        # Untimed: a daemon's first long read and write are its slowest
                        # (passthroughfs.py's first read is about a third of its later speed),
                        # and the targets compare steady states.
                        progress(f"mount: warm-up, {name}")
                        read_throughput(path, size)
                        os.sync()
                        write_throughput(path, size, block)
                    prepare: dict[str, Callable[[str], object]] = {  # untimed
                        "cold": lambda name: drop_caches(),
                        "fuse": lambda name: _only_through_fuse(paths, backing, name, size),
                        "kept": lambda name: None,
                        "random": lambda name: _only_through_fuse(paths, backing, name, size),
                        "write": lambda name: os.sync(),
                    }
                    measure: dict[str, Callable[[str], float]] = {
                        "cold": lambda name: read_throughput(paths[name], size),
                        "fuse": lambda name: read_throughput(paths[name], size),
                        "kept": lambda name: read_throughput(paths[name], size),
                        "random": lambda name: random_read_rate(paths[name], offsets),
                        "write": lambda name: write_throughput(paths[name], size, block),
                    }
                    for run in range(args.runs):
                        for figure in figures:
                            order = systems[figure][run % len(systems[figure]) :] + systems[figure][: run % len(systems[figure])]
                            operations = reads if figure == "random" else size / MiB
                            for name in order:
                                progress(f"mount: run {run + 1}/{args.runs}, {figure}, {name}")
                                prepare[figure](name)
                                daemon, own = _cpu_seconds(daemons[name]), _own_cpu_seconds()
                                values[figure][name].append(measure[figure](name))
                                cpu[figure][name].append(_cpu_per_operation(daemons[name], daemon, own, operations))
                    _check_contents({name: paths[name] for name in ("mount", "passthrough", "raw")}, block)
        finally:
            left = [point for point in (mnt, mnt_passthrough, mnt_bare) if _mounted(point)]
            for point in left:
                _lazy_unmount(point)
        if left:
            raise BenchError(f"left mounted, lazily unmounted now: {' '.join(map(str, left))}")
    command = _command(CASE, args)
    origin = example.with_suffix(".source")
    details = {
        "bytes": size,
        "read_ahead_kb": read_ahead,
        "passthroughfs": origin.read_text().strip() if origin.exists() else str(example),
        "drop_caches": cold,
    }
    described = {
        "cold": (f"sequential read of {size_text} (1 MiB reads), page cache dropped before each read", "MB/s"),
        "fuse": (f"sequential read of {size_text} (1 MiB reads), backing file cached, FUSE pages evicted before each read", "MB/s"),
        "kept": (f"repeat read of {size_text} (1 MiB reads), what Linux keeps cached between opens", "MB/s"),
        "random": (
            f"{reads:,} random 4 KiB reads of {size_text} (seed {RANDOM_SEED}, POSIX_FADV_RANDOM), backing file cached, FUSE pages evicted",
            "reads/s",
        ),
        "write": (f"sequential write of {size_text} (1 MiB writes over it, O_WRONLY), open to close, no fsync", "MB/s"),
    }
    extra = {
        "cold": {"read_size": MiB},
        "fuse": {"read_size": MiB},
        "kept": {"read_size": MiB},
        "random": {"read_size": PAGE, "reads": reads, "seed": RANDOM_SEED},
        "write": {"write_size": MiB, "fsync": False},
    }
    anchors = {"bare": BARE, "passthrough": PASSTHROUGH, "raw": RAW}
    results = []
    for figure in figures:
        text, unit = described[figure]
        medians = {name: statistics.median(runs) for name, runs in values[figure].items()}
        targets = WRITE_TARGETS if figure == "write" else {} if figure == "kept" else READ_TARGETS
        for anchor in ("bare", "passthrough", "raw"):
            if anchor not in medians:
                continue
            per_run = {key: [round(v, 1) for v in values[figure][key]] for key in ("mount", anchor)}
            # Each run measures the mount and the anchor one after the other: on a shared
            # machine the ratio within a run drifts less than either figure does.
            ratios = [m / a for m, a in zip(values[figure]["mount"], values[figure][anchor])]
            results.append(
                Result(
                    CASE, text, unit, medians["mount"], anchors[anchor], medians[anchor], medians["mount"] / medians[anchor],
                    targets.get(anchor), args.runs, command,
                    details={
                        **details, **extra[figure], "regime": figure, "per_run": per_run,
                        "ratio_per_run": [round(r, 3) for r in ratios], "median_ratio_of_runs": round(statistics.median(ratios), 3),
                        # CPU time per MiB (per read for random reads), medians of the runs: the
                        # daemon's (none for the raw file) and this process's (the reads and
                        # writes, Linux's side of them included).  Less at the mercy of a busy
                        # machine than the throughputs.
                        "cpu_us_per_op": {key: _cpu_medians(cpu[figure][key]) for key in ("mount", anchor)},
                    },
                )
            )
    if not cold:
        print(f"mount: cannot write {DROP_CACHES} (not root?): no cold-cache figures", file=sys.stderr)
    return results


def _only_through_fuse(paths: dict[str, Path], backing: Path, name: str, size: int) -> None:
    """The backing file cached and the FUSE file's own pages evicted: every byte read next goes
    through the daemon, and the disk plays no part."""
    read_throughput(backing, size)  # cached, if it was not
    if name != "raw":
        evict(paths[name])


def _cpu_seconds(pid: int | None) -> float | None:
    """User and system CPU time of process `pid` so far (None when there is no such daemon)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _cpu_per_operation(pid: int | None, daemon: float | None, own: float, operations: float) -> tuple[float | None, float]:
    """Microseconds of CPU per operation since `daemon` (the daemon's) and `own` (ours) were read."""
    now = _cpu_seconds(pid)
    used = None if now is None or daemon is None else (now - daemon) / operations * 1e6
    return used, (_own_cpu_seconds() - own) / operations * 1e6


def _cpu_medians(samples: list[tuple[float | None, float]]) -> dict[str, float | None]:
    daemon = [d for d, _ in samples if d is not None]
    return {
        "daemon": round(statistics.median(daemon), 1) if daemon else None,
        "benchmark": round(statistics.median(b for _, b in samples), 1),
    }


def _check_contents(paths: dict[str, Path], block: bytes) -> None:
    for path in paths.values():
        with open(path, "rb") as data:
            if data.read(MiB) != block:
                raise BenchError(f"{path} does not read back what was written")


ORDER = 4  # where the case comes in a full run (the numbering)
CASES = {CASE: case_mount}

"""Case mount-read: sequential reads of an object's `data` through the mount, vs passthrough and raw."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
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
from .passthrough import _read_ahead_kb, passthrough_example, passthrough_mount


def case_mount_read(args: argparse.Namespace) -> list[Result]:
    """Sequential reads of one object's `data`: the mount, pyfuse3's passthroughfs.py over the
    object's directory in the store, and the backing file itself.  Every run reads all three,
    in turn (a shared machine drifts); each read is timed from open to the last byte.

    Two page-cache regimes:
      cold  drop_caches before each read: disk, Linux and the daemon (skipped where
            drop_caches cannot be written, and said so)
      fuse  the backing file cached, the FUSE file's own pages evicted before each read: every
            byte comes through the daemon, the disk plays no part
    and, for information, a repeat read with whatever Linux keeps cached between opens."""
    size = 32 * MiB if args.quick else 1024 * MiB
    size_text = f"{size // MiB} MiB" if size < 1024 * MiB else f"{size // (1024 * MiB)} GiB"
    example = passthrough_example(args.cache)
    cold = drop_caches()
    regimes = (["cold"] if cold else []) + ["fuse", "kept"]
    names = ["mount", "passthrough", "raw"]
    values: dict[str, dict[str, list[float]]] = {regime: {name: [] for name in names} for regime in regimes}
    with tempfile.TemporaryDirectory(prefix="fusepager-bench-") as work:
        work_path = Path(work)
        store, mnt, mnt2 = work_path / "store", work_path / "mnt", work_path / "mnt2"
        for directory in (store, mnt, mnt2):
            directory.mkdir()
        try:
            with fusepager_mount(store, mnt):
                progress(f"mount-read: writing {size_text} through the mount")
                (mnt / "objects" / "big").mkdir()
                block = _fill(mnt / "objects" / "big" / "data", size)
                backing = store / "objects" / "big" / "data"
                recorded = json.loads((backing.parent / "meta.json").read_text())["size"]
                if recorded != size or backing.stat().st_size != size:
                    raise BenchError(f"the store holds {backing.stat().st_size} bytes, meta.json says {recorded}; expected {size}")
                with passthrough_mount(example, backing.parent, mnt2, work_path / "passthroughfs.log"):
                    paths = {"mount": mnt / "objects" / "big" / "data", "passthrough": mnt2 / "data", "raw": backing}
                    for path in paths.values():
                        with open(path, "rb") as data:
                            if data.read(MiB) != block[: min(MiB, size)]:
                                raise BenchError(f"{path} does not read back what was written")
                    read_ahead = {name: _read_ahead_kb(path) for name, path in (("mount", mnt), ("passthrough", mnt2))}
                    for name, path in paths.items():
                        # Untimed: a daemon's first long read is its slowest (passthroughfs.py's
                        # is about a third of its later speed), and the targets compare steady states.
                        progress(f"mount-read: warm-up read, {name}")
                        read_throughput(path, size)
                    for run in range(args.runs):
                        order = names[run % 3 :] + names[: run % 3]
                        for regime in regimes:
                            for name in order:
                                if regime == "kept" and name == "raw":
                                    continue  # the raw file's cache is the "fuse" regime's raw figure
                                progress(f"mount-read: run {run + 1}/{args.runs}, {regime}, {name}")
                                if regime == "cold":
                                    drop_caches()
                                elif regime == "fuse":
                                    read_throughput(backing, size)  # cached, if it was not
                                    if name != "raw":
                                        evict(paths[name])
                                values[regime][name].append(read_throughput(paths[name], size))
        finally:
            left = [point for point in (mnt, mnt2) if _mounted(point)]
            for point in left:
                _lazy_unmount(point)
        if left:
            raise BenchError(f"left mounted, lazily unmounted now: {' '.join(map(str, left))}")
    medians = {regime: {name: statistics.median(v) for name, v in runs.items() if v} for regime, runs in values.items()}
    command = _command("mount-read", args)
    origin = example.with_suffix(".source")
    details = {
        "bytes": size,
        "read_size": MiB,
        "read_ahead_kb": read_ahead,
        "passthroughfs": origin.read_text().strip() if origin.exists() else str(example),
        "drop_caches": cold,
    }
    figures = {
        "cold": f"sequential read of {size_text} (1 MiB reads), page cache dropped before each read",
        "fuse": f"sequential read of {size_text} (1 MiB reads), backing file cached, FUSE pages evicted before each read",
        "kept": f"repeat read of {size_text} (1 MiB reads), what Linux keeps cached between opens",
    }
    anchors = {"passthrough": ("pyfuse3 examples/passthroughfs.py, same file", 2.0), "raw": ("raw backing file", None)}
    results = []
    for regime in regimes:
        for anchor in (["passthrough", "raw"] if regime != "kept" else ["passthrough"]):
            name, target = anchors[anchor]
            mount, other = medians[regime]["mount"], medians[regime][anchor]
            runs = {key: [round(v, 1) for v in values[regime][key]] for key in ("mount", anchor)}
            results.append(
                Result(
                    "mount-read", figures[regime], "MB/s", mount, name, other, mount / other,
                    target if regime != "kept" else None, args.runs, command,
                    details={**details, "regime": regime, "runs_MB_per_s": runs},
                )
            )
    if not cold:
        print(f"mount-read: cannot write {DROP_CACHES} (not root?): no cold-cache figures", file=sys.stderr)
    return results


ORDER = 4  # where the case comes in a full run (the numbering)
CASES = {"mount-read": case_mount_read}

"""fusepager benchmarks: each case measured beside the anchor it is judged against, in one run.

Run with `scripts/bench` (which sets up first).  Every figure is the median of --runs runs; the
ratio to the anchor is what matters, since the machine is shared and absolute figures drift.
Results go to bench-results/bench.json and a Markdown table on stdout.

Cases:
  fault-rate   single-page faults per second of a task touching N pages served by an
               in-process manager, vs a trio memory-channel ping-pong (round trips per second)
               between two tasks.  Target: ratio >= 0.5.
  mount-read   sequential read (1 MiB reads) of a 1 GiB object's `data` through the mount
               (`fusepager mount`), vs pyfuse3's examples/passthroughfs.py over the same file
               (from pyfuse3's source distribution, downloaded at benchmark time and cached in
               bench-results/cache, never committed) and vs the raw backing file.  Target:
               >= 2x the passthrough example, with the page cache dropped before each read
               (cold; root only) and with the backing file cached but every byte going through
               the FUSE daemon.  A repeat read with Linux's cache kept is shown for information.
  ping-pong    write ownership of one page moving between two kernels (4 KiB pages), each
               write taking the page from the other: transfers per second, beside the
               single-page fault rate.
  cross-process  single-page faults per second of a kernel in this process served by a
               `fusepager mount` in another (over its Unix socket), vs a trio socket
               ping-pong between two processes carrying the same sizes (a request of 64
               bytes, an answer of one page).  Target for [6/8]: ratio >= 0.6.
  stream-64    a kernel limited to 64 resident pages writes then reads a 64 MiB object through
               the engine and the file store (pageout all the way), vs writing then reading the
               same bytes in a raw file.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

import kernelsim
from kernelsim import calls
from kernelsim import messages as m
from kernelsim.interface import MEMORY_OBJECT_COPY_DELAY

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    case: str
    figure: str
    unit: str
    value: float
    anchor: str
    anchor_value: float
    ratio: float
    target: float | None
    runs: int
    command: str
    details: dict[str, Any] | None = None  # per-run figures and conditions, for the JSON


def progress(text: str) -> None:
    print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)


# --- case: fault-rate ------------------------------------------------------------------------


async def ping_pong_rate(round_trips: int) -> float:
    """Round trips per second between two trio tasks over a pair of memory channels."""
    to_server, server_in = trio.open_memory_channel(0)
    to_client, client_in = trio.open_memory_channel(0)

    async def server() -> None:
        async for item in server_in:
            await to_client.send(item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        start = time.perf_counter()
        for index in range(round_trips):
            await to_server.send(index)
            await client_in.receive()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return round_trips / elapsed


async def fault_rate(pages: int, page_size: int = 4096) -> float:
    """Single-page faults per second: a task reads one byte of each of `pages` pages."""
    port = kernelsim.port_allocate("bench object")
    page = bytes(page_size)

    async def manager() -> None:
        async for received in port:
            message = received.message
            if isinstance(message, m.MemoryObjectDataRequest):
                calls.memory_object_data_supply(message.control, message.offset, page * (message.length // page_size))
            elif isinstance(message, m.MemoryObjectInit):
                calls.memory_object_ready(message.control, False, MEMORY_OBJECT_COPY_DELAY)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager)
        async with kernelsim.boot("bench", page_size, pages + 1, cluster_pages=1) as kernel:
            task = await kernel.task_create()
            address = await task.vm_map(port.make_send(), pages * page_size)
            await task.read(address, 1)  # init and ready are not part of the rate
            start = time.perf_counter()
            for index in range(1, pages):
                await task.read(address + index * page_size, 1)
            elapsed = time.perf_counter() - start
            assert kernel.stats.data_requests == pages
        nursery.cancel_scope.cancel()
    return (pages - 1) / elapsed


def median_of(runs: int, label: str, measure: Callable[[], float]) -> float:
    values = []
    for run in range(runs):
        progress(f"{label}: run {run + 1}/{runs}")
        values.append(measure())
    return statistics.median(values)


def case_fault_rate(args: argparse.Namespace) -> Result:
    pages = 500 if args.quick else 20000
    command = f"scripts/bench --case fault-rate --runs {args.runs}" + (" --quick" if args.quick else "")
    faults = median_of(args.runs, "fault-rate: task faults", lambda: trio.run(fault_rate, pages))
    ping = median_of(args.runs, "fault-rate: memory-channel ping-pong", lambda: trio.run(ping_pong_rate, pages))
    return Result(
        case="fault-rate",
        figure=f"single-page faults/s ({pages} pages, in-process manager)",
        unit="faults/s",
        value=faults,
        anchor="trio memory-channel ping-pong",
        anchor_value=ping,
        ratio=faults / ping,
        target=0.5,
        runs=args.runs,
        command=command,
    )


def _command(case: str, args: argparse.Namespace) -> str:
    return f"scripts/bench --case {case} --runs {args.runs}" + (" --quick" if args.quick else "")


# --- case: mount-read ------------------------------------------------------------------------

MiB = 1 << 20
MB = 1_000_000
VENV_BIN = Path(sys.executable).parent
PYPI_SIMPLE = "https://pypi.org/simple/{name}/"
PYPI_JSON = "https://pypi.org/pypi/{name}/{version}/json"
MOUNT_TIMEOUT = 30.0
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


class BenchError(Exception):
    """A case cannot be measured; the message says why."""


def _fusepager(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI, as a user runs it: .venv/bin/fusepager ARGV."""
    script = VENV_BIN / "fusepager"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fusepager"]
    return subprocess.run([*command, *argv], capture_output=True, text=True, timeout=timeout)


def _mounted(mountpoint: Path) -> bool:
    from fusepager.mount import mount_entry

    return mount_entry(mountpoint) is not None


def _wait_mounted(mountpoint: Path, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not _mounted(mountpoint):
        if process.poll() is not None:
            raise BenchError(f"{process.args[1]} exited with status {process.returncode} before mounting:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{mountpoint} was not mounted within {MOUNT_TIMEOUT:.0f} s:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(path: Path, characters: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-characters:]
    except OSError:
        return ""


def _lazy_unmount(mountpoint: Path) -> None:
    if _mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def _end_daemon(pid: int, mountpoint: Path) -> None:
    """The fusepager daemon (not our child: it runs in its own session) must be gone; it only
    gets a signal if /proc still shows it serving `mountpoint`."""
    deadline = time.monotonic() + 10
    for signal_number in (None, signal.SIGTERM, signal.SIGKILL):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return  # gone
        if os.fsencode(mountpoint) not in command:
            return  # the pid is someone else's now
        if signal_number is not None:
            os.kill(pid, signal_number)
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        deadline = time.monotonic() + 10


@contextmanager
def fusepager_mount(store: Path, mountpoint: Path, listening: list[str] | None = None):
    """`fusepager mount STORE MNT` (in the background), unmounted and its daemon ended on exit,
    whatever happened.  Yields the daemon's pid; `listening`, if given, gets the address
    kernels connect to."""
    pid = None
    try:
        result = _fusepager("mount", str(store), str(mountpoint))
        found = re.search(r"\(pid (\d+)\)", result.stdout)
        pid = int(found[1]) if found else None
        if result.returncode != 0:
            raise BenchError(f"fusepager mount {store} {mountpoint} failed:\n{result.stdout}{result.stderr}")
        address = re.search(r"kernels connect to (\S+)", result.stdout)
        if listening is not None:
            if address is None:
                raise BenchError(f"fusepager mount did not say where kernels connect:\n{result.stdout}")
            listening.append(address[1])
        yield pid
    finally:
        if _mounted(mountpoint):
            _fusepager("umount", str(mountpoint))  # waits for the daemon to finish
        _lazy_unmount(mountpoint)
        if pid is not None:
            _end_daemon(pid, mountpoint)


@contextmanager
def passthrough_mount(example: Path, source: Path, mountpoint: Path, log: Path):
    """pyfuse3's passthroughfs.py mirroring `source` at `mountpoint` (it stays in the
    foreground: our child); unmounted and the process ended on exit, whatever happened."""
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, str(example), str(source), str(mountpoint)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_mounted(mountpoint, process, log)
        yield process
    finally:
        if _mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        try:
            process.wait(timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _lazy_unmount(mountpoint)


def _read_ahead_kb(mountpoint: Path) -> int | None:
    """Linux's read-ahead for a FUSE mount (it sets how big FUSE's read requests get)."""
    try:
        device = os.stat(mountpoint).st_dev
        return int(Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb").read_text())
    except (OSError, ValueError):
        return None


def drop_caches() -> bool:
    """Write back, then drop Linux's clean page cache (all of it); False where not allowed."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def evict(path: Path) -> None:
    """Drop one file's cached pages (a FUSE file's own pages; its backing file keeps its own)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_throughput(path: Path, size: int) -> float:
    """MB/s of reading the whole file in 1 MiB reads; it must hold exactly `size` bytes."""
    buffer = bytearray(MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        total = 0
        start = time.perf_counter()
        while count := os.readv(fd, [buffer]):
            total += count
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    if total != size:
        raise BenchError(f"read {total} bytes of {path}, expected {size}")
    return total / elapsed / MB


def _sdist_link(name: str, version: str) -> tuple[str, str]:
    """(url, sha256) of NAME==VERSION's source distribution, from PyPI's simple index (JSON,
    PEP 691) or else its JSON API."""
    filename = f"{name}-{version}.tar.gz".lower()
    problems = []
    try:
        request = urllib.request.Request(PYPI_SIMPLE.format(name=name), headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            index = json.load(response)
        for file in index.get("files", []):
            if file.get("filename", "").lower() == filename and file.get("hashes", {}).get("sha256"):
                return file["url"], file["hashes"]["sha256"]
        problems.append(f"{filename} is not in {PYPI_SIMPLE.format(name=name)}")
    except (OSError, ValueError) as error:
        problems.append(f"{PYPI_SIMPLE.format(name=name)}: {error}")
    try:
        with urllib.request.urlopen(PYPI_JSON.format(name=name, version=version), timeout=60) as response:
            release = json.load(response)
        for file in release.get("urls", []):
            if file.get("packagetype") == "sdist" and file.get("filename", "").lower() == filename:
                return file["url"], file["digests"]["sha256"]
        problems.append(f"no {filename} in {PYPI_JSON.format(name=name, version=version)}")
    except (OSError, ValueError, KeyError) as error:
        problems.append(f"{PYPI_JSON.format(name=name, version=version)}: {error}")
    raise BenchError("; ".join(problems))


def _download_sdist(name: str, version: str, directory: Path) -> tuple[Path, str]:
    """The sdist in `directory`, and where it came from.  The index first (quick, checked
    against its sha256); `pip download` if that fails (slow: pip builds the sdist's metadata,
    Cython and all)."""
    try:
        url, sha256 = _sdist_link(name, version)
        archive = directory / url.rsplit("/", 1)[-1].split("#", 1)[0]
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=300) as response, open(archive, "wb") as output:
            while block := response.read(MiB):
                digest.update(block)
                output.write(block)
        if digest.hexdigest() != sha256:
            raise BenchError(f"{url}: sha256 {digest.hexdigest()}, the index says {sha256}")
        return archive, f"{url} sha256={sha256}"
    except (OSError, BenchError) as error:
        index_problem = error
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"{name}=={version}", "-d", str(directory)],
        capture_output=True, text=True, timeout=1800,
    )
    archives = sorted(directory.glob(f"{name}-*.tar.gz"))
    if not archives:
        raise BenchError(f"cannot download {name} {version}'s source distribution: {index_problem}; pip download: {pip.stderr.strip()[-500:]}")
    return archives[0], f"pip download {name}=={version}"


def passthrough_example(cache: Path) -> Path:
    """pyfuse3's own examples/passthroughfs.py, from the source distribution of the installed
    pyfuse3: downloaded once into `cache` (bench-results/cache: git-ignored), never part of the
    repository.  Where it came from is in passthroughfs-VERSION.source beside it."""
    version = importlib.metadata.version("pyfuse3")
    target = cache / f"passthroughfs-{version}.py"
    if target.is_file():
        return target
    progress(f"mount-read: downloading pyfuse3 {version}'s source distribution for examples/passthroughfs.py")
    with tempfile.TemporaryDirectory(prefix="fusepager-bench-sdist-") as download:
        archive, origin = _download_sdist("pyfuse3", version, Path(download))
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.split("/")[1:] == ["examples", "passthroughfs.py"]]
            if len(members) != 1:
                raise BenchError(f"{archive.name} has no single examples/passthroughfs.py")
            source = tar.extractfile(members[0]).read()
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(source)
    os.replace(partial, target)
    target.with_suffix(".source").write_text(f"{members[0].name} from {origin}\n")
    return target


def _fill(path: Path, size: int) -> bytes:
    """Write `size` bytes of random data (no holes) to `path` in 1 MiB writes; fsync makes the
    store record the size in meta.json.  The first MiB, to check reads against."""
    block = random.Random(1).randbytes(MiB)
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in range(0, size, MiB):
            piece = block[: min(MiB, size - offset)]
            if os.pwrite(fd, piece, offset) != len(piece):
                raise BenchError(f"short write to {path} at {offset}")
        os.fsync(fd)
    finally:
        os.close(fd)
    return block


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


# --- case: ping-pong -------------------------------------------------------------------------


class _BytesObject:
    """In-memory pager callbacks: the benchmarks measure the protocol, not a disk."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    async def read_pages(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    async def write_pages(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    async def report_extent(self) -> int:
        return len(self.data)

    async def unlock_pages(self, offset: int, length: int, access: int) -> None:
        pass

    async def pages_evicted(self, offset: int, length: int) -> None:
        pass


async def ownership_rate(transfers: int) -> float:
    from fusepager.pager import Pager

    pager = Pager(_BytesObject(1 << 20), name="pingpong")
    async with trio.open_nursery() as nursery:
        await nursery.start(pager.serve)
        async with kernelsim.boot("k1", 4096, 64) as k1, kernelsim.boot("k2", 4096, 64) as k2:
            tasks = [await kernel.task_create() for kernel in (k1, k2)]
            addresses = [await task.vm_map(pager.send_right(), 1 << 20) for task in tasks]
            await tasks[1].write(addresses[1], b"\0")
            start = time.perf_counter()
            for index in range(transfers):
                which = index % 2
                await tasks[which].write(addresses[which] + 8, index.to_bytes(4, "little"))
            elapsed = time.perf_counter() - start
            final = await tasks[0].read(addresses[0] + 8, 4)
            assert int.from_bytes(final, "little") == transfers - 1, "a transfer lost a write"
        nursery.cancel_scope.cancel()
    return transfers / elapsed


def case_ping_pong(args: argparse.Namespace) -> list[Result]:
    transfers = 200 if args.quick else 5000
    rate = median_of(args.runs, "ping-pong: ownership transfers", lambda: trio.run(ownership_rate, transfers))
    faults = median_of(args.runs, "ping-pong: single-page faults", lambda: trio.run(fault_rate, transfers))
    return [
        Result("ping-pong", f"write ownership of one page between two kernels ({transfers} transfers)", "transfers/s",
               rate, "single-page fault rate", faults, rate / faults, None, args.runs, _command("ping-pong", args))
    ]


# --- case: cross-process --------------------------------------------------------------------

PONG_REQUEST = 64


async def _pong_server(path: str) -> None:
    """The other process of the socket ping-pong: answer each 64-byte request with a page."""
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    print("listening", flush=True)
    stream = trio.SocketStream((await listener.accept())[0])
    answer = bytes(4096)
    buffered = 0
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buffered += len(data)
        while buffered >= PONG_REQUEST:
            buffered -= PONG_REQUEST
            await stream.send_all(answer)


async def socket_ping_pong_rate(path: str, round_trips: int) -> float:
    """Round trips per second with `_pong_server` in another process: a request of 64 bytes,
    an answer of 4096, one at a time."""
    stream = await trio.open_unix_socket(path)
    request = bytes(PONG_REQUEST)

    async def round_trip() -> None:
        await stream.send_all(request)
        got = 0
        while got < 4096:
            got += len(await stream.receive_some(65536))

    await round_trip()
    start = time.perf_counter()
    for _ in range(round_trips):
        await round_trip()
    elapsed = time.perf_counter() - start
    await stream.aclose()
    return round_trips / elapsed


def ping_pong_between_processes(round_trips: int, directory: Path) -> float:
    path = str(directory / "pong.sock")
    server = subprocess.Popen([sys.executable, __file__, "--pong-server", path], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        return trio.run(socket_ping_pong_rate, path, round_trips)
    finally:
        server.kill()
        server.wait()
        os.unlink(path)


async def cross_process_fault_rate(address: str, name: str, pages: int) -> float:
    """Single-page faults per second of a kernel here, its object served by the manager at
    `address` (another process): one byte read in each of `pages` pages."""
    from kernelsim.transport import Address, Connection

    stream = await Address.parse(address).connect()
    connection = Connection(stream, local_name="bench")
    async with trio.open_nursery() as nursery:
        await nursery.start(connection.run)
        reply = kernelsim.port_allocate("lookup reply")
        connection.peer_bootstrap.send(m.NetnameLookUp(name=name.encode(), reply=reply.make_send_once()))
        answer = (await reply.receive()).message
        if answer.port is None:
            raise BenchError(f"the manager has no object {name!r}")
        async with kernelsim.boot("bench", 4096, pages + 1, cluster_pages=1) as kernel:
            task = await kernel.task_create()
            address_in_task = await task.vm_map(answer.port, pages * 4096)
            await task.read(address_in_task, 1)  # init and ready are not part of the rate
            start = time.perf_counter()
            for index in range(1, pages):
                await task.read(address_in_task + index * 4096, 1)
            elapsed = time.perf_counter() - start
            assert kernel.stats.data_requests == pages
        with trio.move_on_after(10):
            await connection.drain()
        nursery.cancel_scope.cancel()
    return (pages - 1) / elapsed


def case_cross_process(args: argparse.Namespace) -> list[Result]:
    pages = 500 if args.quick else 10000
    with tempfile.TemporaryDirectory(prefix="fusepager-bench-") as work:
        store, mountpoint = Path(work) / "store", Path(work) / "mnt"
        store.mkdir()
        mountpoint.mkdir()
        listening: list[str] = []
        with fusepager_mount(store, mountpoint, listening):
            objects = mountpoint / "objects"
            names = []
            for run in range(args.runs):
                # A fresh object each run: no page of it may be cached in a kernel already.
                name = f"faults{run}"
                (objects / name).mkdir()
                with open(objects / name / "data", "wb") as data:
                    data.write(random.Random(run).randbytes(pages * 4096))
                names.append(name)
            runs = iter(names)
            faults = median_of(args.runs, "cross-process: kernel faults served by the mount",
                               lambda: trio.run(cross_process_fault_rate, listening[0], next(runs), pages))
        ping = median_of(args.runs, "cross-process: trio socket ping-pong", lambda: ping_pong_between_processes(pages, Path(work)))
    return [
        Result("cross-process", f"single-page faults/s, kernel and manager in two processes ({pages} pages)", "faults/s",
               faults, "trio socket ping-pong between two processes (64 B out, 4 KiB back)", ping, faults / ping, 0.6,
               args.runs, _command("cross-process", args))
    ]


# --- case: stream-64 -------------------------------------------------------------------------


async def stream_throughput(size: int, directory: Path) -> float:
    from fusepager.manager import StoreCallbacks
    from fusepager.pager import Pager
    from fusepager.store import FileStore

    store = FileStore(directory)
    stored = store.create(b"stream")
    stored.truncate(size)
    pager = Pager(StoreCallbacks(stored), name="stream", notify_on_evict=True)
    chunk = random.Random(2).randbytes(MiB)
    async with trio.open_nursery() as nursery:
        await nursery.start(pager.serve)
        async with kernelsim.boot("s1", 4096, 64) as kernel:
            task = await kernel.task_create()
            address = await task.vm_map(pager.send_right(), size)
            start = time.perf_counter()
            for offset in range(0, size, MiB):
                await task.write(address + offset, chunk)
            for offset in range(0, size, MiB):
                assert await task.read(address + offset, MiB) == chunk
            elapsed = time.perf_counter() - start
            assert kernel.resident.peak <= 64
        nursery.cancel_scope.cancel()
    store.remove(b"stream")
    store.close()
    return 2 * size / elapsed / 1e6


def raw_stream_throughput(size: int, directory: Path) -> float:
    chunk = random.Random(2).randbytes(MiB)
    path = directory / "raw"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        start = time.perf_counter()
        for offset in range(0, size, MiB):
            os.pwrite(fd, chunk, offset)
        for offset in range(0, size, MiB):
            assert os.pread(fd, MiB, offset) == chunk
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()
    return 2 * size / elapsed / 1e6


def case_stream_64(args: argparse.Namespace) -> list[Result]:
    size = 4 * MiB if args.quick else 64 * MiB
    with tempfile.TemporaryDirectory(prefix="fusepager-bench-") as work:
        engine = median_of(args.runs, "stream-64: kernel with 64 pages", lambda: trio.run(stream_throughput, size, Path(work)))
        raw = median_of(args.runs, "stream-64: raw file", lambda: raw_stream_throughput(size, Path(work)))
    return [
        Result("stream-64", f"write then read {size // MiB} MiB through a kernel limited to 64 pages", "MB/s",
               engine, "the same in a raw file", raw, engine / raw, None, args.runs, _command("stream-64", args))
    ]


CASES = {
    "fault-rate": lambda args: [case_fault_rate(args)],
    "mount-read": case_mount_read,
    "ping-pong": case_ping_pong,
    "cross-process": case_cross_process,
    "stream-64": case_stream_64,
}


def markdown(results: list[Result]) -> str:
    lines = [
        "| case | figure | value | anchor | anchor value | ratio | target |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        target = f"≥ {r.target}" if r.target is not None else ""
        lines.append(
            f"| {r.case} | {r.figure} | {r.value:,.0f} {r.unit} | {r.anchor} | {r.anchor_value:,.0f} {r.unit} | "
            f"{r.ratio:.2f} | {target} |"
        )
    lines.append("")
    commands = dict.fromkeys(f"- {r.case}: `{r.command}`" for r in results)
    lines.extend(commands)
    return "\n".join(lines)


def _interrupted(signal_number: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal_number}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run only this case (repeatable)")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; the median is reported (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results", help="where bench.json goes")
    parser.add_argument(
        "--cache", type=Path, default=ROOT / "bench-results" / "cache", help="where downloaded comparison programs are kept"
    )
    parser.add_argument("--pong-server", metavar="PATH", help=argparse.SUPPRESS)  # cross-process's other process
    args = parser.parse_args(argv)
    if args.pong_server:
        trio.run(_pong_server, args.pong_server)
        return 0
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    signal.signal(signal.SIGTERM, _interrupted)  # so that cases unmount what they mounted
    results = []
    for name in args.case or list(CASES):
        try:
            results.extend(CASES[name](args))
        except BenchError as error:
            progress("")
            print(f"scripts/bench: {name}: {error}", file=sys.stderr)
            return 1
    progress("")
    print(markdown(results))
    args.output.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "results": [asdict(r) for r in results],
    }
    (args.output / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

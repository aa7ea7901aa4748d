"""pyfuse3's own examples/passthroughfs.py: fetched from pyfuse3's source distribution at
benchmark time (never committed) and mounted as a comparison."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from .common import (
    MOUNT_TIMEOUT,
    PYPI_JSON,
    PYPI_SIMPLE,
    BenchError,
    MiB,
    _lazy_unmount,
    _mounted,
    _tail,
    _wait_mounted,
    progress,
)


@contextmanager
def foreground_mount(argv: list[str], mountpoint: Path, log: Path, ready: str | None = None):
    """A FUSE daemon run in the foreground as our child (`argv`, stdout and stderr to `log`),
    serving `mountpoint`: ready once the mount shows and, if `ready` is given, once that text is
    in its log.  Unmounted and the process ended on exit, whatever happened."""
    with open(log, "wb") as output:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_mounted(mountpoint, process, log)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while ready is not None and ready not in _tail(log, 100_000):
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{argv[1]} did not say {ready!r}:\n{_tail(log)}")
            time.sleep(0.02)
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


def passthrough_mount(example: Path, source: Path, mountpoint: Path, log: Path):
    """pyfuse3's passthroughfs.py mirroring `source` at `mountpoint` (see foreground_mount)."""
    return foreground_mount([sys.executable, str(example), str(source), str(mountpoint)], mountpoint, log)


def _read_ahead_kb(mountpoint: Path) -> int | None:
    """Linux's read-ahead for a FUSE mount (it sets how big FUSE's read requests get)."""
    try:
        device = os.stat(mountpoint).st_dev
        return int(Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb").read_text())
    except (OSError, ValueError):
        return None


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
    progress(f"mount: downloading pyfuse3 {version}'s source distribution for examples/passthroughfs.py")
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

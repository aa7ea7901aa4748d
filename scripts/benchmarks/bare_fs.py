"""A bare pyfuse3 file system: the ceiling of pyfuse3 on this machine, for the `mount` case.

    python scripts/benchmarks/bare_fs.py MNT SIZE

mounts at MNT a root directory holding one file, `data`, of SIZE bytes (K, M, G suffixes
allowed), and serves it until unmounted (fusermount3 -u MNT) or sent SIGINT/SIGTERM:

- read() returns a slice of one cached buffer (a memoryview: pyfuse3 hands it to FUSE without a
  copy in Python), so a read costs pyfuse3's round trip and nothing else.  Byte `o` of the file
  is byte `o % 1 MiB` of the buffer (random bytes, seed 1: the same as the first MiB the
  benchmark writes to fusepager's object).
- write() accepts every byte and discards it; fsync, flush and release do nothing.

It uses the same settings as fusepager's mount: the FUSE options fusepager.mount.serve() gives
(pyfuse3's defaults, fsname and subtype), no writeback cache, keep_cache at open (what fusepager
answers when no kernel may be writing), and, taken from fusepager's own modules so that they
cannot drift apart, the attribute and entry timeouts of `data` (fusepager.fs.DATA_TIMEOUT),
direct_io for write-only opens (fusepager.fs.bypasses_cache) and the read-ahead written to the
mount's sysfs entry after FUSE_INIT (fusepager.mount.READAHEAD_KB).  Once that is done it prints
`bare_fs: serving MNT` on stdout, which is what the benchmark waits for.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import stat
import sys
import time

import pyfuse3
import trio

from fusepager.fs import DATA_TIMEOUT, bypasses_cache
from fusepager.mount import READAHEAD_KB, set_readahead

READY = "bare_fs: serving"
BLOCK = 1 << 20
DATA_INODE = pyfuse3.ROOT_INODE + 1


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1], 0) * units[text[-1].upper()]
    return int(text, 0)


class BareFS(pyfuse3.Operations):
    enable_writeback_cache = False  # as fusepager's PagerFS

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        block = random.Random(1).randbytes(BLOCK)
        # Two copies back to back: any read of up to BLOCK bytes is one contiguous slice.
        self.buffer = memoryview(block + block)
        self.stamp = time.time_ns()
        self.initialized = trio.Event()

    def init(self) -> None:
        self.initialized.set()

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        entry.st_uid = os.getuid()
        entry.st_gid = os.getgid()
        entry.st_blksize = 4096
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = self.stamp
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 2
            entry.st_size = 0
            entry.entry_timeout = entry.attr_timeout = 0  # as fusepager's directories
        elif inode == DATA_INODE:
            entry.st_mode = stat.S_IFREG | 0o644
            entry.st_nlink = 1
            entry.st_size = self.size
            entry.st_blocks = (self.size + 511) // 512
            entry.entry_timeout = entry.attr_timeout = DATA_TIMEOUT  # as fusepager's `data`
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    async def getattr(self, inode, ctx=None):
        return self._attributes(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return self._attributes(inode)  # truncate and times: accepted, nothing changes

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b"data":
            return self._attributes(DATA_INODE)
        if name in (b".", b".."):
            return self._attributes(pyfuse3.ROOT_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"data", self._attributes(DATA_INODE), 1)

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        if inode != DATA_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=bypasses_cache(flags))

    async def read(self, fh, off, size):
        size = max(0, min(size, self.size - off))
        start = off % BLOCK
        if size <= BLOCK:
            return self.buffer[start : start + size]
        return (bytes(self.buffer[start : start + BLOCK]) * (size // BLOCK + 1))[:size]  # not with 1 MiB requests

    async def write(self, fh, off, buf):
        return len(buf)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        pass

    async def release(self, fh):
        pass

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)  # as fusepager for names it does not have

    async def listxattr(self, inode, ctx):
        return []

    async def statfs(self, ctx):
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data

    async def forget(self, inode_list):
        pass


async def serve(operations: BareFS, mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:

        async def when_serving() -> None:
            await operations.initialized.wait()  # FUSE_INIT answered: now the read-ahead sticks
            set_readahead(mountpoint, READAHEAD_KB)
            print(f"{READY} {mountpoint}", flush=True)

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(when_serving)
        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()  # unmounted


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: bare_fs.py MNT SIZE", file=sys.stderr)
        return 2
    mountpoint, size = os.path.abspath(argv[0]), parse_size(argv[1])
    operations = BareFS(size)
    options = set(pyfuse3.default_options) | {"fsname=bare_fs", "subtype=bare_fs"}  # as fusepager's
    pyfuse3.init(operations, mountpoint, options)
    try:
        trio.run(serve, operations, mountpoint)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

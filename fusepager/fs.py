"""The mount: the memory manager's state as files (pyfuse3).

    MNT/
      objects/NAME/            mkdir creates an object, rmdir removes one no kernel maps
        data                   its bytes (read, write, truncate, mmap)
        ctl                    commands: sync | flush [OFF LEN] | clean [OFF LEN] | lock OFF LEN PROT
                               | destroy [REASON] | attributes may_cache=.. copy=..
        kernels/KERNEL/        appears at memory_object_init from KERNEL, goes at terminate
          page_size control name pages
          ready                there once memory_object_ready was sent; with auto_ready=0 the
                               shell sends it: echo 'may_cache=0 copy=call' > ready
        snapshots/             preserved copies ([4/8])
        locks                  manager locks, lock requests in flight, held unlocks; there
                               only while there are some (`fusepager top` shows them)
      trace                    the live message log: tail -f it
      stats                    counters

Extended attributes `user.mach.*` on object and kernel directories show (and, where settable,
change) the attributes.  Every refusal answers an errno and writes a line to `trace`; an error
no handler expected answers EIO (`fs_guard`) and never ends the mount.

All handlers run in the mount's trio loop beside the pagers and any in-process kernels, so they
call the engine directly; nothing here blocks.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from kernelsim.interface import COPY_STRATEGY_NAMES, MEMORY_OBJECT_RETURN_ALL, MEMORY_OBJECT_RETURN_DIRTY, MEMORY_OBJECT_RETURN_NONE, prot_str

from . import control
from .control import ControlError
from .fs_guard import guard_requests
from .manager import FileManager, display_name
from .outside import PageCacheCopies
from .pager import KernelRecord, LockState, LockTimeout, Pager, PagerError
from .store import StoreError, validate_name

log = logging.getLogger("fusepager.fs")

ROOT = pyfuse3.ROOT_INODE
DATA_TIMEOUT = 1.0
"""Seconds the kernel may cache a `data` file's attributes: a zero timeout would cost a GETATTR
before every read."""

MAX_RANGE = 1 << 62
DIRECTORIES = ("root", "objects", "object", "kernels", "snapshots", "kernel", "default", "temporary")
KERNEL_FILES = ("page_size", "control", "name", "ready", "pages")
OBJECT_FILES = ("data", "ctl", "kernels", "snapshots", "locks")  # locks: only while there are some
CTL_HELP = f"""\
commands, one a line (echo 'sync' > ctl):
  {control.CTL_USAGE.replace(' | ', chr(10) + '  ')}
OFF and LEN: bytes, decimal or 0x hex, K/M/G suffixes.  PROT: accesses to forbid (r, w, x) or none.
"""
OBJECT_XATTRS = (
    b"user.mach.copy_strategy",
    b"user.mach.may_cache",
    b"user.mach.auto_ready",
    b"user.mach.size",
    b"user.mach.kernels",
    b"user.mach.page_size",
    b"user.fusepager.unstored",
)
KERNEL_XATTRS = (b"user.mach.page_size", b"user.mach.control", b"user.mach.name", b"user.mach.ready", b"user.mach.may_cache", b"user.mach.copy_strategy")
ROOT_XATTRS = (b"user.fusepager.pid", b"user.fusepager.store")


@dataclass(frozen=True)
class Node:
    """What an inode stands for; the same node always gets the same inode in one mount."""

    kind: str  # root objects trace stats object data ctl kernels snapshots kernel kfile
    object: bytes = b""
    kernel: str = ""
    file: str = ""


ROOT_CHILDREN = {b"objects": Node("objects"), b"default": Node("default"), b"trace": Node("trace"), b"stats": Node("stats")}


def _decimal(name: bytes) -> str | None:
    """`name` as the text of a number the way the mount lists it (ASCII digits, no leading
    zero), or None: `01` and `١` name nothing."""
    if not name.isdigit() or (name.startswith(b"0") and name != b"0"):
        return None  # bytes.isdigit is ASCII only
    return name.decode("ascii")


@dataclass
class Handle:
    node: Node
    writable: bool
    content: bytes | None = None  # a snapshot of a small generated file, taken at open
    extra: dict[str, Any] = field(default_factory=dict)


RETURN_NAMES = {MEMORY_OBJECT_RETURN_NONE: "none", MEMORY_OBJECT_RETURN_DIRTY: "dirty", MEMORY_OBJECT_RETURN_ALL: "all"}


def render_locks(locks: list[LockState]) -> str:
    """The `locks` file: `KIND KERNEL OFFSET LENGTH PROT [flush=0|1 return=none|dirty|all
    waited_ms=N]`, one line each; KERNEL is `*` for a manager lock (it holds in every kernel)."""
    lines = []
    for lock in locks:
        line = f"{lock.kind} {lock.kernel or '*'} {lock.offset:#x} {lock.length} {prot_str(lock.prot)}"
        if lock.kind == "request":
            line += f" flush={int(lock.flush)} return={RETURN_NAMES.get(lock.should_return, lock.should_return)} waited_ms={lock.waited * 1000:.0f}"
        lines.append(line + "\n")
    return "".join(lines)


def bypasses_cache(flags: int) -> bool:
    """Whether an open of `data` with these flags gets direct_io, bypassing Linux's cache:
    write-only ones.  Their writes then come to the daemon straight from the writer's buffer,
    without a copy into cached pages that nobody reads through that handle (nor a GETXATTR of
    security.capability before each write).  A write-only handle cannot be mmapped (mmap needs
    read access), so mmap and every read keep the cache."""
    return (flags & os.O_ACCMODE) == os.O_WRONLY


@guard_requests  # an unexpected error in one request answers EIO; the mount goes on
class PagerFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, manager: FileManager) -> None:
        super().__init__()
        self.manager = manager
        self.trace = manager.trace
        self.mounted_at = time.time_ns()
        self._inodes: dict[Node, int] = {Node("root"): ROOT}
        self._nodes: dict[int, Node] = {ROOT: Node("root")}
        self._next_inode = ROOT + 1
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._pending_ready: set[Node] = set()
        self.initialized = trio.Event()  # set when Linux's FUSE_INIT has been answered
        # Per data inode: the ranges Linux may hold in its page cache, and their release.
        self._page_cache: dict[int, PageCacheCopies] = {}
        self.serving = True  # until the FUSE loop stops (stop_serving)
        manager.on_object_changed = self._object_changed
        # Each object's pager asks before a kernel may write (outside.py).
        manager.outside_copies = self._linux_copies_of
        for name, pager in manager.pagers.items():
            pager.outside = self._linux_copies_of(name)

    def init(self) -> None:
        self.initialized.set()

    # -- Linux's page cache ------------------------------------------------------------------

    def _linux_copies(self, inode: int) -> PageCacheCopies:
        """What Linux may hold of a `data` inode in its page cache.  Every range it reads or
        writes through its cache is noted (`read`, `write`), in the pager's line; a kernel is
        given write access over a noted range only after Linux has written back and dropped
        its pages (`Pager._turn_with_no_outside_copies`), and a change by kernels drops them in
        the background (`_object_changed`).  With nothing noted, nothing is ever dropped: no
        thread per grant for objects Linux never read."""
        copies = self._page_cache.get(inode)
        if copies is None:
            copies = self._page_cache[inode] = PageCacheCopies(lambda: self._drop_page_cache(inode), self.manager.spawn)
        return copies

    def stop_serving(self) -> None:
        """The FUSE loop has stopped: Linux's write-backs are served no more, so its cache is
        not dropped from now on (a drop would wait for ever); it can take no new page either."""
        self.serving = False

    async def _drop_page_cache(self, inode: int) -> None:
        if self.serving:
            await _drop_page_cache(inode)

    async def page_cache_quiet(self) -> None:
        """Until no drop of Linux's cache is under way (the daemon calls it before it stops
        serving FUSE requests: a drop waits for Linux's write-backs, which need this loop)."""
        while any(copies.dropping for copies in self._page_cache.values()):
            for copies in list(self._page_cache.values()):
                await copies.quiet()

    def _linux_copies_of(self, name: bytes) -> PageCacheCopies:
        return self._linux_copies(self._inode(Node("data", name)))

    def _object_changed(self, name: bytes) -> None:
        """Kernels changed the object's bytes (or may now): Linux must not serve `data` from its
        cache any more, so a program with it mmapped sees the change at its next touch."""
        inode = self._inodes.get(Node("data", name))
        if inode is not None and inode in self._page_cache:
            self._page_cache[inode].changed()

    def _cache_is_valid(self, node: Node) -> bool:
        """Whether Linux's cached pages of `data` may be kept at open: none of the object's
        changes is still waiting to be invalidated, and no kernel may be changing it now."""
        inode = self._inodes.get(node)
        if inode is not None and inode in self._page_cache and not self._page_cache[inode].current:
            return False
        pager = self._pager(node)
        return pager is None or not any(record.pagemap.writable() for record in pager.kernels.values())

    # -- nodes -------------------------------------------------------------------------------

    def _inode(self, node: Node) -> int:
        inode = self._inodes.get(node)
        if inode is None:
            inode = self._inodes[node] = self._next_inode
            self._nodes[inode] = node
            self._next_inode += 1
        return inode

    def _node(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None or not self._exists(node):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _pager(self, node: Node) -> Pager | None:
        return self.manager.active(node.object)

    def _record(self, node: Node) -> KernelRecord | None:
        pager = self._pager(node)
        if pager is None:
            return None
        for record in pager.kernels.values():
            if record.label == node.kernel:
                return record
        return None

    def _temporary(self, node: Node):
        return self.manager.default.temporaries.get(int(node.file)) if node.file.isdigit() else None

    def _snapshots(self, name: bytes) -> dict[str, tuple[str, object]]:
        """The object's snapshots by file name: COPY_CALL copies the pager keeps, and the
        default manager's temporaries that are delayed copies of it."""
        pager = self.manager.active(name)
        if pager is None:
            return {}
        found: dict[str, tuple[str, object]] = {str(ident): ("call", copy) for ident, copy in pager.copies.items()}
        for temporary in self.manager.default.copies_of(pager.port.name):
            found[str(temporary.id)] = ("delay", temporary)
        return found

    def _snapshot(self, node: Node) -> tuple[str, object] | None:
        return self._snapshots(node.object).get(node.file)

    def _exists(self, node: Node) -> bool:
        if node.kind in ("root", "objects", "stats", "default"):
            return True
        if node.kind == "trace":  # trace, or trace.K while that older segment is kept
            return not node.file or int(node.file) <= self.trace.older
        if node.kind in ("temporary", "tdata"):
            return self._temporary(node) is not None
        if node.kind == "snapshot":
            return self.manager.store.exists(node.object) and self._snapshot(node) is not None
        if not self.manager.store.exists(node.object):
            return False
        if node.kind == "locks":
            pager = self._pager(node)
            return pager is not None and bool(pager.locks())
        if node.kind in ("kernel", "kfile"):
            record = self._record(node)
            if record is None:
                return False
            if node.kind == "kfile" and node.file == "ready":
                return record.ready or node in self._pending_ready
        return True

    def _children(self, node: Node) -> list[tuple[bytes, Node]]:
        if node.kind == "root":
            older = [(f"trace.{back}".encode(), Node("trace", file=str(back))) for back in range(1, self.trace.older + 1)]
            return list(ROOT_CHILDREN.items()) + older
        if node.kind == "default":
            return [(str(ident).encode(), Node("temporary", file=str(ident))) for ident in sorted(self.manager.default.temporaries)]
        if node.kind == "temporary":
            return [(b"data", Node("tdata", file=node.file))]
        if node.kind == "objects":
            return [(name, Node("object", name)) for name in self.manager.store.names()]
        if node.kind == "object":
            return [(file.encode(), Node(file, node.object)) for file in OBJECT_FILES if file != "locks" or self._exists(Node(file, node.object))]
        if node.kind == "kernels":
            pager = self._pager(node)
            labels = sorted(r.label for r in pager.kernels.values()) if pager else []
            return [(label.encode(), Node("kernel", node.object, label)) for label in labels]
        if node.kind == "kernel":
            children = [Node("kfile", node.object, node.kernel, file) for file in KERNEL_FILES]
            return [(child.file.encode(), child) for child in children if self._exists(child)]
        if node.kind == "snapshots":
            names = sorted(self._snapshots(node.object), key=int)
            return [(name.encode(), Node("snapshot", node.object, file=name)) for name in names]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _child(self, parent: Node, name: bytes) -> Node:
        """The child `name` of directory `parent`, found without listing the directory: a
        lookup costs the same with 10 objects as with 100,000 (only readdir lists)."""
        if name == b".":
            return parent
        child = self._named_child(parent, name)
        if child is None or not self._exists(child):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return child

    def _named_child(self, parent: Node, name: bytes) -> Node | None:
        """The node `name` in `parent` stands for if it exists (None: no such name can)."""
        kind = parent.kind
        if kind == "root":
            if name.startswith(b"trace."):
                back = _decimal(name[len(b"trace.") :])
                return Node("trace", file=back) if back is not None and back != "0" else None
            return ROOT_CHILDREN.get(name)
        if kind == "default":
            ident = _decimal(name)
            return Node("temporary", file=ident) if ident is not None else None
        if kind == "temporary":
            return Node("tdata", file=parent.file) if name == b"data" else None
        if kind == "objects":
            try:
                validate_name(name)
            except StoreError:
                return None  # a name no object can have: it is not there
            return Node("object", name)
        if kind == "object":
            file = name.decode("ascii", "replace")
            return Node(file, parent.object) if file in OBJECT_FILES else None
        if kind == "kernels":
            try:
                return Node("kernel", parent.object, name.decode("utf-8"))
            except UnicodeDecodeError:
                return None  # kernel labels are text
        if kind == "kernel":
            file = name.decode("ascii", "replace")
            return Node("kfile", parent.object, parent.kernel, file) if file in KERNEL_FILES else None
        if kind == "snapshots":
            ident = _decimal(name)
            return Node("snapshot", parent.object, file=ident) if ident is not None else None
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _refuse(self, code: int, why: str) -> pyfuse3.FUSEError:
        """The errno to answer, after a line in trace saying why."""
        self.manager.stats.refused += 1
        self.trace.line(f"mount refused ({errno.errorcode.get(code, code)}): {why}")
        return pyfuse3.FUSEError(code)

    # -- attributes --------------------------------------------------------------------------

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self._inode(node)
        entry.generation = 0
        entry.entry_timeout = 0
        entry.attr_timeout = 0
        entry.st_uid = os.getuid()
        entry.st_gid = os.getgid()
        entry.st_blksize = 4096
        stamp = self.mounted_at
        if node.kind in DIRECTORIES:
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 2
            entry.st_size = 0
        else:
            entry.st_nlink = 1
            entry.st_mode = stat.S_IFREG | (0o644 if node.kind in ("data", "ctl") or (node.kind == "kfile" and node.file == "ready") else 0o444)
            entry.st_size = self._size(node)
            if node.kind == "data":
                entry.entry_timeout = DATA_TIMEOUT
                entry.attr_timeout = DATA_TIMEOUT
                info = os.stat(self.manager.store.open(node.object).data_path)
                stamp = info.st_mtime_ns
                entry.st_blocks = info.st_blocks
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = stamp
        return entry

    def _size(self, node: Node) -> int:
        if node.kind == "data":
            return self.manager.store.open(node.object).size
        if node.kind == "tdata":
            temporary = self._temporary(node)
            return temporary.size if temporary is not None else 0
        if node.kind == "snapshot":
            found = self._snapshot(node)
            if found is None:
                return 0
            kind, thing = found
            return thing.length if kind == "call" else thing.size  # type: ignore[attr-defined]
        if node.kind == "trace":
            return self.trace.size(self._trace_segment(node))
        return len(self._content(node))

    def _content(self, node: Node) -> bytes:
        """The text of a generated file."""
        if node.kind == "stats":
            return self._stats().encode()
        if node.kind == "ctl":
            return CTL_HELP.encode()
        if node.kind == "locks":
            pager = self._pager(node)
            return render_locks(pager.locks() if pager is not None else []).encode()
        if node.kind == "kfile":
            record = self._record(node)
            if record is None:
                return b""
            text = {
                "page_size": f"{record.page_size}\n",
                "control": f"{record.control.name}\n",
                "name": f"{record.name.name}\n",
                "ready": record.ready_line() if record.ready else "",
                "pages": record.pagemap.render(),
            }[node.file]
            return text.encode()
        return b""

    def _stats(self) -> str:
        pagers = self.manager.pagers.values()
        extra = {
            "objects": self.manager.store.count(),
            "active_pagers": len(self.manager.pagers),
            "kernels": sum(len(p.kernels) for p in pagers),
        }
        return self.manager.stats.render(extra)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attributes(self._node(inode))

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if name == b"..":
            return self._attributes(self._parent(parent))
        return self._attributes(self._child(parent, name))

    def _parent(self, node: Node) -> Node:
        return {
            "root": Node("root"),
            "objects": Node("root"),
            "trace": Node("root"),
            "stats": Node("root"),
            "object": Node("objects"),
            "kernel": Node("kernels", node.object),
            "kfile": Node("kernel", node.object, node.kernel),
            "default": Node("root"),
            "temporary": Node("default"),
            "tdata": Node("temporary", file=node.file),
            "snapshot": Node("snapshots", node.object),
        }.get(node.kind, Node("object", node.object))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        handle = self._handles.get(fh) if fh is not None else None
        if handle is not None:
            self._check_current(handle)  # ftruncate of a descriptor of a removed object
        node = self._node(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise self._refuse(errno.EPERM, f"chmod/chown of {self._path(node)}")
        if (fields.update_atime or fields.update_mtime) and not fields.update_size:
            # Like the mode and owner, the times are not the user's to set: `data`'s are its
            # store file's, the rest are the mount's.  (A truncate sets them too: it is the
            # size that counts there, and the store file's mtime changes with it.)
            raise self._refuse(errno.EPERM, f"setting the times of {self._path(node)}")
        if fields.update_size:
            if node.kind == "data":
                await self._truncate(node, attr.st_size)
            elif node.kind in ("ctl", "kfile") and node.file in ("", "ready") and attr.st_size == 0:
                pass  # `echo cmd > ctl` truncates first: nothing to truncate
            else:
                raise self._refuse(errno.EROFS, f"truncate of {self._path(node)}")
        return self._attributes(node)

    async def _truncate(self, node: Node, size: int) -> None:
        stored = self.manager.store.open(node.object)
        pager = self._pager(node)
        old = stored.size
        if pager is None:
            self._store_call(stored.truncate, size)
        else:
            # Whatever kernels hold past the new end is given up first (and cut with the rest).
            low = min(old, size)
            await self._engine(node, pager.write_through(low, MAX_RANGE - low, lambda: self._store_call(stored.truncate, size)))
        self.trace.line(f"mount truncated {display_name(node.object)} from {old} to {size} bytes")

    def _store_call(self, function, *args):
        try:
            return function(*args)
        except (StoreError, OSError) as error:
            raise self._refuse(error.errno or errno.EIO, str(error)) from None

    def _path(self, node: Node) -> str:
        parts = {
            "root": "/",
            "objects": "/objects",
            "trace": f"/trace.{node.file}" if node.file else "/trace",
            "stats": "/stats",
            "object": f"/objects/{display_name(node.object)}",
        }
        if node.kind in parts:
            return parts[node.kind]
        if node.kind in ("default", "temporary", "tdata"):
            return "/default" + (f"/{node.file}" if node.file else "") + ("/data" if node.kind == "tdata" else "")
        if node.kind == "snapshot":
            return f"/objects/{display_name(node.object)}/snapshots/{node.file}"
        base = f"/objects/{display_name(node.object)}"
        if node.kind == "kernel":
            return f"{base}/kernels/{node.kernel}"
        if node.kind == "kfile":
            return f"{base}/kernels/{node.kernel}/{node.file}"
        return f"{base}/{node.kind}"

    # -- directories -------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if node.kind not in DIRECTORIES:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return self._new_handle(Handle(node, writable=False))

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._handles[fh]
        node = handle.node
        if not self._exists(node):
            return
        # One listing per pass over the directory, not one per reply buffer: a directory of
        # 100,000 objects takes many readdir calls, each continuing where the last stopped.
        children = handle.extra.get("children")
        if children is None or start_id == 0:
            children = handle.extra["children"] = self._children(node)
        for index in range(start_id, len(children)):
            name, child = children[index]
            if not pyfuse3.readdir_reply(token, name, self._attributes(child), index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if parent.kind != "objects":
            raise self._refuse(errno.EROFS, f"mkdir {display_name(name)} in {self._path(parent)}: objects are made in /objects")
        try:
            validate_name(name)
            self.manager.create(name)
        except (StoreError, OSError) as error:  # OSError: a full disk, say; never the daemon's end
            raise self._refuse(error.errno or errno.EIO, str(error)) from None
        return self._attributes(Node("object", name))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        if parent.kind != "objects":
            raise self._refuse(errno.EROFS, f"rmdir {display_name(name)} in {self._path(parent)}")
        try:
            self.manager.remove(name)
        except (StoreError, OSError) as error:
            raise self._refuse(error.errno or errno.EIO, str(error)) from None
        pyfuse3.invalidate_entry_async(parent_inode, name, ignore_enoent=True)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        raise self._refuse(errno.EROFS, f"unlink {display_name(name)} in {self._path(parent)}")

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx) -> None:
        raise self._refuse(errno.EROFS, f"rename of {display_name(name_old)}")

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise self._refuse(errno.EROFS, f"mknod {display_name(name)}")

    async def symlink(self, parent_inode, name, target, ctx):
        raise self._refuse(errno.EROFS, f"symlink {display_name(name)}")

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise self._refuse(errno.EROFS, f"link {display_name(new_name)}")

    # -- files -------------------------------------------------------------------------------

    def _new_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        if node.kind in DIRECTORIES:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if writable and not (node.kind in ("data", "ctl") or (node.kind == "kfile" and node.file == "ready")):
            raise self._refuse(errno.EROFS, f"{self._path(node)} is read-only")
        if writable and node.kind == "kfile" and node.file == "ready":
            raise self._refuse(errno.EBUSY, f"{self._path(node)}: memory_object_ready was already sent")
        if node.kind == "data":
            stored = self._store_call(self.manager.store.open, node.object)
            direct = bypasses_cache(flags)
            handle = Handle(node, writable, extra={"stored": stored, "inode": inode, "direct": direct})
            # A new open drops Linux's cached pages unless they are known to be current, so a
            # read(2) right after a kernel's change never sees the old bytes.
            return pyfuse3.FileInfo(fh=self._new_handle(handle), keep_cache=self._cache_is_valid(node), direct_io=direct)
        content = None if node.kind in ("trace", "tdata", "snapshot") or writable else self._content(node)
        extra: dict[str, Any] = {}
        if node.kind == "ctl" and writable:
            # The object this ctl belongs to (a removed and re-made one is another), and the
            # lines written to it that wait for their end.
            extra = {"stored": self._store_call(self.manager.store.open, node.object), "lines": control.CtlLines()}
        handle = Handle(node, writable, content, extra)
        if node.kind == "trace":
            handle.extra.update(segment=self._trace_segment(node), shift=0, realigned=False)
        return pyfuse3.FileInfo(fh=self._new_handle(handle), direct_io=True)

    def _trace_segment(self, node: Node) -> int:
        """The generation of the segment a trace file shows now: `trace` the current one,
        `trace.K` the K-th before it."""
        return self.trace.generation - int(node.file or 0)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext):
        parent = self._node(parent_inode)
        if parent.kind != "kernel" or name != b"ready":
            raise self._refuse(errno.EROFS, f"create {display_name(name)} in {self._path(parent)}")
        node = Node("kfile", parent.object, parent.kernel, "ready")
        if self._exists(node):
            raise self._refuse(errno.EBUSY, f"{self._path(node)}: memory_object_ready was already sent")
        self._pending_ready.add(node)
        fh = self._new_handle(Handle(node, writable=True))
        return pyfuse3.FileInfo(fh=fh, direct_io=True), self._attributes(node)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles[fh]
        node = handle.node
        if node.kind == "data":
            self._check_current(handle)
            stored = handle.extra["stored"]
            copies = self._linux_copies(handle.extra["inode"])

            def read_store() -> bytes:
                # Noted as the store is read, in the pager's line: see _linux_copies.
                copies.note(off, size)
                return self._store_call(stored.read, off, size)

            pager = self._pager(node)
            if pager is None:
                return read_store()
            return await self._engine(node, pager.read_through(off, size, read_store))
        if node.kind == "trace":
            try:
                return self._read_trace(handle, off, size)
            except OSError as error:  # the store's trace file cannot be read: say why
                raise self._refuse(error.errno or errno.EIO, f"{self._path(node)}: {error}") from None
        if node.kind == "tdata":
            temporary = self._temporary(node)
            if temporary is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self._engine(node, temporary.pager.read_through(off, size, lambda: temporary.callbacks.read(off, size)))
        if node.kind == "snapshot":
            return await self._read_snapshot(node, off, size)
        content = handle.content or b""
        return content[off : off + size]

    def _read_trace(self, handle: Handle, off: int, size: int) -> bytes:
        """Bytes of a trace file for one open handle: the bytes at that offset of the segment
        it shows, whole lines in order, never one twice, or nothing.

        A read from offset 0 reads the segment the file shows now (`tail -f` does that when it
        sees the file shrink at a rotation).  `trace.K` reads on in the segment it started even
        once that moves on to `trace.K+1` (as an open file does after logrotate renamed it).
        `trace` reads on in the current segment: a reader that was in the middle of a line of
        the segment rotated away gets the rest of that line first; then the current segment,
        from its first line at or after the reader's offset (a `tail -f` that did not look
        while the new segment grew past its position, and so never saw it shrink, goes on
        live; the lines it skipped are in `trace`, later `trace.1`).  `shift` is how far the
        handle's offsets are behind the segment's after that."""
        node = handle.node
        trace = self.trace
        if off == 0:
            handle.extra.update(segment=self._trace_segment(node), shift=0, realigned=False)
        segment, shift = handle.extra["segment"], handle.extra["shift"]
        if node.file or segment == trace.generation:
            data = trace.read(off + shift, size, segment)
        else:
            end = trace.line_end(off + shift, segment)
            if end > off + shift:  # the rest of the line the reader is in
                return trace.read(off + shift, min(size, end - off - shift), segment)
            start = trace.line_start(off)
            if start is None:
                return b""  # no whole line there yet: the reader looks again
            handle.extra.update(segment=trace.generation, shift=start - off, realigned=True)
            data = trace.read(start, size)
        if handle.extra["realigned"]:
            # Its offsets are not the segment's: a read that ends where the file's size says
            # (as tail's do) may end inside a line there.  Whole lines only, then; the reader
            # asks again for the rest, and a line cut by the next rotation is not half shown.
            data = data[: data.rfind(b"\n") + 1]
        return data

    async def _read_snapshot(self, node: Node, off: int, size: int) -> bytes:
        """Byte for byte what the copy's task reads: its own pages (its kernel's changes brought
        back first), else the original's, which have not changed since the copy."""
        found = self._snapshot(node)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        kind, thing = found
        pager = self._pager(node)
        assert pager is not None
        length = self._size(node)
        size = max(0, min(size, length - off))
        if size == 0:
            return b""
        if kind == "call":
            page_size = thing.page_size  # type: ignore[attr-defined]
            low = off - off % page_size
            high = min(length, -(-(off + size) // page_size) * page_size)
            data = await self._engine(node, pager.copy_contents(thing.id, low, high - low))  # type: ignore[attr-defined]
            return data[off - low : off - low + size]
        temporary = thing
        page_size = temporary.callbacks.page_size  # type: ignore[attr-defined]
        low = off - off % page_size
        high = -(-(off + size) // page_size) * page_size
        origin_offset = temporary.origin[1]  # type: ignore[attr-defined]

        async def own_or_original() -> bytes:
            pieces = []
            for page in range(low, high, page_size):
                if page in temporary.callbacks.written:  # type: ignore[attr-defined]
                    pieces.append(temporary.callbacks.read(page, page_size).ljust(page_size, b"\0"))  # type: ignore[attr-defined]
                else:
                    pieces.append(await pager.read_through(origin_offset + page, page_size))
            return b"".join(pieces)

        data = await self._engine(node, temporary.pager.read_through(low, high - low, own_or_original))  # type: ignore[attr-defined]
        return data[off - low : off - low + size]

    def _check_current(self, handle: Handle) -> None:
        """ESTALE for a descriptor of an object that was removed since it was opened (and
        perhaps made again under its name: that is another object)."""
        stored = handle.extra.get("stored")
        if stored is not None and stored.closed:
            raise self._refuse(errno.ESTALE, f"{self._path(handle.node)}: the object was removed after this file was opened")

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        node = handle.node
        if not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        self._check_current(handle)
        if node.kind == "data":
            stored = handle.extra["stored"]
            copies = self._linux_copies(handle.extra["inode"])

            def write_store() -> int:
                if not handle.extra["direct"]:
                    copies.note(off, len(buf))  # the written bytes are in Linux's cached pages
                return self._store_call(stored.write, off, buf)

            pager = self._pager(node)
            try:
                if pager is None:
                    if handle.extra["direct"]:
                        await copies.release(off, len(buf))  # as write_through's outside_first
                    return write_store()
                # A direct write does not go through Linux's cache: a page Linux read before it
                # would hold the old bytes and, dirtied by a program later, write them back over
                # it.  Linux drops the cached pages of the range before sending it (6.18 does;
                # not every version has), but a page can be read again before the write is
                # stored: Linux's copies of the range are released first, in the pager's line.
                return await self._engine(node, pager.write_through(off, len(buf), write_store, outside_first=handle.extra["direct"]))
            finally:
                if handle.extra["direct"] and copies.may_hold():
                    # Pages of elsewhere, read before, are dropped in the background, as after a
                    # kernel's change (and an open meanwhile does not keep them).
                    copies.changed()
        if node.kind == "ctl":
            try:
                commands = handle.extra["lines"].take(buf)
            except ControlError as error:
                raise self._refuse(errno.EINVAL, f"{self._path(node)}: {error}") from None
            await self._run_ctl(node, commands)
            return len(buf)
        text = self._text(buf, node)
        if node.kind == "kfile" and node.file == "ready":
            await self._ready(node, text)
            return len(buf)
        raise pyfuse3.FUSEError(errno.EBADF)

    def _text(self, buf: bytes, node: Node) -> str:
        try:
            return buf.decode("utf-8")
        except UnicodeDecodeError:
            raise self._refuse(errno.EINVAL, f"{self._path(node)}: not UTF-8 text") from None

    async def _run_ctl(self, node: Node, commands: list[tuple[str, control.Command]]) -> None:
        """Run checked ctl commands in order; the first that fails stops the rest."""
        for line, command in commands:
            await self._control(node, line, command)

    async def _control(self, node: Node, line: str, command: control.Command) -> None:
        name = node.object
        self.trace.line(f"mount ctl {display_name(name)}: {line}")
        pager = self._store_call(self.manager.pager, name)
        if isinstance(command, control.Sync):
            await self._engine(node, pager.sync())
            self._store_call(self.manager.store.open(name).sync)
        elif isinstance(command, control.Flush):
            await self._engine(node, pager.flush(command.offset, command.length))
        elif isinstance(command, control.Clean):
            await self._engine(node, pager.sync(command.offset, command.length))
        elif isinstance(command, control.Lock):
            await self._engine(node, pager.lock(command.offset, command.length, command.lock_value))
        elif isinstance(command, control.Destroy):
            pager.destroy(command.reason)
        elif isinstance(command, control.Attributes):
            await self._engine(node, self.manager.set_attributes(name, command.may_cache, command.copy_strategy))

    async def _engine(self, node: Node, work):
        """Wait for the engine; a kernel that never answers its lock request is ETIMEDOUT."""
        try:
            return await work
        except LockTimeout as error:
            raise self._refuse(errno.ETIMEDOUT, f"{self._path(node)}: {error}") from None
        except PagerError as error:
            # e.g. a page a kernel gave back could not be stored (ENOSPC): the user hears it.
            raise self._refuse(error.errno or errno.EIO, f"{self._path(node)}: {error}") from None
        except (StoreError, OSError) as error:
            # The store refused (new attributes on a full disk, say): the user hears it.
            raise self._refuse(error.errno or errno.EIO, f"{self._path(node)}: {error}") from None

    async def _ready(self, node: Node, text: str) -> None:
        record = self._record(node)
        pager = self._pager(node)
        if record is None or pager is None:
            raise self._refuse(errno.ENOENT, f"{self._path(node)}: the kernel is gone")
        if record.ready:
            raise self._refuse(errno.EBUSY, f"{self._path(node)}: memory_object_ready was already sent")
        try:
            attributes = control.parse_ready(text)
        except ControlError as error:
            raise self._refuse(errno.EINVAL, f"{self._path(node)}: {error}") from None
        may_cache = pager.may_cache if attributes.may_cache is None else attributes.may_cache
        copy_strategy = pager.copy_strategy if attributes.copy_strategy is None else attributes.copy_strategy
        self.trace.line(f"mount ready {display_name(node.object)} for {record.label}: {text.strip()}")
        pager.ready(record, may_cache, copy_strategy)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            self._pending_ready.discard(handle.node)
            if "lines" in handle.extra and handle.extra["lines"].pending:
                # No flush came (it always does at close(2)): the line still runs; an error
                # has nobody to go to but the trace.
                try:
                    await self._run_ctl_rest(handle)
                except pyfuse3.FUSEError:
                    pass

    async def flush(self, fh: int) -> None:
        """close(2): a ctl line written without its newline (`echo -n sync > ctl`) runs now,
        and its errno is close's."""
        handle = self._handles.get(fh)
        if handle is not None and "lines" in handle.extra:
            await self._run_ctl_rest(handle)

    async def _run_ctl_rest(self, handle: Handle) -> None:
        lines: control.CtlLines = handle.extra["lines"]
        if not lines.pending:
            return
        try:
            commands = lines.rest()  # taken, whether it runs or is refused
        except ControlError as error:
            raise self._refuse(errno.EINVAL, f"{self._path(handle.node)}: {error}") from None
        self._check_current(handle)
        await self._run_ctl(handle.node, commands)

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles.get(fh)
        if handle is not None and handle.node.kind == "data":
            self._check_current(handle)
            self._store_call(handle.extra["stored"].sync)

    # -- extended attributes -----------------------------------------------------------------

    def _xattr_names(self, node: Node) -> tuple[bytes, ...]:
        return {"object": OBJECT_XATTRS, "kernel": KERNEL_XATTRS, "root": ROOT_XATTRS}.get(node.kind, ())

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self._xattr_names(self._node(inode)))

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if name not in self._xattr_names(node):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        key = name.decode().rsplit(".", 1)[1]
        if node.kind == "root":
            return {"pid": str(os.getpid()), "store": os.fsdecode(self.manager.store.root)}[key].encode()
        if node.kind == "kernel":
            record = self._record(node)
            assert record is not None
            return {
                "page_size": str(record.page_size),
                "control": str(record.control.name),
                "name": str(record.name.name),
                "ready": str(int(record.ready)),
                "may_cache": str(int(record.may_cache)),
                "copy_strategy": COPY_STRATEGY_NAMES[record.copy_strategy],
            }[key].encode()
        stored = self.manager.store.open(node.object)
        meta = stored.meta
        pager = self._pager(node)
        records = list(pager.kernels.values()) if pager else []
        return {
            "copy_strategy": meta.copy_strategy,
            "may_cache": str(int(meta.may_cache)),
            "auto_ready": str(int(meta.auto_ready)),
            "size": str(stored.size),
            "kernels": " ".join(sorted(r.label for r in records)),
            "page_size": " ".join(str(s) for s in sorted({r.page_size for r in records})),
            "unstored": str(len(pager.unstored) if pager else 0),
        }[key].encode()

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._node(inode)
        where = f"{self._path(node)} {name.decode(errors='replace')}"
        if not name.startswith(b"user.mach."):
            raise self._refuse(errno.ENOTSUP, f"setxattr {where}: only user.mach.* attributes exist here")
        if node.kind != "object" or name not in (b"user.mach.copy_strategy", b"user.mach.may_cache", b"user.mach.auto_ready"):
            if name in self._xattr_names(node):
                raise self._refuse(errno.EROFS, f"setxattr {where}: read-only attribute")
            raise self._refuse(errno.EINVAL, f"setxattr {where}: no such attribute")
        try:
            text = value.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise self._refuse(errno.EINVAL, f"setxattr {where}: the value is not UTF-8 text") from None
        try:
            if name == b"user.mach.copy_strategy":
                await self._engine(node, self.manager.set_attributes(node.object, None, control.parse_copy(text)))
            elif name == b"user.mach.may_cache":
                await self._engine(node, self.manager.set_attributes(node.object, control.parse_bool(text, "may_cache"), None))
            else:
                self._store_call(self.manager.set_auto_ready, node.object, control.parse_bool(text, "auto_ready"))
        except ControlError as error:
            raise self._refuse(errno.EINVAL, f"setxattr {where}: {error}") from None
        self.trace.line(f"mount set {name.decode()}={text} on {display_name(node.object)}")

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._node(inode)
        if name in self._xattr_names(node):
            raise self._refuse(errno.EROFS, f"removexattr {self._path(node)} {name.decode(errors='replace')}")
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    # -- the rest ----------------------------------------------------------------------------

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        backing = os.statvfs(self.manager.store.root)
        data = pyfuse3.StatvfsData()
        data.f_bsize = backing.f_bsize
        data.f_frsize = backing.f_frsize
        data.f_blocks = backing.f_blocks
        data.f_bfree = backing.f_bfree
        data.f_bavail = backing.f_bavail
        data.f_files = backing.f_files
        data.f_ffree = backing.f_ffree
        data.f_favail = backing.f_favail
        data.f_namemax = 255
        return data

    async def forget(self, inode_list) -> None:
        pass  # inodes stay put for the mount's life: a node is a few dozen bytes


async def _drop_page_cache(inode: int) -> None:
    """Have Linux write back its dirty pages of the inode and drop every page.  In a thread:
    the invalidation waits for those write-backs, which this loop serves; abandoned if the
    mount ends meanwhile (the unmount ends it too)."""
    await trio.to_thread.run_sync(_invalidate_inode, inode, abandon_on_cancel=True)


def _invalidate_inode(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(inode)
    except OSError as error:
        # ENOENT: Linux has forgotten the inode, so it caches nothing of it.  Any other error
        # (none is known: ENOTCONN once unmounted, when nothing is cached either) is logged
        # and counts as a drop: waiting for ever would stop every kernel's writes.
        if error.errno != errno.ENOENT:
            log.warning("invalidating inode %d: %s", inode, error)

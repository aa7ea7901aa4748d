"""The file store: each memory object's bytes live in a real sparse file, its metadata beside it.

Layout under the store directory STORE:

    STORE/objects/NAME/data       the object's bytes, a sparse file; its length is the size
    STORE/objects/NAME/meta.json  {"format": 1, "size": N, "may_cache": false,
                                   "copy_strategy": "delay", "auto_ready": true}
    STORE/tmp/                    objects half-created or half-removed; emptied when a store opens

Names are `bytes`, exactly as FUSE hands them; they need not be UTF-8.  A name can never leave
`objects/`: `/`, NUL, `.` and `..` are refused.

The data file is the truth about an object's size.  meta.json records the size too, so a reader of
the store directory sees it, but a write that grows the object only rewrites meta.json at the next
`sync`, `truncate`, `set_meta` or `close` (rewriting it atomically costs two fsyncs, too much for
every write); an object whose meta.json lags behind is corrected from the data file when opened.

Errors: the store's own refusals and corrupt metadata raise `StoreError`, whose `errno` is what the
mount answers; failures of the operating system (ENOSPC, EFBIG, EIO from the disk) pass through as
the `OSError` they are.  Both carry `.errno`.

One FileStore owns a store directory at a time: opening a store clears its `tmp/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fusepager.store")

NAME_MAX = 255
META_FORMAT = 1
COPY_STRATEGIES = ("none", "call", "delay")
# off_t is signed 64-bit: no file offset or size can go beyond this.
MAX_FILE_SIZE = 2**63 - 1

_OBJECTS = b"objects"
_TMP = b"tmp"
_DATA = b"data"
_META = b"meta.json"
_META_TMP_PREFIX = b"meta.json.tmp-"


class StoreError(Exception):
    """A store operation refused, or found the store corrupt; `errno` is the answer to give."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_
        self.message = message


def _show(name: bytes) -> str:
    # Names can be 255 bytes of anything: keep messages readable.
    text = repr(name)
    return text if len(text) <= 70 else text[:60] + f"...' ({len(name)} bytes)"


def validate_name(name: bytes) -> None:
    """Refuse a name that could escape `objects/` or that no filesystem would accept."""
    if not isinstance(name, bytes):
        # A str here is a caller's bug; failing loudly beats silently encoding it.
        raise TypeError(f"object names are bytes, not {type(name).__name__}")
    if name == b"":
        raise StoreError(errno.EINVAL, "invalid object name b'': a name cannot be empty")
    if b"/" in name:
        raise StoreError(errno.EINVAL, f"invalid object name {_show(name)}: contains '/'")
    if b"\0" in name:
        raise StoreError(errno.EINVAL, f"invalid object name {_show(name)}: contains NUL")
    if name in (b".", b".."):
        raise StoreError(errno.EINVAL, f"invalid object name {_show(name)}")
    if len(name) > NAME_MAX:
        raise StoreError(
            errno.ENAMETOOLONG,
            f"object name too long: {len(name)} bytes, at most {NAME_MAX}: {_show(name)}",
        )


def _invalid(message: str) -> StoreError:
    return StoreError(errno.EINVAL, message)


@dataclass(frozen=True)
class ObjectMeta:
    """What meta.json records about an object.  Frozen: change it through StoredObject.set_meta."""

    size: int = 0
    may_cache: bool = False
    copy_strategy: str = "delay"
    auto_ready: bool = True

    def __post_init__(self) -> None:
        # `type(...) is` because bool is an int: a size of True is a bug, not 1.
        if type(self.size) is not int or not 0 <= self.size <= MAX_FILE_SIZE:
            raise _invalid(f"size must be an integer in 0..2**63-1, not {self.size!r}")
        if type(self.may_cache) is not bool:
            raise _invalid(f"may_cache must be true or false, not {self.may_cache!r}")
        if type(self.auto_ready) is not bool:
            raise _invalid(f"auto_ready must be true or false, not {self.auto_ready!r}")
        if type(self.copy_strategy) is not str or self.copy_strategy not in COPY_STRATEGIES:
            choices = ", ".join(COPY_STRATEGIES)
            raise _invalid(f"copy_strategy must be one of {choices}, not {self.copy_strategy!r}")

    def to_json(self) -> bytes:
        record = {
            "format": META_FORMAT,
            "size": self.size,
            "may_cache": self.may_cache,
            "copy_strategy": self.copy_strategy,
            "auto_ready": self.auto_ready,
        }
        return (json.dumps(record) + "\n").encode("ascii")

    @classmethod
    def from_json(cls, data: bytes, path: bytes | str) -> ObjectMeta:
        """Parse meta.json strictly; anything wrong is EIO naming `path`.  Extra keys are ignored
        so that a newer fusepager's metadata stays readable."""

        def corrupt(what: str) -> StoreError:
            return StoreError(errno.EIO, f"corrupt object metadata in {os.fsdecode(path)}: {what}")

        if not data.strip():
            raise corrupt("the file is empty")
        try:
            record = json.loads(data)
        except ValueError as error:  # bad JSON, truncated JSON, or not UTF-8
            raise corrupt(f"not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise corrupt(f"expected a JSON object, found {type(record).__name__}")
        keys = ("format", *(field.name for field in dataclasses.fields(cls)))
        missing = [key for key in keys if key not in record]
        if missing:
            raise corrupt(f"missing key(s): {', '.join(missing)}")
        if type(record["format"]) is not int or record["format"] != META_FORMAT:
            found = record["format"]
            raise corrupt(f"unsupported format {found!r} (this fusepager reads {META_FORMAT})")
        try:
            return cls(
                size=record["size"],
                may_cache=record["may_cache"],
                copy_strategy=record["copy_strategy"],
                auto_ready=record["auto_ready"],
            )
        except StoreError as error:
            raise corrupt(error.message) from None


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise _invalid(f"negative offset or length: offset={offset} length={length}")


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    """pread until `length` bytes or end of file; one read gives at most ~2 GiB on Linux."""
    first = os.pread(fd, length, offset)
    if len(first) == length or not first:
        return first
    pieces = [first]
    done = len(first)
    while done < length:
        piece = os.pread(fd, length - done, offset + done)
        if not piece:
            break
        pieces.append(piece)
        done += len(piece)
    return b"".join(pieces)


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    view = memoryview(data).cast("B")
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def _fsync_dir(path: bytes) -> None:
    # A rename or a new entry is only durable once the directory holding it is synced.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique_suffix() -> bytes:
    return b"%d-%s" % (os.getpid(), secrets.token_hex(8).encode())


def _write_meta_atomically(directory: bytes, meta: ObjectMeta) -> None:
    """Replace directory/meta.json: a crash leaves the old or the new file, never a torn one."""
    temp = os.path.join(directory, _META_TMP_PREFIX + _unique_suffix())
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            _pwrite_all(fd, meta.to_json(), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, os.path.join(directory, _META))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(directory)


def _is_object_dir(path: bytes) -> bool:
    """A real directory (not a symlink out of the store) holding a regular meta.json."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        return stat.S_ISREG(os.lstat(os.path.join(path, _META)).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _remove_tree(path: bytes) -> None:
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class StoredObject:
    """One object's data file, held open read-write, and its metadata.  Made by FileStore."""

    def __init__(self, name: bytes, path: bytes) -> None:
        self.name = name
        self.path = path
        self.data_path = os.path.join(path, _DATA)
        self.meta_path = os.path.join(path, _META)
        self._remove_stale_meta_temps()
        recorded = self._read_meta()
        try:
            # O_NOFOLLOW: a data symlink planted in the store must not lead writes elsewhere.
            self._fd = os.open(self.data_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as error:
            message = f"cannot open data file {os.fsdecode(self.data_path)}: {error.strerror}"
            raise StoreError(errno.EIO, message) from error
        try:
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                message = f"data file {os.fsdecode(self.data_path)} is not a regular file"
                raise StoreError(errno.EIO, message)
            actual = os.fstat(self._fd).st_size
            if recorded.size != actual:
                log.warning(
                    "object %s: %s records size %d but %s is %d bytes; the data file wins, "
                    "rewriting the metadata",
                    _show(name),
                    os.fsdecode(self.meta_path),
                    recorded.size,
                    os.fsdecode(self.data_path),
                    actual,
                )
                recorded = dataclasses.replace(recorded, size=actual)
                _write_meta_atomically(self.path, recorded)
        except BaseException:
            os.close(self._fd)
            raise
        # What meta.json holds now; its size may lag behind the data file until the next persist.
        self._recorded = recorded

    def _remove_stale_meta_temps(self) -> None:
        # Left by a crash between writing a temp file and renaming it; the store has one owner.
        for entry in os.listdir(self.path):
            if entry.startswith(_META_TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, entry))

    def _read_meta(self) -> ObjectMeta:
        try:
            with open(self.meta_path, "rb") as file:
                raw = file.read()
        except OSError as error:
            message = f"cannot read object metadata {os.fsdecode(self.meta_path)}: {error.strerror}"
            raise StoreError(errno.EIO, message) from error
        return ObjectMeta.from_json(raw, self.meta_path)

    def _fileno(self) -> int:
        if self._fd < 0:
            raise StoreError(errno.EBADF, f"object {_show(self.name)} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def size(self) -> int:
        return os.fstat(self._fileno()).st_size

    @property
    def meta(self) -> ObjectMeta:
        size = self.size
        if size == self._recorded.size:
            return self._recorded
        return dataclasses.replace(self._recorded, size=size)

    def read_pages(self, offset: int, length: int) -> bytes | None:
        """For the pager: None when [offset, offset+length) holds no data at all (a hole, or past
        the end), so the kernel gets data_unavailable rather than supplied zeros; otherwise exactly
        `length` bytes, zeros where there are holes or past the end."""
        _check_range(offset, length)
        fd = self._fileno()
        size = os.fstat(fd).st_size
        if length == 0 or offset >= size:
            return None
        try:
            data_start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # nothing but hole from offset to the end of the file
                return None
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            # The backing filesystem cannot tell holes: treat everything as data.
            data_start = offset
        if data_start >= offset + length:
            return None
        # The kernel reads holes as zeros without touching the disk; only the answer is allocated.
        return _pread_all(fd, min(length, size - offset), offset).ljust(length, b"\0")

    def read(self, offset: int, size: int) -> bytes:
        """For the mount's `data` file: pread, clipped at the object's size."""
        _check_range(offset, size)
        if size == 0:
            return b""
        # pread stops at the end of the file by itself; no fstat on this hot path.
        return _pread_all(self._fileno(), size, offset)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """pwrite all of `data`; writing past the end grows the object."""
        length = memoryview(data).nbytes
        _check_range(offset, length)
        if offset + length > MAX_FILE_SIZE:
            message = f"write of {length} bytes at offset {offset} is past the largest file size"
            raise StoreError(errno.EFBIG, message)
        return _pwrite_all(self._fileno(), data, offset)

    def truncate(self, size: int) -> None:
        _check_range(0, size)
        if size > MAX_FILE_SIZE:
            raise StoreError(errno.EFBIG, f"size {size} is past the largest file size")
        os.ftruncate(self._fileno(), size)
        self._persist(self._recorded)

    def set_meta(self, **changes: Any) -> None:
        """Change attributes (may_cache, copy_strategy, auto_ready); EINVAL for anything invalid."""
        if "size" in changes:
            raise _invalid("the size is the data file's length: use truncate() to change it")
        unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(ObjectMeta)})
        if unknown:
            raise _invalid(f"unknown object attribute(s): {', '.join(unknown)}")
        self._persist(dataclasses.replace(self._recorded, **changes))  # __post_init__ validates

    def _persist(self, meta: ObjectMeta) -> None:
        meta = dataclasses.replace(meta, size=self.size)
        _write_meta_atomically(self.path, meta)
        self._recorded = meta

    def sync(self) -> None:
        """Make the data and metadata durable."""
        os.fsync(self._fileno())
        if self._recorded.size != self.size:
            self._persist(self._recorded)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._recorded.size != self.size:
                self._persist(self._recorded)
        finally:
            self._release()

    def _release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"size={self.size}"
        return f"<StoredObject {_show(self.name)} {state}>"


class FileStore:
    """The objects of a store directory; one StoredObject per open name."""

    def __init__(self, root: str | os.PathLike[str] | bytes | os.PathLike[bytes]) -> None:
        self.root = os.path.abspath(os.fsencode(root))  # the same place whatever the cwd later is
        try:
            mode = os.stat(self.root).st_mode
        except FileNotFoundError:
            message = f"store directory {os.fsdecode(self.root)} does not exist"
            raise StoreError(errno.ENOENT, message) from None
        if not stat.S_ISDIR(mode):
            message = f"store path {os.fsdecode(self.root)} is not a directory"
            raise StoreError(errno.ENOTDIR, message)
        self.objects_dir = os.path.join(self.root, _OBJECTS)
        self.tmp_dir = os.path.join(self.root, _TMP)
        for directory in (self.objects_dir, self.tmp_dir):
            try:
                os.mkdir(directory, 0o755)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(directory).st_mode):
                    message = f"{os.fsdecode(directory)} is in the store but is not a directory"
                    raise StoreError(errno.ENOTDIR, message) from None
        # Whatever is in tmp/ is an object whose create or remove was interrupted: garbage.
        for entry in os.listdir(self.tmp_dir):
            _remove_tree(os.path.join(self.tmp_dir, entry))
        self._open: dict[bytes, StoredObject] = {}
        self._count: int | None = None  # objects, once counted (count())

    def __enter__(self) -> FileStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _object_path(self, name: bytes) -> bytes:
        validate_name(name)
        return os.path.join(self.objects_dir, name)

    def _tmp_path(self, purpose: bytes) -> bytes:
        return os.path.join(self.tmp_dir, purpose + b"-" + _unique_suffix())

    def _no_such_object(self, name: bytes) -> StoreError:
        message = f"no object named {_show(name)} in store {os.fsdecode(self.root)}"
        return StoreError(errno.ENOENT, message)

    def _already_exists(self, name: bytes) -> StoreError:
        message = f"object {_show(name)} already exists in store {os.fsdecode(self.root)}"
        return StoreError(errno.EEXIST, message)

    def names(self) -> list[bytes]:
        """The objects' names, sorted; stray entries that are not objects are skipped."""
        entries = os.listdir(self.objects_dir)
        names = sorted(e for e in entries if _is_object_dir(os.path.join(self.objects_dir, e)))
        self._count = len(names)
        return names

    def count(self) -> int:
        """How many objects there are: counted at the first call, kept up to date by create
        and remove since (the store has one owner), so asking again lists nothing."""
        if self._count is None:
            self._count = len(self.names())
        return self._count

    def exists(self, name: bytes) -> bool:
        return _is_object_dir(self._object_path(name))

    def create(self, name: bytes, meta: ObjectMeta | None = None) -> StoredObject:
        """Create an object of meta.size bytes, all hole, and open it; EEXIST if it exists."""
        path = self._object_path(name)
        if os.path.lexists(path):
            raise self._already_exists(name)
        meta = meta if meta is not None else ObjectMeta()
        # Built in tmp/ and renamed into objects/, so an object appears whole or not at all.
        staging = self._tmp_path(b"create")
        os.mkdir(staging, 0o755)
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            fd = os.open(os.path.join(staging, _DATA), flags, 0o644)
            try:
                os.ftruncate(fd, meta.size)
                os.fsync(fd)
            finally:
                os.close(fd)
            _write_meta_atomically(staging, meta)
            try:
                os.rename(staging, path)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise self._already_exists(name) from None
            if self._count is not None:
                self._count += 1
        except BaseException:
            _remove_tree(staging)
            raise
        _fsync_dir(self.objects_dir)
        return self.open(name)

    def open(self, name: bytes) -> StoredObject:
        """The object's open StoredObject: the same instance until it is closed or removed."""
        path = self._object_path(name)
        stored = self._open.get(name)
        if stored is not None and not stored.closed:
            return stored
        if not _is_object_dir(path):
            raise self._no_such_object(name)
        stored = StoredObject(name, path)
        self._open[name] = stored
        return stored

    def remove(self, name: bytes) -> None:
        """Remove the object, its data and metadata; its open StoredObject is closed."""
        path = self._object_path(name)
        if not _is_object_dir(path):
            raise self._no_such_object(name)
        # Renamed out of objects/ first, so a crash never leaves half an object under its name.
        graveyard = self._tmp_path(b"remove")
        os.rename(path, graveyard)
        if self._count is not None:
            self._count -= 1
        _fsync_dir(self.objects_dir)
        stored = self._open.pop(name, None)
        if stored is not None:
            stored._release()  # no point persisting metadata that is being deleted
        try:
            shutil.rmtree(graveyard)
        except OSError as error:
            # The object is gone already; what is left in tmp/ is cleared when the store next opens.
            leftover = os.fsdecode(graveyard)
            log.warning("removed %s but could not delete %s: %s", _show(name), leftover, error)

    def close(self) -> None:
        """Close every open object, persisting metadata; the first failure is raised at the end."""
        open_objects, self._open = list(self._open.values()), {}
        failures: list[Exception] = []
        for stored in open_objects:
            try:
                stored.close()
            except (OSError, StoreError) as error:
                failures.append(error)
        if failures:
            raise failures[0]

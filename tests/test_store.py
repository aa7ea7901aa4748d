"""FileStore: object data in real sparse files, metadata beside it, written atomically."""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fusepager import store as store_module
from fusepager.store import FileStore, ObjectMeta, StoredObject, StoreError, validate_name

PAGE = 4096
TIB = 1 << 40


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileStore]:
    with FileStore(tmp_path) as opened:
        yield opened


def object_dir(tmp_path: Path, name: bytes) -> bytes:
    return os.path.join(os.fsencode(tmp_path), b"objects", name)


def read_meta_json(tmp_path: Path, name: bytes) -> dict[str, object]:
    with open(os.path.join(object_dir(tmp_path, name), b"meta.json"), "rb") as file:
        return json.loads(file.read())


# --- names -----------------------------------------------------------------------------------

BAD_NAMES = [
    (b"", errno.EINVAL),
    (b"/", errno.EINVAL),
    (b"a/b", errno.EINVAL),
    (b"../escape", errno.EINVAL),
    (b"nul\0inside", errno.EINVAL),
    (b"\0", errno.EINVAL),
    (b".", errno.EINVAL),
    (b"..", errno.EINVAL),
    (b"a" * 256, errno.ENAMETOOLONG),
    (b"\xff" * 1000, errno.ENAMETOOLONG),
]

GOOD_NAMES = [
    b"with space", b"\xff\xfe", b"a" * 255, b"...", b".hidden", b"-", b"tab\there",
    "été".encode(),
]


@pytest.mark.parametrize(("name", "expected_errno"), BAD_NAMES)
def test_bad_names_are_refused_with_their_errno(name: bytes, expected_errno: int) -> None:
    with pytest.raises(StoreError) as caught:
        validate_name(name)
    assert caught.value.errno == expected_errno
    assert "name" in str(caught.value)


@pytest.mark.parametrize(("name", "expected_errno"), BAD_NAMES)
def test_store_refuses_bad_names_and_creates_nothing(
    tmp_path: Path, name: bytes, expected_errno: int
) -> None:
    before = sorted(os.listdir(tmp_path))
    with FileStore(tmp_path) as store:
        for call in (store.create, store.open, store.remove, store.exists):
            with pytest.raises(StoreError) as caught:
                call(name)
            assert caught.value.errno == expected_errno
        assert store.names() == []
    assert sorted(os.listdir(tmp_path)) == sorted({*before, "objects", "tmp"})
    assert os.listdir(tmp_path / "objects") == []


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_odd_but_valid_names_work(tmp_path: Path, name: bytes) -> None:
    validate_name(name)
    with FileStore(tmp_path) as store:
        stored = store.create(name)
        stored.write(0, b"x")
        assert store.names() == [name]
        assert store.exists(name)
        assert os.path.isfile(os.path.join(object_dir(tmp_path, name), b"data"))
    with FileStore(tmp_path) as store:
        assert store.open(name).read(0, 10) == b"x"


def test_str_names_are_a_type_error(store: FileStore) -> None:
    with pytest.raises(TypeError):
        store.create("text")  # type: ignore[arg-type]


# --- create, open, remove, names ---------------------------------------------------------------


def test_create_lays_out_data_and_meta(tmp_path: Path, store: FileStore) -> None:
    meta = ObjectMeta(size=3 * PAGE, may_cache=True, copy_strategy="call", auto_ready=False)
    stored = store.create(b"obj", meta)
    directory = object_dir(tmp_path, b"obj")
    assert stored.name == b"obj"
    assert stored.path == directory
    assert sorted(os.listdir(directory)) == [b"data", b"meta.json"]
    assert os.path.getsize(os.path.join(directory, b"data")) == 3 * PAGE
    assert read_meta_json(tmp_path, b"obj") == {
        "format": 1,
        "size": 3 * PAGE,
        "may_cache": True,
        "copy_strategy": "call",
        "auto_ready": False,
    }
    assert stored.meta == meta
    assert stored.size == 3 * PAGE


def test_create_defaults(tmp_path: Path, store: FileStore) -> None:
    stored = store.create(b"obj")
    assert stored.meta == ObjectMeta(0, may_cache=False, copy_strategy="delay", auto_ready=True)
    assert read_meta_json(tmp_path, b"obj") == {
        "format": 1, "size": 0, "may_cache": False, "copy_strategy": "delay", "auto_ready": True,
    }


def test_names_sorted_and_exists(store: FileStore) -> None:
    for name in (b"b", b"a", b"c"):
        store.create(name)
    assert store.names() == [b"a", b"b", b"c"]
    assert store.exists(b"b")
    assert not store.exists(b"d")


def test_open_returns_the_same_instance(store: FileStore) -> None:
    created = store.create(b"obj")
    assert store.open(b"obj") is created
    assert store.open(b"obj") is store.open(b"obj")


def test_open_after_close_gives_a_fresh_open_object(store: FileStore) -> None:
    first = store.create(b"obj")
    first.write(0, b"kept")
    first.close()
    assert first.closed
    second = store.open(b"obj")
    assert second is not first
    assert not second.closed
    assert second.read(0, 4) == b"kept"


def test_create_existing_is_eexist(store: FileStore) -> None:
    store.create(b"obj").write(0, b"original")
    with pytest.raises(StoreError) as caught:
        store.create(b"obj")
    assert caught.value.errno == errno.EEXIST
    assert "obj" in str(caught.value)
    assert store.open(b"obj").read(0, 100) == b"original"


def test_create_losing_a_race_is_eexist_and_leaves_nothing_behind(
    tmp_path: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create(b"obj").write(0, b"first")
    # As if another process created the object between the existence check and the rename.
    monkeypatch.setattr(store_module.os.path, "lexists", lambda path: False)
    with pytest.raises(StoreError) as caught:
        store.create(b"obj", ObjectMeta(size=PAGE))
    monkeypatch.undo()
    assert caught.value.errno == errno.EEXIST
    assert os.listdir(tmp_path / "tmp") == []
    assert store.open(b"obj").read(0, 100) == b"first"
    assert store.open(b"obj").size == 5


def test_create_over_a_stray_file_is_eexist(tmp_path: Path, store: FileStore) -> None:
    (tmp_path / "objects" / "stray").write_bytes(b"not an object")
    with pytest.raises(StoreError) as caught:
        store.create(b"stray")
    assert caught.value.errno == errno.EEXIST
    assert (tmp_path / "objects" / "stray").read_bytes() == b"not an object"


def test_open_and_remove_missing_are_enoent(store: FileStore) -> None:
    for call in (store.open, store.remove):
        with pytest.raises(StoreError) as caught:
            call(b"missing")
        assert caught.value.errno == errno.ENOENT
        assert "missing" in str(caught.value)


def test_remove_deletes_everything_and_closes_the_open_object(
    tmp_path: Path, store: FileStore
) -> None:
    stored = store.create(b"obj")
    stored.write(0, b"data")
    store.create(b"other")
    store.remove(b"obj")
    assert stored.closed
    assert store.names() == [b"other"]
    assert not store.exists(b"obj")
    assert not os.path.lexists(object_dir(tmp_path, b"obj"))
    assert os.listdir(tmp_path / "tmp") == []
    with pytest.raises(StoreError) as caught:
        store.open(b"obj")
    assert caught.value.errno == errno.ENOENT
    with pytest.raises(StoreError) as caught:
        stored.read(0, 4)
    assert caught.value.errno == errno.EBADF
    # The name is free again, and the new object starts empty.
    assert store.create(b"obj").read(0, 100) == b""


def test_store_close_closes_every_object(store: FileStore) -> None:
    objects = [store.create(name) for name in (b"a", b"b")]
    store.close()
    assert [stored.closed for stored in objects] == [True, True]


def test_missing_root_is_enoent(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as caught:
        FileStore(tmp_path / "nowhere")
    assert caught.value.errno == errno.ENOENT
    assert "nowhere" in str(caught.value)
    assert not (tmp_path / "nowhere").exists()


def test_root_that_is_a_file_is_enotdir(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError) as caught:
        FileStore(tmp_path / "file")
    assert caught.value.errno == errno.ENOTDIR
    assert "file" in str(caught.value)


def test_names_skips_stray_entries(tmp_path: Path, store: FileStore) -> None:
    store.create(b"real")
    objects = tmp_path / "objects"
    (objects / "stray-file").write_bytes(b"junk")
    (objects / "meta.json.tmp-1-abc").write_bytes(b"{")
    (objects / "empty-dir").mkdir()
    (objects / "data-only").mkdir()
    (objects / "data-only" / "data").write_bytes(b"")
    # A symlink could lead out of the store: never an object.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data").write_bytes(b"")
    (outside / "meta.json").write_bytes(ObjectMeta().to_json())
    (objects / "link").symlink_to(outside)
    assert store.names() == [b"real"]
    for stray in (b"stray-file", b"empty-dir", b"data-only", b"link"):
        assert not store.exists(stray)
        with pytest.raises(StoreError) as caught:
            store.open(stray)
        assert caught.value.errno == errno.ENOENT


def test_interrupted_create_or_remove_leftovers_are_cleared_on_open(tmp_path: Path) -> None:
    with FileStore(tmp_path) as store:
        store.create(b"obj")
    leftover = tmp_path / "tmp" / "create-1-dead"
    leftover.mkdir()
    (leftover / "data").write_bytes(b"half made")
    with FileStore(tmp_path) as store:
        assert os.listdir(tmp_path / "tmp") == []
        assert store.names() == [b"obj"]


# --- reading and writing -----------------------------------------------------------------------


def test_read_pages_of_a_hole_is_none(store: FileStore) -> None:
    stored = store.create(b"obj", ObjectMeta(size=16 * PAGE))
    assert stored.read_pages(0, PAGE) is None
    assert stored.read_pages(4 * PAGE, 8 * PAGE) is None


def test_read_pages_beyond_the_end_is_none(store: FileStore) -> None:
    stored = store.create(b"obj")
    stored.write(0, b"x" * PAGE)
    assert stored.read_pages(PAGE, PAGE) is None
    assert stored.read_pages(100 * PAGE, PAGE) is None


def test_read_pages_of_an_empty_range_is_none(store: FileStore) -> None:
    stored = store.create(b"obj")
    stored.write(0, b"x" * PAGE)
    assert stored.read_pages(0, 0) is None


def test_read_pages_partly_written_is_data_with_zeros(store: FileStore) -> None:
    stored = store.create(b"obj", ObjectMeta(size=64 * PAGE))
    stored.write(40 * PAGE + 10, b"hello")
    data = stored.read_pages(32 * PAGE, 16 * PAGE)
    assert data is not None
    assert len(data) == 16 * PAGE
    expected = bytearray(16 * PAGE)
    expected[8 * PAGE + 10 : 8 * PAGE + 15] = b"hello"
    assert data == bytes(expected)
    # Pages before and after the written one are still holes.
    assert stored.read_pages(32 * PAGE, 8 * PAGE) is None
    assert stored.read_pages(48 * PAGE, 16 * PAGE) is None


def test_read_pages_across_the_end_pads_with_zeros(store: FileStore) -> None:
    stored = store.create(b"obj")
    stored.write(0, b"abc")
    assert stored.read_pages(0, PAGE) == b"abc" + bytes(PAGE - 3)


def test_read_is_clipped_at_the_size(store: FileStore) -> None:
    stored = store.create(b"obj")
    stored.write(0, b"0123456789")
    assert stored.read(0, 100) == b"0123456789"
    assert stored.read(4, 3) == b"456"
    assert stored.read(8, 100) == b"89"
    assert stored.read(10, 100) == b""
    assert stored.read(1000, 100) == b""
    assert stored.read(3, 0) == b""


def test_read_of_a_hole_is_zeros(store: FileStore) -> None:
    stored = store.create(b"obj", ObjectMeta(size=2 * PAGE))
    assert stored.read(PAGE, 2 * PAGE) == bytes(PAGE)


def test_write_past_the_end_grows_the_object(tmp_path: Path, store: FileStore) -> None:
    stored = store.create(b"obj")
    assert stored.write(0, b"abc") == 3
    assert stored.size == 3
    assert stored.write(10 * PAGE, b"tail") == 4
    assert stored.size == 10 * PAGE + 4
    assert stored.meta.size == 10 * PAGE + 4
    assert stored.read(0, 3) == b"abc"
    assert stored.read(3, 10) == bytes(10)
    assert stored.read(10 * PAGE, 10) == b"tail"
    stored.sync()
    assert read_meta_json(tmp_path, b"obj")["size"] == 10 * PAGE + 4


def test_write_inside_keeps_the_size(store: FileStore) -> None:
    stored = store.create(b"obj", ObjectMeta(size=PAGE))
    assert stored.write(10, memoryview(b"mid")) == 3
    assert stored.size == PAGE
    assert stored.read(8, 7) == b"\0\0mid\0\0"


def test_close_records_the_grown_size_in_meta(tmp_path: Path, store: FileStore) -> None:
    stored = store.create(b"obj")
    stored.write(0, b"x" * 5000)
    stored.close()
    assert read_meta_json(tmp_path, b"obj")["size"] == 5000


def test_truncate_shrinks_and_grows(tmp_path: Path, store: FileStore) -> None:
    stored = store.create(b"obj")
    stored.write(0, b"0123456789")
    stored.truncate(4)
    assert stored.size == 4
    assert read_meta_json(tmp_path, b"obj")["size"] == 4
    assert stored.read(0, 100) == b"0123"
    stored.truncate(8)
    assert stored.size == 8
    assert read_meta_json(tmp_path, b"obj")["size"] == 8
    # Growing exposes zeros, never the bytes cut off before.
    assert stored.read(0, 100) == b"0123\0\0\0\0"
    stored.truncate(0)
    assert stored.size == 0
    assert stored.read_pages(0, PAGE) is None


@pytest.mark.parametrize(
    ("call", "expected_errno"),
    [
        (lambda stored: stored.read(-1, 10), errno.EINVAL),
        (lambda stored: stored.read(0, -1), errno.EINVAL),
        (lambda stored: stored.read_pages(-PAGE, PAGE), errno.EINVAL),
        (lambda stored: stored.write(-1, b"x"), errno.EINVAL),
        (lambda stored: stored.write(2**63 - 1, b"xy"), errno.EFBIG),
        (lambda stored: stored.truncate(-1), errno.EINVAL),
        (lambda stored: stored.truncate(2**63), errno.EFBIG),
    ],
)
def test_bad_offsets_are_refused_and_change_nothing(
    store: FileStore, call: Callable[[StoredObject], object], expected_errno: int
) -> None:
    stored = store.create(b"obj")
    stored.write(0, b"keep")
    with pytest.raises(StoreError) as caught:
        call(stored)
    assert caught.value.errno == expected_errno
    assert stored.read(0, 100) == b"keep"


def test_sparse_terabyte_object(tmp_path: Path, store: FileStore) -> None:
    stored = store.create(b"big", ObjectMeta(size=TIB))
    data_path = os.path.join(object_dir(tmp_path, b"big"), b"data")
    assert stored.size == TIB
    assert os.stat(data_path).st_size == TIB
    assert os.stat(data_path).st_blocks == 0
    assert stored.read_pages(TIB // 2, 64 * PAGE) is None
    assert stored.read_pages(TIB - PAGE, PAGE) is None
    # One page written in the middle: only it is data, its neighbours stay holes.
    stored.write(TIB // 2, b"m" * PAGE)
    assert os.stat(data_path).st_blocks * 512 <= 64 * PAGE
    assert stored.read_pages(TIB // 2, PAGE) == b"m" * PAGE
    assert stored.read_pages(TIB // 2 - 16 * PAGE, 16 * PAGE) is None
    assert stored.read_pages(TIB // 2 + 16 * PAGE, 16 * PAGE) is None
    assert stored.size == TIB


# --- metadata ----------------------------------------------------------------------------------


def test_set_meta_writes_meta_json(tmp_path: Path, store: FileStore) -> None:
    stored = store.create(b"obj", ObjectMeta(size=PAGE))
    stored.set_meta(may_cache=True, copy_strategy="none")
    stored.set_meta(auto_ready=False)
    expected = ObjectMeta(size=PAGE, may_cache=True, copy_strategy="none", auto_ready=False)
    assert stored.meta == expected
    assert read_meta_json(tmp_path, b"obj") == {
        "format": 1, "size": PAGE, "may_cache": True, "copy_strategy": "none", "auto_ready": False,
    }


def test_many_set_meta_leave_valid_meta_and_no_temp_files(tmp_path: Path, store: FileStore) -> None:
    stored = store.create(b"obj")
    strategies = ["none", "call", "delay"]
    for i in range(200):  # the last: i = 199 -> "call", may_cache True
        stored.set_meta(copy_strategy=strategies[i % 3], may_cache=bool(i % 2))
    assert sorted(os.listdir(object_dir(tmp_path, b"obj"))) == [b"data", b"meta.json"]
    assert read_meta_json(tmp_path, b"obj") == {
        "format": 1, "size": 0, "may_cache": True, "copy_strategy": "call", "auto_ready": True,
    }


@pytest.mark.parametrize(
    ("changes", "word"),
    [
        ({"copy_strategy": "sometimes"}, "copy_strategy"),
        ({"may_cache": 1}, "may_cache"),
        ({"auto_ready": "yes"}, "auto_ready"),
        ({"size": 10}, "truncate"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_set_meta_is_einval_and_changes_nothing(
    tmp_path: Path, store: FileStore, changes: dict[str, object], word: str
) -> None:
    stored = store.create(b"obj")
    before = read_meta_json(tmp_path, b"obj")
    with pytest.raises(StoreError) as caught:
        stored.set_meta(**changes)
    assert caught.value.errno == errno.EINVAL
    assert word in str(caught.value)
    assert read_meta_json(tmp_path, b"obj") == before
    assert stored.meta == ObjectMeta()


def test_a_failed_meta_write_leaves_the_old_meta_and_no_temp_file(
    tmp_path: Path, store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = store.create(b"obj")

    def crash(source: bytes, target: bytes) -> None:
        raise OSError(errno.EIO, "simulated crash before the rename")

    monkeypatch.setattr(store_module.os, "replace", crash)
    with pytest.raises(OSError):
        stored.set_meta(may_cache=True)
    monkeypatch.undo()
    assert read_meta_json(tmp_path, b"obj")["may_cache"] is False
    assert sorted(os.listdir(object_dir(tmp_path, b"obj"))) == [b"data", b"meta.json"]


def test_stale_meta_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    with FileStore(tmp_path) as store:
        store.create(b"obj")
    stale = os.path.join(object_dir(tmp_path, b"obj"), b"meta.json.tmp-99999-deadbeef")
    with open(stale, "wb") as file:
        file.write(b'{"format": 1, "si')
    with FileStore(tmp_path) as store:
        assert store.open(b"obj").meta == ObjectMeta()
    assert sorted(os.listdir(object_dir(tmp_path, b"obj"))) == [b"data", b"meta.json"]


def test_meta_json_round_trip_and_extra_keys_ignored() -> None:
    meta = ObjectMeta(size=12345, may_cache=True, copy_strategy="call", auto_ready=False)
    assert ObjectMeta.from_json(meta.to_json(), "meta.json") == meta
    record = json.loads(meta.to_json())
    record["from_the_future"] = {"anything": [1, 2]}
    assert ObjectMeta.from_json(json.dumps(record).encode(), "meta.json") == meta


@pytest.mark.parametrize(
    "size, may_cache, copy_strategy, auto_ready",
    [(-1, False, "delay", True), (True, False, "delay", True), (1.5, False, "delay", True),
     (0, 0, "delay", True), (0, False, "DELAY", True), (0, False, "delay", None)],
)
def test_invalid_object_meta_is_einval(
    size: object, may_cache: object, copy_strategy: object, auto_ready: object
) -> None:
    with pytest.raises(StoreError) as caught:
        ObjectMeta(size, may_cache, copy_strategy, auto_ready)  # type: ignore[arg-type]
    assert caught.value.errno == errno.EINVAL


VALID_META = ObjectMeta(size=0).to_json()


def _with(**changes: object) -> bytes:
    record = json.loads(VALID_META)
    record.update(changes)
    return json.dumps(record).encode()


def _without(key: str) -> bytes:
    record = json.loads(VALID_META)
    del record[key]
    return json.dumps(record).encode()


CORRUPT_META = [
    pytest.param(b"", "empty", id="empty"),
    pytest.param(b"\n", "empty", id="blank"),
    pytest.param(VALID_META[: len(VALID_META) // 2], "JSON", id="truncated"),
    pytest.param(b"not json at all", "JSON", id="garbage"),
    pytest.param(b"\xff\xfe\x00garbage", "JSON", id="binary"),
    pytest.param(b"[1, 2]", "JSON object", id="list"),
    pytest.param(_without("size"), "size", id="missing-size"),
    pytest.param(_without("format"), "format", id="missing-format"),
    pytest.param(_without("copy_strategy"), "copy_strategy", id="missing-copy-strategy"),
    pytest.param(_with(format=2), "format", id="future-format"),
    pytest.param(_with(size="0"), "size", id="string-size"),
    pytest.param(_with(size=-4096), "size", id="negative-size"),
    pytest.param(_with(size=1.0), "size", id="float-size"),
    pytest.param(_with(may_cache="false"), "may_cache", id="string-bool"),
    pytest.param(_with(auto_ready=1), "auto_ready", id="int-bool"),
    pytest.param(_with(copy_strategy="symmetric"), "copy_strategy", id="unknown-strategy"),
    pytest.param(_with(copy_strategy=2), "copy_strategy", id="numeric-strategy"),
]


@pytest.mark.parametrize(("content", "word"), CORRUPT_META)
def test_corrupt_meta_json_is_eio_naming_the_file(
    tmp_path: Path, content: bytes, word: str
) -> None:
    with FileStore(tmp_path) as store:
        store.create(b"obj")
    meta_path = os.path.join(object_dir(tmp_path, b"obj"), b"meta.json")
    with open(meta_path, "wb") as file:
        file.write(content)
    with FileStore(tmp_path) as store:
        assert store.names() == [b"obj"]
        with pytest.raises(StoreError) as caught:
            store.open(b"obj")
    assert caught.value.errno == errno.EIO
    assert os.fsdecode(meta_path) in str(caught.value)
    assert word in str(caught.value)
    # A corrupt file is reported, never "repaired" behind the user's back.
    with open(meta_path, "rb") as file:
        assert file.read() == content


def test_missing_data_file_is_eio_naming_it(tmp_path: Path) -> None:
    with FileStore(tmp_path) as store:
        store.create(b"obj")
    data_path = os.path.join(object_dir(tmp_path, b"obj"), b"data")
    os.unlink(data_path)
    with FileStore(tmp_path) as store:
        with pytest.raises(StoreError) as caught:
            store.open(b"obj")
    assert caught.value.errno == errno.EIO
    assert os.fsdecode(data_path) in str(caught.value)


def test_size_mismatch_the_data_file_wins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with FileStore(tmp_path) as store:
        store.create(b"obj", ObjectMeta(size=PAGE, may_cache=True))
    data_path = os.path.join(object_dir(tmp_path, b"obj"), b"data")
    with open(data_path, "r+b") as file:
        file.truncate(3 * PAGE)
        file.write(b"on disk")
    assert read_meta_json(tmp_path, b"obj")["size"] == PAGE
    with caplog.at_level(logging.WARNING, logger="fusepager.store"):
        with FileStore(tmp_path) as store:
            stored = store.open(b"obj")
            assert stored.size == 3 * PAGE
            assert stored.meta == ObjectMeta(size=3 * PAGE, may_cache=True)
            assert stored.read(0, 7) == b"on disk"
    assert read_meta_json(tmp_path, b"obj")["size"] == 3 * PAGE
    assert read_meta_json(tmp_path, b"obj")["may_cache"] is True
    warnings = [
        record for record in caplog.records
        if record.name == "fusepager.store" and record.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert str(PAGE) in warnings[0].getMessage() and str(3 * PAGE) in warnings[0].getMessage()


# --- restart -----------------------------------------------------------------------------------


def test_a_new_store_on_the_same_directory_serves_the_same_bytes_and_meta(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 64
    with FileStore(tmp_path) as store:
        stored = store.create(b"obj", ObjectMeta(size=1 << 30))
        stored.write(5 * PAGE, payload)
        stored.write((1 << 30) + 100, b"grown")
        stored.set_meta(copy_strategy="call", auto_ready=False)
        store.create(b"\xff\xfe").write(0, b"odd")
    with FileStore(tmp_path) as store:
        assert store.names() == [b"obj", b"\xff\xfe"]
        stored = store.open(b"obj")
        assert stored.size == (1 << 30) + 105
        expected = ObjectMeta(size=(1 << 30) + 105, copy_strategy="call", auto_ready=False)
        assert stored.meta == expected
        assert stored.read(5 * PAGE, len(payload)) == payload
        assert stored.read_pages(5 * PAGE, len(payload)) == payload
        assert stored.read_pages(0, 5 * PAGE) is None
        assert stored.read((1 << 30) + 100, 10) == b"grown"
        assert store.open(b"\xff\xfe").read(0, 10) == b"odd"


def test_a_second_store_sees_writes_after_sync(tmp_path: Path) -> None:
    with FileStore(tmp_path) as first:
        first.create(b"obj").write(0, b"shared")
        first.open(b"obj").sync()
        with FileStore(tmp_path) as second:
            assert second.open(b"obj").read(0, 100) == b"shared"
            assert second.open(b"obj").meta.size == 6

"""The bad input table (issue [7/8]): every bad input a user or a peer can give, with the error
it gets.  Each is tried on a real mount where a kernel uses the object; none may change data,
stop the daemon or disturb the kernel.  docs/reliability.md lists the same table."""

from __future__ import annotations

import random

import pytest

from fusepager.session import MountSession
from mounting import fails_with, sh, trace_lines
from rawpeer import RawPeer
from test_foreign_peers import _malformed, _unix_path

EINVAL, EROFS, EBUSY, ENOENT = "Invalid argument", "Read-only file system", "Device or resource busy", "No such file or directory"
EEXIST, ENAMETOOLONG, EPERM, ENOTSUP = "File exists", "File name too long", "Operation not permitted", "Operation not supported"
E2BIG, EFBIG, ENODATA = "Argument list too long", "File too large", "No such attribute"

CTL_LINES = [
    "", "frobnicate", "sync now", "flush 4096", "flush -1 10", "flush ten 10", "flush 0 99999999999999999999999",
    "clean 1 2 3", "lock 0 4096", "lock 0 0 w", "lock 0 4096 q", "destroy a b", "destroy KERN_NOPE", "attributes",
    "attributes may_cache=2", "attributes copy=lazy", "attributes colour=red", "attributes copy=none copy=call",
    "attributes copy",
]  # fmt: skip

# (what, shell command with MNT and OBJ for the mount and the object, the error it gets)
MOUNT_INPUTS = [
    ("object name over 255 bytes", f"mkdir MNT/objects/{'x' * 256}", ENAMETOOLONG),
    ("object that exists", "mkdir OBJ", EEXIST),
    ("object named .", "mkdir MNT/objects/.", EEXIST),
    ("object inside a missing one", "mkdir MNT/objects/a/b", ENOENT),
    ("directory at the root", "mkdir MNT/newdir", EROFS),
    ("directory in an object", "mkdir OBJ/sub", EROFS),
    ("file at the root", "touch MNT/rootfile", EROFS),
    ("file in an object", "touch OBJ/newfile", EROFS),
    ("file in objects/", "touch MNT/objects/file", EROFS),
    ("symbolic link", "ln -s x OBJ/link", EROFS),
    ("hard link", "ln OBJ/data OBJ/hard", EROFS),
    ("device node", "mknod MNT/objects/p p", EROFS),
    ("rename an object", "mv OBJ MNT/objects/other", EROFS),
    ("rename data", "mv OBJ/data OBJ/other", EROFS),
    ("remove data", "rm OBJ/data", EROFS),
    ("remove a mapped object", "rmdir OBJ", EBUSY),
    ("remove a missing object", "rmdir MNT/objects/nothing", ENOENT),
    ("remove a kernel directory", "rmdir OBJ/kernels/k1", EROFS),
    ("write trace", "echo x > MNT/trace", EROFS),
    ("write stats", "echo x > MNT/stats", EROFS),
    ("truncate stats", "truncate -s 0 MNT/stats", EROFS),
    ("write a kernel's pages", "echo x > OBJ/kernels/k1/pages", EROFS),
    ("write a kernel's page_size", "echo 8192 > OBJ/kernels/k1/page_size", EROFS),
    ("ready twice", "echo copy=call > OBJ/kernels/k1/ready", EBUSY),
    ("write a snapshot", "echo x > OBJ/snapshots/1", EROFS),
    ("read a missing kernel", "cat OBJ/kernels/k9/pages", ENOENT),
    ("read a missing snapshot", "cat OBJ/snapshots/1", ENOENT),
    ("chmod", "chmod 777 OBJ/data", EPERM),
    ("chown", "chown nobody OBJ/data", EPERM),
    ("ctl line not UTF-8", "printf '\\xff\\xfe' > OBJ/ctl", EINVAL),
    ("ctl line of 2 MB", "head -c 2000000 /dev/zero | tr '\\0' a > OBJ/ctl", EINVAL),
    ("size beyond the limit", "dd if=/dev/zero of=OBJ/data bs=1 count=1 seek=9223372036854775000 status=none", EFBIG),
    ("may_cache 2", "setfattr -n user.mach.may_cache -v 2 OBJ", EINVAL),
    ("may_cache empty", "setfattr -n user.mach.may_cache -v '' OBJ", EINVAL),
    ("copy_strategy lazy", "setfattr -n user.mach.copy_strategy -v lazy OBJ", EINVAL),
    ("copy_strategy of 70,000 bytes", "setfattr -n user.mach.copy_strategy -v $(head -c 70000 /dev/zero | tr '\\0' a) OBJ", E2BIG),
    ("auto_ready maybe", "setfattr -n user.mach.auto_ready -v maybe OBJ", EINVAL),
    ("unknown user.mach attribute", "setfattr -n user.mach.nonsense -v 1 OBJ", EINVAL),
    ("read an unknown attribute", "getfattr -n user.mach.nonsense OBJ", ENODATA),
    ("set size", "setfattr -n user.mach.size -v 10 OBJ", EROFS),
    ("set kernels", "setfattr -n user.mach.kernels -v k9 OBJ", EROFS),
    ("remove an attribute", "setfattr -x user.mach.may_cache OBJ", EROFS),
    ("set a kernel's page_size", "setfattr -n user.mach.page_size -v 1 OBJ/kernels/k1", EROFS),
    ("attribute outside user.mach", "setfattr -n user.other -v 1 OBJ", ENOTSUP),
    ("trusted attribute", "setfattr -n trusted.x -v 1 OBJ", ENOTSUP),
    ("set the daemon's pid", "setfattr -n user.fusepager.pid -v 1 MNT", ENOTSUP),
] + [(f"ctl line {line!r}", f"echo '{line}' > OBJ/ctl", EINVAL) for line in CTL_LINES]

TRANSPORT_INPUTS = [
    ("HELLO of another version", "protocol version"),
    ("HELLO of the wrong length", "HELLO"),
    ("HELLO name not UTF-8", "not UTF-8"),
    ("a message before HELLO", "expected HELLO"),
    ("frame length 0", "frame length 0 outside"),
    ("frame longer than the limit", "outside 1.."),
    ("unknown frame kind", "unknown frame kind"),
    ("MESSAGE without a destination", "MESSAGE without a destination"),
    ("MESSAGE to a port never given", "which was never given to this peer"),
    ("MESSAGE to the sender's own port", "the peer's own port"),
    ("unknown message id", "unknown message id"),
    ("truncated message", "truncated in"),
    ("trailing bytes", "trailing bytes"),
    ("data field beyond the bound", "exceeds"),
    ("null port where a right is required", "null port where a right is required"),
    ("a right of a kind the field does not take", "not allowed"),
    ("a right to a port never given", "was never given to this peer"),
    ("the receive right of the manager's own port", "disposition 16 not allowed"),
    ("DEAD of the wrong length", "DEAD frame of the wrong length"),
    ("a message the port does not serve", "name service refused"),
]


GENERATOR_TRIES = 10_000
"""Draws of the fuzz generator (about 23 classes, chosen uniformly) to find one class: a class
it no longer makes fails the test instead of hanging it."""


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-inputs")
    with MountSession(tmp / "store", tmp / "mnt", ["k1:4096:64"]) as session:
        obj = session.mountpoint / "objects" / "hello"
        sh(f"mkdir {obj} && printf 'keep me' > {obj}/data && truncate -s 64K {obj}/data")
        session.command("k1 map hello 64K")
        session.command("k1 write hello+100 kernel bytes")
        yield session


def _unchanged(session: MountSession) -> None:
    obj = session.mountpoint / "objects" / "hello"
    assert sh(f"dd if={obj}/data bs=1 count=7 status=none").stdout == "keep me"
    assert session.command("k1 read hello+100 12 text").endswith("'kernel bytes'")
    assert sh(f"ls {session.mountpoint}/objects").stdout.split() == ["hello"]
    assert sh(f"ls {obj}/kernels").stdout.split() == ["k1"]
    assert session.process.poll() is None


def test_the_table_has_at_least_fifty_inputs():
    assert len(MOUNT_INPUTS) + len(TRANSPORT_INPUTS) >= 50
    assert len({what for what, _, _ in MOUNT_INPUTS}) == len(MOUNT_INPUTS)


@pytest.mark.parametrize(("what", "command", "error"), MOUNT_INPUTS, ids=[what for what, _, _ in MOUNT_INPUTS])
def test_a_bad_input_through_the_mount_gets_its_error_and_changes_nothing(session, what, command, error):
    mnt = str(session.mountpoint)
    fails_with(command.replace("OBJ", f"{mnt}/objects/hello").replace("MNT", mnt), error)
    _unchanged(session)


@pytest.mark.parametrize(("what", "reason"), TRANSPORT_INPUTS, ids=[what for what, _ in TRANSPORT_INPUTS])
def test_a_bad_frame_gets_its_logged_reason_and_changes_nothing(session, what, reason):
    path = _unix_path(session.listen_address)
    rng = random.Random(what)
    for _ in range(GENERATOR_TRIES):  # the fuzz generator, asked until it gives this class
        state = rng.getstate()
        kind, needs_hello, frames = _malformed(rng, 1)
        if kind == what:
            break
    else:
        pytest.fail(f"the fuzz generator gave no {what!r} in {GENERATOR_TRIES} tries: is the class still one of its cases?")
    before = len(trace_lines(session.mountpoint))
    with RawPeer(path) as peer:
        if needs_hello:
            bootstrap = peer.hello()
            rng.setstate(state)
            _, _, frames = _malformed(rng, bootstrap)
        for data in frames:
            peer.send(data)
        if what != "a message the port does not serve":
            assert peer.closed_by_other_side(), f"{what}: the connection stayed open"
    lines = "\n".join(trace_lines(session.mountpoint)[before:])
    assert reason in lines, f"{what}: no {reason!r} in the trace:\n{lines}"
    _unchanged(session)

"""Peers that break the rules (issue [5/8]): malformed frames by the thousand, and port names
that were never given.  Each is refused on its own connection, with a logged reason; the
process that refuses stays up and goes on serving the peers that behave."""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trio

from fusepager.mount import MAX_KERNEL_CONNECTIONS
from fusepager.session import KernelProcess, MountSession
from kernelsim import codec, messages as m
from kernelsim.interface import MACH_MSG_TYPE_PORT_RECEIVE, MACH_MSG_TYPE_PORT_SEND, MACH_MSG_TYPE_PORT_SEND_ONCE
from kernelsim.transport import DEAD, HELLO, MAX_FRAME, MESSAGE
from mounting import mapped_by_kernel_process, wait_until
from rawpeer import Placeholder, RawPeer, frame, hello_payload, message_payload, yours

FUZZ_FRAMES = 10_000
SEED = int(os.environ.get("FUSEPAGER_SEED", "20261127"))


def _unix_path(address: str) -> str:
    assert address.startswith("unix:"), address
    return address[len("unix:") :]


def _read(path: Path) -> bytes:
    return subprocess.run(["cat", str(path)], capture_output=True, check=True, timeout=60).stdout


@pytest.fixture
def served(tmp_path):
    """A mount listening for kernels, an object `shared` of 64 KiB, and kernel process k1
    mapping it; all ended by PID whatever happens."""
    with mapped_by_kernel_process(tmp_path, "shared") as mapped:
        yield mapped


# -- the fuzz ---------------------------------------------------------------------------------


def _lookup(name: bytes, reply_name: int = 1) -> tuple[m.Message, dict[int, int]]:
    reply = Placeholder().send_once()
    return m.NetnameLookUp(name=name, reply=reply), {id(reply): reply_name}


def _malformed(rng: random.Random, bootstrap: int) -> tuple[str, bool, list[bytes]]:
    """One malformed exchange: its class, whether it needs our HELLO first, and the frames
    (raw bytes) to send."""
    lookup, names = _lookup(b"shared")
    valid = message_payload(yours(bootstrap), lookup, names)
    body = valid[8:]
    cases = [
        ("garbage before HELLO", False, [rng.randbytes(rng.randint(1, 64))]),
        ("HELLO of another version", False, [frame(HELLO, hello_payload(version=rng.randint(2, 65535)))]),
        ("HELLO of the wrong length", False, [frame(HELLO, hello_payload()[: rng.randint(0, 12)])]),
        ("HELLO name not UTF-8", False, [frame(HELLO, struct.pack("<HH", 1, 2) + b"\xff\xfe" + bytes(8))]),
        ("a message before HELLO", False, [frame(MESSAGE, valid)]),
        ("frame length 0", True, [struct.pack("<IB", 0, MESSAGE)]),
        ("frame longer than the limit", True, [struct.pack("<IB", rng.randint(MAX_FRAME + 2, 2**32 - 1), MESSAGE)]),
        ("unknown frame kind", True, [frame(rng.choice([0, 4, 5, 99, 255]), rng.randbytes(rng.randint(0, 16)))]),
        ("MESSAGE without a destination", True, [frame(MESSAGE, rng.randbytes(rng.randint(0, 7)))]),
        ("MESSAGE to a port never given", True, [frame(MESSAGE, struct.pack("<Q", yours(rng.randint(bootstrap + 1, 2**40))) + body)]),
        ("MESSAGE to the sender's own port", True, [frame(MESSAGE, struct.pack("<Q", rng.randint(1, 2**40)) + body)]),
        ("unknown message id", True, [frame(MESSAGE, struct.pack("<QI", yours(bootstrap), rng.randint(5000, 2**32 - 1)) + body[4:])]),
        ("truncated message", True, [frame(MESSAGE, valid[: rng.randint(9, len(valid) - 1)])]),
        ("trailing bytes", True, [frame(MESSAGE, valid + rng.randbytes(rng.randint(1, 8)))]),
        ("data field beyond the bound", True, [frame(MESSAGE, valid[:12] + struct.pack("<I", codec.MAX_DATA + rng.randint(1, 2**20)) + body[8:])]),
        ("null port where a right is required", True, [frame(MESSAGE, valid[: len(valid) - 9] + bytes(9))]),
        ("a right of a kind the field does not take", True, [frame(MESSAGE, valid[: len(valid) - 9] + struct.pack("<BQ", MACH_MSG_TYPE_PORT_RECEIVE, 1))]),
        ("a right to a port never given", True, [frame(MESSAGE, valid[: len(valid) - 9] + struct.pack("<BQ", MACH_MSG_TYPE_PORT_SEND_ONCE, yours(rng.randint(bootstrap + 1, 2**40))))]),
        ("the receive right of the manager's own port", True, [frame(MESSAGE, valid[: len(valid) - 9] + struct.pack("<BQ", MACH_MSG_TYPE_PORT_RECEIVE, yours(bootstrap)))]),
        ("DEAD of the wrong length", True, [frame(DEAD, rng.randbytes(rng.choice([0, 4, 9, 16])))]),
        ("a frame cut short", True, [frame(MESSAGE, valid)[: rng.randint(1, len(valid) + 4)]]),
        ("one byte flipped", True, [_flip(rng, frame(MESSAGE, valid))]),
        ("a message the port does not serve", True, [frame(MESSAGE, message_payload(yours(bootstrap), _lock_request(), {}))]),
    ]
    return rng.choice(cases)


def _flip(rng: random.Random, data: bytes) -> bytes:
    changed = bytearray(data)
    changed[rng.randrange(len(changed))] ^= 1 << rng.randrange(8)
    return bytes(changed)


def _lock_request() -> m.Message:
    return m.MemoryObjectLockRequest(offset=0, size=4096, should_return=0, should_flush=True, lock_value=0, reply_to=None)


class _Worker(threading.Thread):
    """A well-behaved kernel at work while the fuzz runs: writes, reads back, syncs."""

    def __init__(self, k1: KernelProcess) -> None:
        super().__init__(daemon=True)
        self.k1 = k1
        self.done = threading.Event()
        self.rounds = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.done.is_set():
                self.rounds += 1
                text = f"round {self.rounds:06d}"
                where = f"shared+{(self.rounds % 16) * 4096}"
                self.k1.command(f"write {where} {text}")
                answer = self.k1.command(f"read {where} {len(text)} text")
                assert answer.endswith(f"'{text}'"), answer
                if self.rounds % 8 == 0:
                    self.k1.command("sync")
        except BaseException as error:  # reported by the test
            self.failure = error


def test_ten_thousand_malformed_frames_leave_the_manager_serving(served):
    session, k1, obj = served
    path = _unix_path(session.listen_address)
    rng = random.Random(SEED)
    worker = _Worker(k1)
    worker.start()
    sent: dict[str, int] = {}
    not_closed: list[str] = []
    refused_busy = 0
    try:
        for _ in range(FUZZ_FRAMES):
            # The frames name the bootstrap port, whose name only HELLO tells: choose the
            # case, greet if it needs that, then make its frames with the real name.
            state = rng.getstate()
            what, needs_hello, frames = _malformed(rng, 1)
            peer = RawPeer(path)
            if needs_hello:
                while (bootstrap := peer.hello()) is None:
                    # All the manager's connections are taken (ours, closing): it said no.
                    refused_busy += 1
                    peer.close()
                    time.sleep(0.01)
                    peer = RawPeer(path)
                rng.setstate(state)
                what, needs_hello, frames = _malformed(rng, bootstrap)
            with peer:
                for data in frames:
                    peer.send(data)
                sent[what] = sent.get(what, 0) + 1
                if what in ("a frame cut short", "one byte flipped", "garbage before HELLO", "a message the port does not serve"):
                    continue  # may be waiting for more, or even valid: we hang up
                if not peer.closed_by_other_side():
                    not_closed.append(what)
    finally:
        worker.done.set()
        worker.join(timeout=60)
    assert worker.failure is None, f"the well-behaved kernel failed during the fuzz: {worker.failure!r}"
    assert worker.rounds >= 10, f"the kernel only managed {worker.rounds} rounds during the fuzz"
    assert sum(sent.values()) == FUZZ_FRAMES
    assert not not_closed, f"connections the manager left open after a bad frame: {not_closed[:10]}"
    # The manager is up and the kernel's work is there, through the mount.
    k1.command("sync")
    data = _read(obj / "data")
    last = worker.rounds
    for rounds in range(max(1, last - 15), last + 1):
        text = f"round {rounds:06d}".encode()
        # Each page holds the last round written to it; a later round may have replaced it.
        page = (rounds % 16) * 4096
        assert data[page : page + len(text)] in (text, f"round {rounds + 16:06d}".encode())
    # Every connection's end was logged once, with its reason; the classes that are always a
    # protocol error were each refused as one.  The others may be waiting for more bytes when
    # we hang up, or be valid after all (a flipped byte, random garbage): the peer closed.
    uncertain = ("garbage before HELLO", "a frame cut short", "one byte flipped")
    not_errors = ("a message the port does not serve",)
    certain = sum(n for what, n in sent.items() if what not in uncertain + not_errors)
    maybe = sum(n for what, n in sent.items() if what in uncertain)

    def closed_lines() -> list[str]:
        trace = _read(session.mountpoint / "trace").decode(errors="replace")
        return [line for line in trace.splitlines() if "connection with" in line and " closed: " in line]

    # The last connections we hung up on may still be closing at the manager: wait for them.
    wait_until(lambda: len(closed_lines()) >= FUZZ_FRAMES, timeout=60, what=f"{FUZZ_FRAMES} connection ends in the trace")
    closed = closed_lines()
    assert len(closed) == FUZZ_FRAMES, f"{len(closed)} connection ends logged for {FUZZ_FRAMES} connections"
    protocol_errors = sum(" closed: protocol error: " in line for line in closed)
    assert certain <= protocol_errors <= certain + maybe, (protocol_errors, certain, maybe)
    trace = _read(session.mountpoint / "trace").decode(errors="replace")
    assert "frame length" in trace and "never given" in trace and "unknown message id" in trace
    print(f"fuzz seed {SEED}: {FUZZ_FRAMES} frames, {worker.rounds} kernel rounds meanwhile, {refused_busy} connections refused while the manager had {MAX_KERNEL_CONNECTIONS} open; by class: {sent}")


# -- forged port names ------------------------------------------------------------------------


def test_a_kernel_forging_port_names_changes_nothing_at_the_manager(served):
    session, k1, obj = served
    k1.command("write shared+0 precious data")
    k1.command("sync")
    before = _read(obj / "data")
    assert before.startswith(b"precious data")

    with RawPeer(_unix_path(session.listen_address)) as rogue:
        bootstrap = rogue.hello("rogue")
        # Legitimately: the object's port, by its name.
        lookup, names = _lookup(b"shared", reply_name=1)
        rogue.send_message(yours(bootstrap), lookup, names)
        _, answer, rights = rogue.read_message()
        assert isinstance(answer, m.NetnameLookUpReply) and answer.return_code == 0
        (_, object_name), = rights

        # 1. A page "returned" on a control port of its own that never went through init
        # (the rogue cannot name k1's: names are per connection).
        control = Placeholder().send()
        forged = m.MemoryObjectDataReturn(control=control, offset=0, data=b"FORGED".ljust(4096, b"!"), dirty=True, kernel_copy=False)
        assert rogue.send_message(yours(object_name), forged, {id(control): 3})
        _wait_for_trace(session, "from a control port this pager was never given")

        # 2. The same, claiming a port of the manager's it was never given: the connection ends.
        forged = m.MemoryObjectDataReturn(control=control, offset=0, data=b"FORGED".ljust(4096, b"!"), dirty=True, kernel_copy=False)
        rogue.send_message(yours(object_name), forged, {id(control): yours(object_name + 40)})
        assert rogue.closed_by_other_side()
    _wait_for_trace(session, "was never given to this peer")

    # Nothing changed: the data, the kernels the object knows, and k1 goes on.
    assert _read(obj / "data") == before
    assert sorted(os.listdir(obj / "kernels")) == ["k1"]
    assert k1.command("read shared+0 13 text").endswith("'precious data'")
    k1.command("write shared+0 still served")
    k1.command("sync")
    assert _read(obj / "data").startswith(b"still served")


def _wait_for_trace(session: MountSession, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in _read(session.mountpoint / "trace").decode(errors="replace"):
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} in the trace within {timeout} s")
        time.sleep(0.05)


def test_a_manager_forging_a_control_port_name_is_refused_by_the_kernel(tmp_path):
    """A rogue manager (this test, speaking frames by hand) serves a kernel process one page,
    then supplies another on a control port name the kernel never gave it."""
    path = str(tmp_path / "rogue.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(30)
    served_page = threading.Event()
    failure: list[BaseException] = []

    def rogue_manager() -> None:
        try:
            sock, _ = listener.accept()
            with RawPeer(None, timeout=30, sock=sock) as peer:
                peer.hello("rogue-manager", bootstrap=1)
                _, lookup, rights = peer.read_message()
                assert isinstance(lookup, m.NetnameLookUp) and lookup.name == b"obj"
                (_, reply_name), = rights
                port = Placeholder().send()
                peer.send_message(yours(reply_name), m.NetnameLookUpReply(return_code=0, port=port), {id(port): 7})
                _, init, rights = peer.read_message()
                assert isinstance(init, m.MemoryObjectInit)
                control = rights[0][1]
                peer.send_message(yours(control), m.MemoryObjectReady(may_cache=True, copy_strategy=0))
                _, request, _ = peer.read_message()
                assert isinstance(request, m.MemoryObjectDataRequest) and request.offset == 0
                page = b"genuine".ljust(4096, b"\0")
                peer.send_message(yours(control), m.MemoryObjectDataSupply(offset=0, data=page, lock_value=0, precious=False, reply_to=None))
                served_page.wait(30)
                forged = b"forged!".ljust(4096, b"\0")
                peer.send_message(yours(control + 1000), m.MemoryObjectDataSupply(offset=4096, data=forged, lock_value=0, precious=False, reply_to=None))
                assert peer.closed_by_other_side()
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=rogue_manager, daemon=True)
    thread.start()
    kernel = KernelProcess(f"unix:{path}", "k2", workdir=tmp_path)
    try:
        kernel.command("map obj 8K")
        assert kernel.command("read obj 7 text").endswith("'genuine'")
        served_page.set()
        line = kernel.wait_for_info("never given to this peer")
        assert "protocol error" in line and "rogue-manager" in line
        # The kernel is up; the forged page never reached a task.
        assert kernel.command("stat").startswith("ok stat kernel=k2")
        answer = kernel.answer_to("read obj+4096 7 text")
        assert "forged" not in answer and answer.startswith("error"), answer
    finally:
        served_page.set()
        kernel.close(timeout=10)
        thread.join(timeout=30)
        listener.close()
    assert not failure, failure

"""The transport on its own: two `Connection`s joined by an in-memory stream (trio's
memory_stream_pair), a real kernel on one side and a manager on the other.  The processes and
sockets around it are tested in test_processes.py and test_foreign_peers.py."""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
import trio
import trio.testing

import kernelsim
from kernelsim import messages as m
from kernelsim.interface import KERN_INVALID_NAME, KernMemoryError
from kernelsim.ipc_port import port_allocate
from kernelsim.transport import HELLO, MESSAGE, UNIX_PATH_MAX, Address, Connection
from managers import TestManager


async def _name_service(port, objects: dict[bytes, TestManager]) -> None:
    async for received in port:
        lookup = received.message
        found = objects.get(lookup.name)
        lookup.reply.send(
            m.NetnameLookUpReply(return_code=0 if found else KERN_INVALID_NAME, port=found.send_right() if found else None)
        )


async def _look_up(connection: Connection, name: bytes):
    reply = port_allocate("lookup reply")
    connection.peer_bootstrap.send(m.NetnameLookUp(name=name, reply=reply.make_send_once()))
    answer = (await reply.receive()).message
    reply.destroy()
    return answer


@pytest.fixture
async def joined(nursery):
    """(manager, manager's connection, kernel's connection): a TestManager reachable by the
    name b"hello" through the manager side's bootstrap port."""
    manager = TestManager()
    manager.fill_pattern()
    bootstrap = port_allocate("name service")
    nursery.start_soon(manager.run)
    nursery.start_soon(_name_service, bootstrap, {b"hello": manager})
    near, far = trio.testing.memory_stream_pair()
    manager_side = Connection(near, local_name="manager", bootstrap=bootstrap)
    kernel_side = Connection(far, local_name="k1")
    nursery.start_soon(manager_side.run)
    await nursery.start(kernel_side.run)
    yield manager, manager_side, kernel_side
    manager_side.close()
    kernel_side.close()


async def test_a_kernel_pages_through_a_connection_and_hands_its_ports_back(joined):
    manager, _, kernel_side = joined
    assert kernel_side.peer_name == "manager"
    answer = await _look_up(kernel_side, b"hello")
    assert answer.return_code == 0
    async with kernelsim.boot("k1", 4096, 16) as kernel:
        task = await kernel.task_create()
        address = await task.vm_map(answer.port, 16 * 4096)
        assert await task.read(address + 4096, 8) == manager.pattern(4096, 8)
        await task.write(address, b"over the wire")
        task.vm_deallocate(address, 16 * 4096)
        terminate = await manager.wait_for(m.MemoryObjectTerminate)
    assert bytes(manager.backing[:13]) == b"over the wire"
    # The rights came across as rights: the kernel's ports, now the manager's to destroy
    # (terminate moves the receive rights of control and name).
    kinds = [type(message).__name__ for message in manager.messages()]
    assert kinds[0] == "MemoryObjectInit" and kinds[-1] == "MemoryObjectTerminate"
    assert terminate.control.port.host == "manager"


async def test_a_lookup_of_an_unknown_name_gets_no_port(joined):
    _, _, kernel_side = joined
    answer = await _look_up(kernel_side, b"nobody")
    assert answer.return_code == KERN_INVALID_NAME and answer.port is None


async def test_when_the_connection_closes_the_kernel_fails_faults_on_the_managers_objects(joined):
    manager, manager_side, kernel_side = joined
    answer = await _look_up(kernel_side, b"hello")
    async with kernelsim.boot("k1", 4096, 16) as kernel:
        task = await kernel.task_create()
        address = await task.vm_map(answer.port, 16 * 4096)
        assert await task.read(address, 4) == manager.pattern(0, 4)
        manager_side.close("the test hangs up")
        await kernel_side.closed.wait()
        with pytest.raises(KernMemoryError):
            await task.read(address + 8 * 4096, 4)
    assert manager_side.close_reason == "the test hangs up"
    assert kernel_side.close_reason == "the peer closed the connection"


async def _raw_connection(nursery, payload_after_hello: bytes) -> Connection:
    """A connection whose peer is this test, writing `payload_after_hello` as raw bytes."""
    near, far = trio.testing.memory_stream_pair()
    connection = Connection(near, local_name="manager")
    nursery.start_soon(connection.run)
    name = b"raw"
    await far.send_all(struct.pack("<IB", 4 + len(name) + 8 + 1, HELLO) + struct.pack("<HH", 1, len(name)) + name + bytes(8))
    await far.send_all(payload_after_hello)
    return connection


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (struct.pack("<IB", 0xFFFFFFFF, MESSAGE), "frame length 4294967295 outside"),
        (struct.pack("<IB", 5, 42) + bytes(4), "unknown frame kind 42"),
        (struct.pack("<IB", 9, MESSAGE) + struct.pack("<Q", (1 << 63) | 77), "never given to this peer"),
        (struct.pack("<IB", 13, MESSAGE) + struct.pack("<QI", 5, 2200), "the peer's own port 5"),
    ],
)
async def test_a_bad_frame_closes_the_connection_with_its_reason(nursery, frame, reason):
    connection = await _raw_connection(nursery, frame)
    with trio.fail_after(5):
        await connection.closed.wait()
    assert reason in connection.close_reason


def test_addresses_parse_or_say_what_is_wrong():
    assert str(Address.parse("unix:/run/x.sock")) == "unix:/run/x.sock"
    assert Address.parse("tcp:127.0.0.1:7000") == Address("tcp", host="127.0.0.1", port=7000)
    assert Address.parse("tcp:[::1]:7000").host == "::1"
    for bad in ("", "unix:", "tcp:host", "tcp:host:port", "udp:x:1", "/path/only"):
        with pytest.raises(ValueError, match="use unix:PATH or tcp:HOST:PORT"):
            Address.parse(bad)


async def test_a_unix_listener_replaces_a_stale_socket_but_nothing_else(tmp_path):
    path = tmp_path / "m.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file with nobody listening: a manager that died
    address = Address("unix", path=str(path))
    listeners = await address.listeners()
    try:
        # A second manager on the same socket would steal the first one's kernels.
        with pytest.raises(OSError) as raised:
            await address.listeners()
        assert raised.value.errno == errno.EADDRINUSE
    finally:
        for listener in listeners:
            await listener.aclose()
        address.remove()
    assert not path.exists()

    path.write_text("not a socket")
    with pytest.raises(OSError) as raised:
        await address.listeners()
    assert raised.value.errno == errno.EEXIST and path.read_text() == "not a socket"

    long = Address("unix", path=str(tmp_path / ("x" * UNIX_PATH_MAX)))
    with pytest.raises(OSError) as raised:
        await long.listeners()
    assert raised.value.errno == errno.ENAMETOOLONG
    assert not os.path.exists(long.path)


async def test_a_return_bigger_than_a_message_may_carry_arrives_whole(nursery):
    """A kernel giving back more than the codec's bound at once (here 70 MiB of adjacent dirty
    pages) splits it into messages the transport can carry: nothing is dropped."""
    size = 70 << 20
    manager = TestManager(size=size)
    bootstrap = port_allocate("name service")
    nursery.start_soon(manager.run)
    nursery.start_soon(_name_service, bootstrap, {b"big": manager})
    near, far = trio.testing.memory_stream_pair()
    manager_side = Connection(near, local_name="manager", bootstrap=bootstrap)
    kernel_side = Connection(far, local_name="k1")
    nursery.start_soon(manager_side.run)
    await nursery.start(kernel_side.run)
    answer = await _look_up(kernel_side, b"big")
    async with kernelsim.boot("k1", 4096, size // 4096 + 16) as kernel:
        task = await kernel.task_create()
        address = await task.vm_map(answer.port, size)
        await task.write(address, bytes(range(256)) * (size // 256))
        task.vm_deallocate(address, size)
        await manager.wait_for(m.MemoryObjectTerminate)
    assert bytes(manager.backing) == bytes(range(256)) * (size // 256)
    returns = manager.messages(m.MemoryObjectDataReturn)
    assert all(len(message.data) <= 1 << 20 for message in returns)
    manager_side.close()
    kernel_side.close()

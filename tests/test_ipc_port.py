"""Ports, rights, port sets, seqnos and notifications."""

from __future__ import annotations

import pytest
import trio

from kernelsim import port_allocate, port_set_allocate
from kernelsim.interface import KernInvalidRight, MachRcvPortDied, MachSendInvalidDest
from kernelsim.messages import MachNotifyDeadName, MachNotifyNoSenders, MemoryObjectDestroy, MemoryObjectInit


def destroy(reason: int) -> MemoryObjectDestroy:
    return MemoryObjectDestroy(reason=reason)


async def test_messages_arrive_in_order_with_seqnos_from_one_per_port():
    a, b = port_allocate("a"), port_allocate("b")
    send_a, send_b = a.make_send(), b.make_send()
    for reason in range(5):
        send_a.send(destroy(reason))
        send_b.send(destroy(100 + reason))
    got_a = [await a.receive() for _ in range(5)]
    got_b = [await b.receive() for _ in range(5)]
    assert [r.seqno for r in got_a] == [1, 2, 3, 4, 5]
    assert [r.message.reason for r in got_a] == [0, 1, 2, 3, 4]
    assert [r.seqno for r in got_b] == [1, 2, 3, 4, 5]
    assert all(r.port == a for r in got_a)


async def test_seqno_is_given_at_dequeue_not_at_send():
    port = port_allocate()
    send = port.make_send()
    send.send(destroy(1))
    first = await port.receive()
    send.send(destroy(2))
    send.send(destroy(3))
    assert first.seqno == 1
    assert [(await port.receive()).seqno for _ in range(2)] == [2, 3]


async def test_receive_waits_for_a_message():
    port = port_allocate()
    send = port.make_send()
    got = []

    async def receiver():
        got.append(await port.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        send.send(destroy(7))
    assert got[0].message.reason == 7


async def test_port_set_receives_from_every_member_in_arrival_order():
    ports = [port_allocate(f"p{i}") for i in range(3)]
    port_set = port_set_allocate()
    for port in ports:
        port_set.add(port)
    sends = [port.make_send() for port in ports]
    order = [2, 0, 1, 1, 2, 0, 0]
    for n, which in enumerate(order):
        sends[which].send(destroy(n))
    received = [await port_set.receive() for _ in order]
    assert [r.message.reason for r in received] == list(range(len(order)))
    assert [ports.index(r.port) for r in received] == order
    # each port numbers its own messages
    for index, port in enumerate(ports):
        assert [r.seqno for r in received if r.port == port] == list(range(1, order.count(index) + 1))


async def test_messages_queued_before_joining_a_set_are_received_from_it():
    port = port_allocate()
    port.make_send().send(destroy(1))
    port_set = port_set_allocate()
    port_set.add(port)
    with trio.fail_after(1):
        received = await port_set.receive()
    assert received.message.reason == 1 and received.port == port


async def test_a_member_port_cannot_be_received_from_directly():
    port = port_allocate()
    port_set_allocate().add(port)
    with pytest.raises(KernInvalidRight):
        await port.receive()


async def test_send_once_right_is_used_up_by_one_send():
    port = port_allocate()
    once = port.make_send_once()
    once.send(destroy(1))
    with pytest.raises(KernInvalidRight):
        once.send(destroy(2))
    assert port.port.queued == 1


async def test_a_receive_right_cannot_send():
    port = port_allocate()
    with pytest.raises(KernInvalidRight):
        port.send(destroy(1))


async def test_sending_to_a_dead_port_fails_and_dead_name_is_notified():
    port = port_allocate("victim")
    send = port.make_send()
    notify = port_allocate("notify")
    send.request_dead_name(notify.make_send())
    port.destroy()
    with pytest.raises(MachSendInvalidDest) as failure:
        send.send(destroy(1))
    assert failure.value.port_name == port.name
    note = (await notify.receive()).message
    assert isinstance(note, MachNotifyDeadName) and note.name == port.name


async def test_dead_name_request_on_an_already_dead_port_fires_at_once():
    port = port_allocate()
    send = port.make_send()
    port.destroy()
    notify = port_allocate()
    send.request_dead_name(notify.make_send())
    assert (await notify.receive()).message == MachNotifyDeadName(name=port.name)


async def test_a_waiting_receive_ends_when_the_port_dies():
    port = port_allocate()
    result = []

    async def receiver():
        with pytest.raises(MachRcvPortDied):
            await port.receive()
        result.append("ended")

    async def iterate():
        async for _ in port:
            pass
        result.append("iteration ended")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        nursery.start_soon(iterate)
        await trio.testing.wait_all_tasks_blocked()
        port.destroy()
    assert sorted(result) == ["ended", "iteration ended"]


async def test_no_senders_fires_when_the_last_send_right_goes():
    port = port_allocate()
    first = port.make_send()
    second = first.copy()
    third = port.make_send()
    notify = port_allocate()
    port.request_no_senders(notify.make_send_once())
    first.deallocate()
    second.deallocate()
    assert notify.receive_nowait() is None
    third.deallocate()
    note = (await notify.receive()).message
    assert isinstance(note, MachNotifyNoSenders)
    assert note.mscount == 2  # make_send twice; copy does not count


async def test_rights_in_a_message_that_is_never_received_are_released():
    carried = port_allocate("carried")
    notify = port_allocate()
    right = carried.make_send()
    carried.request_no_senders(notify.make_send_once())
    mailbox = port_allocate("mailbox")
    mailbox.make_send().send(MemoryObjectInit(control=right, name=carried.make_send(), page_size=4096))
    assert notify.receive_nowait() is None
    mailbox.destroy()  # the queued init dies with the mailbox, and with it both send rights
    assert isinstance((await notify.receive()).message, MachNotifyNoSenders)


async def test_rights_name_ports_and_compare_by_port():
    port = port_allocate()
    assert port.make_send() == port.make_send()
    assert port.make_send() != port.make_send_once()
    assert port.make_send() != port_allocate().make_send()
    assert port.make_send().name == port.name == port.port.name

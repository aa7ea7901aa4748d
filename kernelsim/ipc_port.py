"""Ports, port rights and port sets: the IPC the kernel and its memory managers talk over.

As in Mach, a port is a message queue with exactly one receive right and any number of send and
send-once rights.  A message sent to a port is queued; the receiver dequeues it and gets the
port's next sequence number with it (seqnos are given at dequeue, so a manager that receives on
many threads can still apply messages in order).  A port whose receive right is destroyed is
dead: sends to it fail and holders who asked are told by a dead-name notification.  The receiver
can ask to be told when the last send right goes (no-senders notification).

Ports the kernel itself serves (control ports) carry a `kobject` handler instead of a queue
reader: a send to them runs the kernel call at once, in the sender's task, the way a Mach
kernel handles a message to a kernel object in the sending thread.  That keeps every
manager→kernel call in the order it was sent without a kernel server loop.

All names are one process's view.  The transport of [5/8] translates them per connection.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from .interface import (
    MACH_MSG_TYPE_PORT_RECEIVE,
    MACH_MSG_TYPE_PORT_SEND,
    MACH_MSG_TYPE_PORT_SEND_ONCE,
    KernInvalidRight,
    MachRcvPortDied,
    MachSendInvalidDest,
)

if TYPE_CHECKING:
    from .messages import Message

_port_names = itertools.count(1)

KObjectHandler = Callable[["Port", "Message"], None]


class Port:
    """One port: its queue, its sequence number and its rights' bookkeeping."""

    __slots__ = (
        "name",
        "label",
        "host",
        "origin",
        "kobject",
        "_queue",
        "_seqno",
        "_set",
        "_lot",
        "_dead",
        "_send_rights",
        "_make_send_count",
        "_receive_right",
        "_no_senders_notify",
        "_dead_name_requests",
        "__weakref__",
    )

    def __init__(self, label: str = "", host: str = "") -> None:
        self.name = next(_port_names)
        self.label = label
        # Who holds the receive right: a kernel's name for the ports it creates.  Mach keeps
        # this knowledge in the network message server; managers use it to name kernels.
        self.host = host
        # For a temporary memory object the kernel hands a default manager: the memory object
        # and offset it copies, if it is a delayed copy.  GNU Mach has no such field; the
        # simulation offers it so a manager can show what a temporary preserves.
        self.origin: tuple[SendRight, int] | None = None
        self.kobject: KObjectHandler | None = None
        self._queue: deque[Message] = deque()
        self._seqno = 0
        self._set: PortSet | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._dead = False
        self._send_rights = 0
        self._make_send_count = 0
        self._receive_right: ReceiveRight | None = None
        self._no_senders_notify: PortRight | None = None
        self._dead_name_requests: list[PortRight] = []

    def __repr__(self) -> str:
        state = " dead" if self._dead else ""
        label = f" {self.label}" if self.label else ""
        return f"<port {self.name}{label}{state}>"

    @property
    def dead(self) -> bool:
        return self._dead

    @property
    def queued(self) -> int:
        """Messages waiting to be received."""
        return len(self._queue)

    @property
    def send_rights(self) -> int:
        return self._send_rights

    # -- delivery ------------------------------------------------------------------------

    def _deliver(self, message: Message) -> None:
        if self._dead:
            message.destroy_rights()
            raise MachSendInvalidDest(self.name)
        if self.kobject is not None:
            self.kobject(self, message)
            return
        self._queue.append(message)
        if self._set is not None:
            self._set._ready.append(self)
            self._set._lot.unpark()
        else:
            self._lot.unpark()

    def _dequeue(self) -> ReceivedMessage:
        message = self._queue.popleft()
        self._seqno += 1
        assert self._receive_right is not None
        return ReceivedMessage(self._receive_right, self._seqno, message)

    # -- send-right accounting ------------------------------------------------------------

    def _add_send_right(self, made: bool) -> None:
        self._send_rights += 1
        if made:
            self._make_send_count += 1

    def _drop_send_right(self) -> None:
        self._send_rights -= 1
        if self._send_rights == 0 and not self._dead:
            self._fire_no_senders()

    def _fire_no_senders(self) -> None:
        from .messages import MachNotifyNoSenders

        notify, self._no_senders_notify = self._no_senders_notify, None
        if notify is not None:
            _send_notification(notify, MachNotifyNoSenders(mscount=self._make_send_count))

    def _die(self) -> None:
        from .messages import MachNotifyDeadName

        self._dead = True
        self.kobject = None
        dropped, self._queue = self._queue, deque()
        if self._set is not None:
            self._set._members.discard(self)
            self._set = None
        self._lot.unpark_all()
        notify, self._no_senders_notify = self._no_senders_notify, None
        if notify is not None:
            notify.deallocate()
        requests, self._dead_name_requests = self._dead_name_requests, []
        for message in dropped:
            message.destroy_rights()
        for notify in requests:
            _send_notification(notify, MachNotifyDeadName(name=self.name))


def _send_notification(notify: PortRight, message: Message) -> None:
    # A notification to a port that died meanwhile is simply lost, as in Mach.
    try:
        notify.send(message)
    except MachSendInvalidDest:
        pass


class PortRight:
    """A capability naming one port.  Rights compare equal when they name the same port."""

    __slots__ = ("port", "_valid")
    kind: int = 0
    kind_name = "right"

    def __init__(self, port: Port) -> None:
        self.port = port
        self._valid = True

    @property
    def name(self) -> int:
        return self.port.name

    @property
    def dead(self) -> bool:
        return self.port.dead

    @property
    def host(self) -> str:
        return self.port.host

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.port is self.port  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.kind, self.port.name))

    def __repr__(self) -> str:
        return f"<{self.kind_name} right to {self.port!r}>"

    def _check_valid(self) -> None:
        if not self._valid:
            raise KernInvalidRight(f"{self.kind_name} right to port {self.port.name} was already used up")

    def send(self, message: Message) -> None:
        raise KernInvalidRight(f"cannot send with a {self.kind_name} right", port_name=self.port.name)

    def deallocate(self) -> None:
        """mach_port_deallocate: give this right up."""
        self._valid = False


class SendRight(PortRight):
    __slots__ = ()
    kind = MACH_MSG_TYPE_PORT_SEND
    kind_name = "send"

    def send(self, message: Message) -> None:
        """Queue `message` on the port (or run the kernel call, for a kernel port)."""
        self._check_valid()
        self.port._deliver(message)

    def copy(self) -> SendRight:
        """MACH_MSG_TYPE_COPY_SEND: another reference to the same port."""
        self._check_valid()
        self.port._add_send_right(made=False)
        return SendRight(self.port)

    def deallocate(self) -> None:
        if self._valid:
            self._valid = False
            self.port._drop_send_right()

    def request_dead_name(self, notify: PortRight) -> None:
        """Ask for a dead-name notification on `notify` when this port dies."""
        self._check_valid()
        if self.port.dead:
            from .messages import MachNotifyDeadName

            _send_notification(notify, MachNotifyDeadName(name=self.port.name))
        else:
            self.port._dead_name_requests.append(notify)


    def cancel_dead_name(self, notify: PortRight) -> None:
        """Withdraw a dead-name request made with `notify`."""
        requests = self.port._dead_name_requests
        for index, request in enumerate(requests):
            if request == notify:
                del requests[index]
                request.deallocate()
                return


class SendOnceRight(PortRight):
    __slots__ = ()
    kind = MACH_MSG_TYPE_PORT_SEND_ONCE
    kind_name = "send-once"

    def send(self, message: Message) -> None:
        """Send one message; the right is used up by it."""
        self._check_valid()
        self._valid = False
        self.port._deliver(message)


class ReceiveRight(PortRight):
    __slots__ = ()
    kind = MACH_MSG_TYPE_PORT_RECEIVE
    kind_name = "receive"

    def make_send(self) -> SendRight:
        """MACH_MSG_TYPE_MAKE_SEND: a new send right to this port."""
        self._check_valid()
        self.port._add_send_right(made=True)
        return SendRight(self.port)

    def make_send_once(self) -> SendOnceRight:
        self._check_valid()
        return SendOnceRight(self.port)

    def request_no_senders(self, notify: PortRight) -> None:
        """Ask for a no-senders notification on `notify` when the last send right goes.

        Fires at once when no send right exists now, as Mach does for a request whose sync
        value is already reached.
        """
        self._check_valid()
        previous, self.port._no_senders_notify = self.port._no_senders_notify, notify
        if previous is not None:
            previous.deallocate()
        if self.port._send_rights == 0:
            self.port._fire_no_senders()

    async def receive(self) -> ReceivedMessage:
        """Dequeue the next message, waiting for one; it comes with the port's next seqno."""
        port = self.port
        if port._dead and not port._queue:
            raise MachRcvPortDied(port.name)
        self._check_valid()
        if port._set is not None:
            raise KernInvalidRight(f"port {port.name} is in a port set: receive on the set", port_name=port.name)
        while not port._queue:
            if port._dead:
                raise MachRcvPortDied(port.name)
            await port._lot.park()
        return port._dequeue()

    def receive_nowait(self) -> ReceivedMessage | None:
        """The next message if one is queued, else None."""
        self._check_valid()
        if self.port._queue and self.port._set is None:
            return self.port._dequeue()
        return None

    def __aiter__(self) -> ReceiveRight:
        return self

    async def __anext__(self) -> ReceivedMessage:
        try:
            return await self.receive()
        except MachRcvPortDied:
            raise StopAsyncIteration from None

    def destroy(self) -> None:
        """mach_port_destroy: the port dies; queued messages are destroyed, holders told."""
        if self._valid:
            self._valid = False
            self.port._die()

    deallocate = destroy

    def set_kobject(self, handler: KObjectHandler | None) -> None:
        """Make this a kernel-served port (or an ordinary queued one again, with None)."""
        self.port.kobject = handler


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """What a receive returns: the port it came in on, the seqno it was given, the message."""

    port: ReceiveRight
    seqno: int
    message: Any


class PortSet:
    """A set of receive rights received from as one, as a manager serves many objects."""

    def __init__(self, label: str = "") -> None:
        self.label = label
        self._members: set[Port] = set()
        self._ready: deque[Port] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._destroyed = False

    def add(self, right: ReceiveRight) -> None:
        """mach_port_move_member into this set; messages already queued become receivable."""
        right._check_valid()
        port = right.port
        if port._set is self:
            return
        if port._set is not None:
            port._set.remove(right)
        port._set = self
        self._members.add(port)
        self._ready.extend(port for _ in range(len(port._queue)))
        if port._queue:
            self._lot.unpark_all()

    def remove(self, right: ReceiveRight) -> None:
        port = right.port
        if port._set is self:
            port._set = None
            self._members.discard(port)
            # Entries left in _ready for this port are skipped at receive.
            if port._queue:
                port._lot.unpark_all()

    def __contains__(self, right: ReceiveRight) -> bool:
        return right.port in self._members

    def __len__(self) -> int:
        return len(self._members)

    async def receive(self) -> ReceivedMessage:
        """The next message from any member port, in arrival order across the set."""
        while True:
            if self._destroyed:
                raise MachRcvPortDied(0)
            while self._ready:
                port = self._ready.popleft()
                if port._set is self and port._queue:
                    return port._dequeue()
            await self._lot.park()

    def receive_nowait(self) -> ReceivedMessage | None:
        while self._ready:
            port = self._ready.popleft()
            if port._set is self and port._queue:
                return port._dequeue()
        return None

    def __aiter__(self) -> PortSet:
        return self

    async def __anext__(self) -> ReceivedMessage:
        try:
            return await self.receive()
        except MachRcvPortDied:
            raise StopAsyncIteration from None

    def destroy(self) -> None:
        """The set goes; member ports stay alive and become plain ports again."""
        for port in list(self._members):
            port._set = None
        self._members.clear()
        self._ready.clear()
        self._destroyed = True
        self._lot.unpark_all()


def port_allocate(label: str = "", host: str = "") -> ReceiveRight:
    """mach_port_allocate(MACH_PORT_RIGHT_RECEIVE): a new port and its receive right.

    `host` names whoever will receive on it (a kernel names its control and name ports)."""
    port = Port(label, host)
    right = ReceiveRight(port)
    port._receive_right = right
    return right


def port_set_allocate(label: str = "") -> PortSet:
    """mach_port_allocate(MACH_PORT_RIGHT_PORT_SET)."""
    return PortSet(label)

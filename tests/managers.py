"""A small memory manager written for the tests: a message loop on its object port.

It keeps the object's bytes in a bytearray, answers init with ready (unless told not to) and
data requests with the bytes (unless the test installs its own answer), writes returned data
back, and records every message with its seqno so tests can assert on the exact protocol.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from kernelsim import ReceivedMessage, calls, port_allocate
from kernelsim.ipc_port import ReceiveRight
from kernelsim import messages as m
from kernelsim.interface import MEMORY_OBJECT_COPY_DELAY, VM_PROT_NONE

WAIT = 5.0  # seconds a test waits for a message before failing instead of hanging


class TestManager:
    __test__ = False  # not a test class for pytest

    def __init__(self, size: int = 1 << 20, label: str = "object", *, auto_ready: bool = True, port: ReceiveRight | None = None) -> None:
        """`port`: serve this receive right (a copy object a kernel made, say) instead of a new port."""
        self.port = port if port is not None else port_allocate(label)
        self.backing = bytearray(size)
        self.auto_ready = auto_ready
        self.may_cache = False
        self.copy_strategy = MEMORY_OBJECT_COPY_DELAY
        self.lock_value = VM_PROT_NONE
        self.precious = False
        self.received: list[ReceivedMessage] = []
        self.on_request: Callable[[m.MemoryObjectDataRequest], None] | None = None
        self.on_unlock: Callable[[m.MemoryObjectDataUnlock], None] | None = None
        # memory_object_copy (COPY_CALL): without a handler the message is only recorded.
        self.on_copy: Callable[[m.MemoryObjectCopy], None] | None = None
        self._changed = trio.lowlevel.ParkingLot()

    def send_right(self):
        return self.port.make_send()

    def messages(self, kind: type | None = None) -> list:
        return [r.message for r in self.received if kind is None or isinstance(r.message, kind)]

    def pattern(self, offset: int, length: int) -> bytes:
        return bytes(self.backing[offset : offset + length])

    def fill_pattern(self) -> None:
        """Every byte of the backing store differs from its neighbours' pages."""
        for index in range(0, len(self.backing), 4096):
            self.backing[index : index + 4096] = (index // 4096 % 251 + 1).to_bytes(1, "little") * 4096

    async def wait_for(self, kind: type, count: int = 1):
        """The count-th message of `kind` received, waiting up to WAIT seconds."""
        with trio.fail_after(WAIT):
            while len(self.messages(kind)) < count:
                await self._changed.park()
        return self.messages(kind)[count - 1]

    async def run(self) -> None:
        async for received in self.port:
            self.received.append(received)
            self.handle(received.message)
            self._changed.unpark_all()

    def handle(self, message) -> None:
        if isinstance(message, m.MemoryObjectInit):
            if self.auto_ready:
                calls.memory_object_ready(message.control, self.may_cache, self.copy_strategy)
        elif isinstance(message, m.MemoryObjectDataRequest):
            if self.on_request is not None:
                self.on_request(message)
            else:
                calls.memory_object_data_supply(
                    message.control,
                    message.offset,
                    self.pattern(message.offset, message.length),
                    lock_value=self.lock_value,
                    precious=self.precious,
                )
        elif isinstance(message, m.MemoryObjectDataUnlock):
            if self.on_unlock is not None:
                self.on_unlock(message)
        elif isinstance(message, m.MemoryObjectDataReturn):
            self.backing[message.offset : message.offset + len(message.data)] = message.data
        elif isinstance(message, m.MemoryObjectCopy):
            if self.on_copy is not None:
                self.on_copy(message)
        elif isinstance(message, m.MemoryObjectTerminate):
            message.control.destroy()
            message.name.destroy()

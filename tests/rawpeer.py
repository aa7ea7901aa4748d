"""A peer that speaks the transport's frames by hand (kernelsim/transport.py's docstring gives
the format), over a plain blocking socket: it can say what a real peer never would.

Port names are written as the wire has them: `yours(n)` for a port of the other side that it
gave us under the name n, a bare number for a port of our own.
"""

from __future__ import annotations

import socket
import struct
import time

from kernelsim import codec
from kernelsim.interface import MACH_MSG_TYPE_PORT_SEND, MACH_MSG_TYPE_PORT_SEND_ONCE
from kernelsim.ipc_port import PortRight, port_allocate
from kernelsim.messages import Message
from kernelsim.transport import DEAD, HELLO, MESSAGE, VERSION, YOURS

HEADER = struct.Struct("<IB")
U64 = struct.Struct("<Q")


def yours(name: int) -> int:
    return YOURS | name


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload) + 1, kind) + payload


def hello_payload(name: str = "rogue", bootstrap: int = 0, version: int = VERSION) -> bytes:
    encoded = name.encode()
    return struct.pack("<HH", version, len(encoded)) + encoded + U64.pack(bootstrap)


def message_payload(destination: int, message: Message, names: dict[int, int]) -> bytes:
    """A MESSAGE frame's payload: `names` gives, for each right in the message (by id()), the
    wire name to write."""
    return U64.pack(destination) + codec.encode(message, lambda right: names[id(right)])


class Placeholder:
    """Rights to put in a message we encode by hand: any port will do, the name is ours."""

    def __init__(self) -> None:
        self._port = port_allocate("placeholder")

    def send(self) -> PortRight:
        return self._port.make_send()

    def send_once(self) -> PortRight:
        return self._port.make_send_once()


class RawPeer:
    def __init__(self, path: str | None, timeout: float = 5.0, *, sock: socket.socket | None = None) -> None:
        """Connect to `path`, or speak on `sock` (accepted by a listener of ours)."""
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            for attempt in range(100):
                try:
                    sock.connect(path)
                    break
                except ConnectionRefusedError:
                    # The listener's backlog is full (it is accepting as fast as it can):
                    # wait, as any client would.
                    if attempt == 99:
                        raise
                    time.sleep(0.01)
        sock.settimeout(timeout)
        self.sock = sock
        self._buffer = b""

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bool:
        """Write bytes; False if the other side has already closed."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def hello(self, name: str = "rogue", bootstrap: int = 0) -> int | None:
        """Exchange HELLOs; the other side's bootstrap port name (0: none), or None if it
        closed the connection instead (a manager with all its connections taken does)."""
        self.send(frame(HELLO, hello_payload(name, bootstrap)))
        got = self.read_frame()
        if got is None:
            return None
        kind, payload = got
        assert kind == HELLO, kind
        (length,) = struct.unpack_from("<H", payload, 2)
        (bootstrap,) = U64.unpack_from(payload, 4 + length)
        return bootstrap

    def send_message(self, destination: int, message: Message, names: dict[int, int] | None = None) -> bool:
        return self.send(frame(MESSAGE, message_payload(destination, message, names or {})))

    def _fill(self, count: int) -> bool:
        while len(self._buffer) < count:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return False
            if not chunk:
                return False
            self._buffer += chunk
        return True

    def read_frame(self) -> tuple[int, bytes] | None:
        """The next frame, or None when the other side has closed."""
        if not self._fill(HEADER.size):
            return None
        length, kind = HEADER.unpack_from(self._buffer)
        if not self._fill(HEADER.size + length - 1):
            return None
        payload = self._buffer[HEADER.size : HEADER.size + length - 1]
        self._buffer = self._buffer[HEADER.size + length - 1 :]
        return kind, payload

    def read_message(self) -> tuple[int, Message, list[tuple[int, int]]]:
        """The next MESSAGE frame: its destination, the message (rights become placeholders
        of ours) and the (disposition, wire name) of each right in it, in field order."""
        while True:
            got = self.read_frame()
            if got is None:
                raise EOFError("the other side closed the connection")
            kind, payload = got
            if kind == DEAD:
                continue
            assert kind == MESSAGE, kind
            (destination,) = U64.unpack_from(payload)
            names: list[tuple[int, int]] = []
            holder = Placeholder()

            def right_for(disposition: int, name: int) -> PortRight:
                names.append((disposition, name))
                return holder.send_once() if disposition == MACH_MSG_TYPE_PORT_SEND_ONCE else holder.send()

            return destination, codec.decode(payload[U64.size :], right_for), names

    def closed_by_other_side(self) -> bool:
        """Read until the other side closes (True) or the socket times out (False)."""
        try:
            while self.read_frame() is not None:
                pass
            return True
        except (TimeoutError, socket.timeout):
            return False


__all__ = ["DEAD", "HELLO", "MESSAGE", "MACH_MSG_TYPE_PORT_SEND", "Placeholder", "RawPeer", "frame", "hello_payload", "message_payload", "yours"]

"""Ports across processes: the same typed messages, carried over a stream socket.

A `Connection` joins two processes (a manager and a kernel) over a Unix-domain or TCP stream.
Each side sees the other's ports as local *proxies*: a message sent to a proxy is written to the
socket and delivered, on the other side, to the real port.  Port rights travel inside messages
as names, translated per connection, the way Mach's network message server did it:

- a send or send-once right to a port of ours is *exported*: the peer gets a proxy for it;
- a right to one of the peer's ports (a proxy here) goes back as the peer's own name;
- a receive right *moves*: the peer gets a real port, and ours forwards to it from then on
  (memory_object_terminate hands a manager the kernel's control and name ports this way).

A peer can only name ports it was given on this connection.  A frame that is too long, of an
unknown kind, badly formed, naming a port the peer was never given, or beyond the stated
limits closes the connection with a logged reason; it never stops the process.  When a
connection closes, every proxy for the peer's ports dies, so their holders get dead-name
notifications (a kernel fails faults on a dead manager's objects; a manager forgets a dead
kernel).

Frames: u32 length of the rest, u8 kind, payload.
    HELLO    u16 version, u16 name length, name (UTF-8), u64 bootstrap port (0: none)
    MESSAGE  u64 destination, then a message as `codec` writes it
    DEAD     u64 port: that port of the sender died (or, with the YOURS bit, the receiver's
             port the sender held since the receiver moved it there)
A port name with the YOURS bit (1 << 63) is the receiver's; without it, the sender's.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from . import codec
from .interface import (
    MACH_MSG_TYPE_PORT_RECEIVE,
    MACH_MSG_TYPE_PORT_SEND,
    MACH_MSG_TYPE_PORT_SEND_ONCE,
    MachSendInvalidDest,
)
from .ipc_port import Port, PortRight, ReceiveRight, SendOnceRight, SendRight, port_allocate
from .messages import MachNotifyDeadName, Message

log = logging.getLogger("kernelsim.transport")

VERSION = 1
HELLO, MESSAGE, DEAD = 1, 2, 3
YOURS = 1 << 63
HEADER = struct.Struct("<IB")
U64 = struct.Struct("<Q")
MAX_FRAME = codec.MAX_DATA + 64 * 1024
"""No frame may be longer: a peer cannot make us buffer more than this at once."""
MAX_NAMES = 1_000_000
"""Ports one connection may name (ours exported plus the peer's)."""
MAX_OUTGOING = 100_000
"""Messages waiting to be written before we decide the peer has stopped reading."""
UNIX_PATH_MAX = 107
"""sun_path holds 108 bytes on Linux, the terminating NUL among them."""
HELLO_TIMEOUT = 10.0
SOCKET_BUFFER = 4 << 20
"""The send buffer asked for (SO_SNDBUF): a 1 MiB cluster and more fit."""
LONG_WRITE = 65536
"""A message at least this long is written as its pieces, its data never copied."""
LONG_READ = 65536
"""A frame at least this long (a cluster of pages) is received into a buffer of its own."""
FIRST_CHUNK = (1 << 20) + 4096
"""What such a buffer starts with (a 1 MiB cluster and the rest of its message fit); it
doubles as the frame's bytes arrive."""


class _Pieces:
    """A long frame as the pieces it is made of (header and fields, and the data uncopied)."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: list[bytes | memoryview]) -> None:
        self.pieces = pieces

    def after(self, count: int) -> _Pieces:
        """What is left to write once `count` bytes of it are written."""
        pieces = self.pieces
        index = 0
        while index < len(pieces) and count >= len(pieces[index]):
            count -= len(pieces[index])
            index += 1
        rest = pieces[index:]
        if rest and count:
            rest[0] = memoryview(rest[0])[count:]
        return _Pieces(rest)


class TransportError(Exception):
    """The peer broke the protocol: the connection closes, for the reason given."""


class _EndOfStream(Exception):
    pass


@dataclass(frozen=True)
class Address:
    """Where a manager listens: unix:PATH or tcp:HOST:PORT."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Address:
        kind, _, rest = text.partition(":")
        if kind == "unix" and rest:
            return cls("unix", path=rest)
        if kind == "tcp":
            host, _, port = rest.rpartition(":")
            if host and port.isdigit():
                return cls("tcp", host=host.strip("[]"), port=int(port))
        raise ValueError(f"address {text!r}: use unix:PATH or tcp:HOST:PORT")

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"

    async def connect(self) -> trio.abc.Stream:
        if self.kind == "unix":
            return await trio.open_unix_socket(self.path)
        return await trio.open_tcp_stream(self.host, self.port)

    async def listeners(self) -> list[trio.SocketListener]:
        """Listening sockets; OSError with a reason a user can act on if it cannot be done."""
        if self.kind == "tcp":
            return await trio.open_tcp_listeners(self.port, host=self.host)
        if len(os.fsencode(self.path)) > UNIX_PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, f"a Unix socket path must be at most {UNIX_PATH_MAX} bytes; choose a shorter one")
        await self._clear_stale_socket()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(self.path)
            sock.listen(512)
        except OSError:
            sock.close()
            raise
        return [trio.SocketListener(sock)]

    async def _clear_stale_socket(self) -> None:
        # A socket file left by a manager that died is removed; a live manager's is not stolen,
        # and nothing that is not a socket is ever deleted.
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket")
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await probe.connect(self.path)
        except OSError:
            os.unlink(self.path)
        else:
            raise OSError(errno.EADDRINUSE, "another manager is listening there")
        finally:
            probe.close()

    def remove(self) -> None:
        """Remove a Unix socket file when the listener is done (nothing for TCP)."""
        if self.kind == "unix":
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class Connection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        local_name: str,
        bootstrap: ReceiveRight | None = None,
        on_log: Callable[[str], None] | None = None,
        on_undelivered: Callable[[Message], None] | None = None,
    ) -> None:
        self.stream = stream
        self.local_name = local_name
        self.peer_name = "?"
        self.peer_bootstrap: SendRight | None = None
        self.closed = trio.Event()
        self.greeted = False  # the HELLOs were exchanged
        self.settled = trio.Event()  # greeted, or closed before that
        self.close_reason = ""
        self._bootstrap = bootstrap
        self._on_log = on_log
        self._names = itertools.count(1)
        self._exports: dict[int, Port] = {}  # our ports the peer may name, by wire name
        self._export_of: dict[Port, int] = {}
        self._proxies: dict[int, ReceiveRight] = {}  # the peer's ports here, by its names
        self._proxy_of: dict[Port, int] = {}
        self._moved_in: dict[int, ReceiveRight] = {}  # the peer's ports it moved here (real now)
        self._moved_in_of: dict[Port, int] = {}
        self._moved_out: dict[Port, int] = {}  # our ports now living at the peer
        self._watched: dict[int, tuple[str, int]] = {}  # port name -> what dies with it
        # Frames, encoded when queued: bytes, or for a long one its pieces (`_Pieces`).
        self._outgoing: deque[bytes | _Pieces] = deque()
        # With `on_undelivered`: the messages whose frames are not yet all written (waiting in
        # `_outgoing`, or in the writer's hands), told to it if the connection closes first.
        self._on_undelivered = on_undelivered
        self._unwritten: deque[Message] = deque()
        self._in_flight: list[Message] = []
        self._wake_writer = trio.lowlevel.ParkingLot()
        self._written = trio.lowlevel.ParkingLot()
        self._writing = False
        self._eof_sent = False  # hang_up: our side is shut for writing
        # A socket's frames are written at once by the sender when nothing is queued before
        # them: no hop through the writer task, which only finishes what did not fit.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        # A socket's long frames are received straight into a buffer of their own (recv_into).
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        if self._socket is not None:
            # Room for a cluster of pages in flight: it is written in one go and read in one go,
            # not in slices of the default ~200 KiB, each costing both processes a wake-up.
            # (Linux caps this at net.core.wmem_max.)
            try:
                self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            except OSError:
                pass
        self._moving: list[tuple[int, Message]] = []
        self._notify = port_allocate(f"connection {local_name} notify")
        self._notify.set_kobject(self._port_died)
        self._buffer = bytearray()
        self._cancel: trio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<connection {self.local_name} <-> {self.peer_name}>"

    def _say(self, text: str) -> None:
        log.info("%s: %s", self, text)
        if self._on_log is not None:
            self._on_log(text)

    # -- running -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Greet the peer, then carry messages both ways until either side closes.  Whatever
        goes wrong ends this connection only (the reason is logged), never the process."""
        try:
            with trio.CancelScope() as self._cancel:
                reason = await self._guarded(self._handshake)
                if reason is None:
                    self.greeted = True
                    self.settled.set()
                    task_status.started()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._run_writer)
                        reason = await self._guarded(self._reader)
                        nursery.cancel_scope.cancel()
                self.close_reason = self.close_reason or reason or "closed"
        finally:
            self._shut(self.close_reason or "closed")
            with trio.CancelScope(shield=True):
                try:
                    await self.stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    async def _handshake(self) -> None:
        await self._write_frame(HELLO, self._hello_payload())
        with trio.fail_after(HELLO_TIMEOUT):
            kind, payload = await self._read_frame()
        if kind != HELLO:
            raise TransportError(f"expected HELLO, got frame kind {kind}")
        self._take_hello(payload)

    async def _run_writer(self) -> None:
        reason = await self._guarded(self._writer)
        self.close(reason or "closed")

    async def _guarded(self, work) -> str | None:
        """Run `work`; the reason it ended the connection, or None if it returned."""
        try:
            await work()
        except TransportError as error:
            return f"protocol error: {error}"
        except trio.TooSlowError:
            return "no HELLO from the peer in time"
        except _EndOfStream:
            return "the peer closed the connection"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            return f"connection lost: {error}"
        except Exception as error:
            # A bug met while serving this peer's frame (here, or in what a port runs when a
            # message is delivered to it) ends this connection, never the process and the
            # other peers' sessions.  The traceback goes to the log: it is a bug to fix.
            log.exception("%s: internal error", self)
            return f"internal error: {error!r} (see the log)"
        return None

    def close(self, reason: str = "closed") -> None:
        self.close_reason = self.close_reason or reason
        if self._cancel is not None:
            self._cancel.cancel()

    def _shut(self, reason: str) -> None:
        """Forget the peer: its proxies die (their holders are told), ours stop forwarding."""
        if self.closed.is_set():
            return
        self.close_reason = self.close_reason or reason
        self._say(f"connection with {self.peer_name} closed: {self.close_reason}")
        self.closed.set()
        self.settled.set()
        self._written.unpark_all()
        self._tell_undelivered()
        for right in list(self._proxies.values()):
            right.destroy()
        self._proxies.clear()
        self._proxy_of.clear()
        for port in list(self._moved_out):
            port._die()
        self._moved_out.clear()
        self._outgoing.clear()
        notify = SendRight(self._notify.port)
        for port in list(self._export_of) + list(self._moved_in_of):
            SendRight(port).cancel_dead_name(notify)
        self._notify.destroy()

    def _tell_undelivered(self) -> None:
        """The connection is closing: the messages not written to the socket never reach the
        peer; whoever asked hears of each (a kernel keeps the pages a data_return carried).
        Told before the peer's proxies die, while what they concern is still alive."""
        undelivered = self._in_flight + list(self._unwritten)
        self._in_flight = []
        self._unwritten.clear()
        if self._on_undelivered is None:
            return
        for message in undelivered:
            try:
                self._on_undelivered(message)
            except Exception:
                log.exception("%s: handling an undelivered %s failed", self, message.mach_name)

    def _hello_payload(self) -> bytes:
        name = self.local_name.encode()
        bootstrap = self._export(self._bootstrap.port) if self._bootstrap is not None else 0
        return struct.pack("<HH", VERSION, len(name)) + name + U64.pack(bootstrap)

    def _take_hello(self, payload: bytes | memoryview) -> None:
        if len(payload) < 4:
            raise TransportError("HELLO too short")
        version, length = struct.unpack_from("<HH", payload)
        if version != VERSION:
            raise TransportError(f"protocol version {version}, this side speaks {VERSION}")
        if len(payload) != 4 + length + U64.size:
            raise TransportError("HELLO of the wrong length")
        try:
            self.peer_name = bytes(payload[4 : 4 + length]).decode()
        except UnicodeDecodeError:
            raise TransportError("HELLO name is not UTF-8") from None
        (bootstrap,) = U64.unpack_from(payload, 4 + length)
        if bootstrap:
            right = self._right_for(MACH_MSG_TYPE_PORT_SEND, bootstrap)
            assert isinstance(right, SendRight)
            self.peer_bootstrap = right

    # -- frames ------------------------------------------------------------------------------

    async def _read_exactly(self, count: int) -> bytes | memoryview:
        if count - len(self._buffer) >= LONG_READ and self._socket is not None:
            return await self._receive_long(count)
        while len(self._buffer) < count:
            chunk = await self.stream.receive_some(max(65536, count - len(self._buffer)))
            if not chunk:
                raise _EndOfStream
            self._buffer += chunk
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    async def _receive_long(self, count: int) -> memoryview:
        """`count` bytes (what is buffered, then the socket's) received into a buffer of their
        own, with no copy through `_buffer`: a cluster of pages costs one pass over its bytes
        here.  The buffer grows (doubling) as the bytes arrive, so a peer only makes us hold
        what it has sent."""
        assert self._socket is not None
        got = len(self._buffer)
        data = bytearray(min(count, max(FIRST_CHUNK, got)))
        data[:got] = self._buffer
        self._buffer.clear()
        while got < count:
            if got == len(data):
                data += bytes(min(len(data), count - len(data)))
            with memoryview(data) as view, view[got:count] as rest:
                received = await self._socket.recv_into(rest)
            if not received:
                raise _EndOfStream
            got += received
        return memoryview(data)[:count]

    async def _read_frame(self) -> tuple[int, bytes | memoryview]:
        length, kind = HEADER.unpack(await self._read_exactly(HEADER.size))
        if length < 1 or length - 1 > MAX_FRAME:
            raise TransportError(f"frame length {length} outside 1..{MAX_FRAME + 1}")
        return kind, await self._read_exactly(length - 1)

    async def _write_frame(self, kind: int, payload: bytes) -> None:
        await self.stream.send_all(HEADER.pack(len(payload) + 1, kind) + payload)

    async def _reader(self) -> None:
        while True:
            kind, payload = await self._read_frame()
            if kind == MESSAGE:
                self._take_message(payload)
            elif kind == DEAD:
                self._take_dead(payload)
            else:
                raise TransportError(f"unknown frame kind {kind}")

    async def hang_up(self, timeout: float) -> None:
        """A clean end: every message queued so far written, then this side shut for writing
        (the peer reads the end of the stream and closes its side), and until the peer has
        closed, or `timeout`.  Closing at once would leave what the peer sent last unread, and
        the kernel resets a socket closed with unread data: the peer would take it for a crash
        ("connection reset by peer")."""
        with trio.move_on_after(timeout):
            await self.drain()
            if self.closed.is_set():
                return
            self.close_reason = self.close_reason or "closed"  # by us, whatever the peer does next
            # Nothing more goes out: a frame written after the end of the stream would fail
            # (EPIPE) and end the connection before the peer has closed its side.
            self._eof_sent = True
            try:
                await self.stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
                return
            await self.closed.wait()

    async def drain(self) -> None:
        """Until every message queued so far has been written (or the connection is gone)."""
        while (self._outgoing or self._writing) and not self.closed.is_set():
            await self._written.park()

    async def _writer(self) -> None:
        try:
            await self._write_loop()
        finally:
            self._written.unpark_all()

    async def _write_loop(self) -> None:
        while True:
            self._writing = False
            self._written.unpark_all()
            while not self._outgoing:
                await self._wake_writer.park()
            self._writing = True
            # What is queued goes in as few writes as copying allows: short frames that piled
            # up are joined (one system call); a long piece (a cluster of pages) is written as
            # it is, never copied.
            frames = list(self._outgoing)
            self._outgoing.clear()
            if self._on_undelivered is not None:
                # Written (to the socket) once every send_all below has returned.
                self._in_flight = list(self._unwritten)
                self._unwritten.clear()
            batch: list[bytes | memoryview] = []
            for frame in frames:
                for piece in frame.pieces if isinstance(frame, _Pieces) else (frame,):
                    if len(piece) < LONG_WRITE:
                        batch.append(piece)
                        continue
                    if batch:
                        await self.stream.send_all(b"".join(batch))
                        batch = []
                    await self.stream.send_all(piece)
            if batch:
                await self.stream.send_all(b"".join(batch))
            self._in_flight = []

    def _queue(self, destination: int, message: Message) -> None:
        if self.closed.is_set() or self._eof_sent:
            message.destroy_rights()
            raise MachSendInvalidDest(destination & ~YOURS)
        if len(self._outgoing) >= MAX_OUTGOING:
            self.close(f"{MAX_OUTGOING} messages waiting: the peer is not reading")
            message.destroy_rights()
            raise MachSendInvalidDest(destination & ~YOURS)
        self._moving = moving = []
        try:
            body = codec.encode_parts(message, self._name_of)
        except codec.MessageFormatError as error:
            self._say(f"dropped an outgoing {message.mach_name}: {error}")
            message.destroy_rights()
            return
        length = sum(map(len, body))
        body.insert(0, HEADER.pack(U64.size + length + 1, MESSAGE) + U64.pack(destination))
        # A long message (pages) goes as its pieces, so its data is never copied here.
        self._send_frame(_Pieces(body) if length >= LONG_WRITE else b"".join(body), message)
        # Messages that were waiting on a port this one moved to the peer go after it, when
        # the peer knows the port.
        for name, waiting in moving:
            self._queue(name, waiting)

    def _queue_dead(self, reference: int) -> None:
        # After our end of the stream the peer hears of every death as the connection closes.
        if not self.closed.is_set() and not self._eof_sent:
            self._send_frame(HEADER.pack(U64.size + 1, DEAD) + U64.pack(reference))

    def _send_frame(self, frame: bytes | _Pieces, message: Message | None = None) -> None:
        if self._fd is not None and not self._outgoing and not self._writing:
            pieces = isinstance(frame, _Pieces)
            try:
                written = os.writev(self._fd, frame.pieces) if pieces else os.write(self._fd, frame)
            except BlockingIOError:
                written = 0
            except OSError:
                written = 0  # the writer meets the error again and closes the connection
            if pieces:
                frame = frame.after(written)
                if not frame.pieces:
                    return
            else:
                if written == len(frame):
                    return
                frame = frame[written:]
        self._outgoing.append(frame)
        if message is not None and self._on_undelivered is not None:
            self._unwritten.append(message)
        self._wake_writer.unpark()

    # -- incoming ----------------------------------------------------------------------------

    def _take_message(self, payload: bytes | memoryview) -> None:
        if len(payload) < U64.size:
            raise TransportError("MESSAGE without a destination")
        (destination,) = U64.unpack_from(payload)
        port = self._destination(destination)
        try:
            message = codec.decode(memoryview(payload)[U64.size :], self._right_for)
        except codec.MessageFormatError as error:
            raise TransportError(str(error)) from None
        try:
            port._deliver(message)
        except MachSendInvalidDest:
            pass  # the port died meanwhile: the peer hears of it by a DEAD frame

    def _destination(self, reference: int) -> Port:
        name = reference & ~YOURS
        if reference & YOURS:
            port = self._exports.get(name)
            if port is None:
                raise TransportError(f"message to port {name}, which was never given to this peer")
            return port
        moved = self._moved_in.get(name)
        if moved is not None:
            return moved.port
        raise TransportError(f"message to the peer's own port {name}")

    def _take_dead(self, payload: bytes | memoryview) -> None:
        if len(payload) != U64.size:
            raise TransportError("DEAD frame of the wrong length")
        (reference,) = U64.unpack(payload)
        name = reference & ~YOURS
        if reference & YOURS:
            # Our port that we moved there died there: stop forwarding to it.
            for port, moved in list(self._moved_out.items()):
                if moved == name:
                    del self._moved_out[port]
                    port._die()
            return
        proxy = self._proxies.pop(name, None)
        if proxy is not None:
            del self._proxy_of[proxy.port]
            proxy.destroy()

    def _right_for(self, disposition: int, reference: int) -> PortRight:
        name = reference & ~YOURS
        if reference & YOURS:
            port = self._exports.get(name)
            if port is None:
                raise codec.MessageFormatError(f"port {name} was never given to this peer")
            if disposition == MACH_MSG_TYPE_PORT_RECEIVE:
                raise codec.MessageFormatError(f"receive right for port {name}, which the peer does not hold")
            return self._counted(port, disposition)
        if disposition == MACH_MSG_TYPE_PORT_RECEIVE:
            return self._move_in(name)
        moved = self._moved_in.get(name)
        if moved is not None:
            return self._counted(moved.port, disposition)
        proxy = self._proxies.get(name)
        if proxy is None:
            self._check_room()
            proxy = port_allocate(f"{self.peer_name} port {name}", host=self.peer_name)
            proxy.set_kobject(self._forwarder(YOURS | name))
            self._proxies[name] = proxy
            self._proxy_of[proxy.port] = name
        return self._counted(proxy.port, disposition)

    def _check_room(self) -> None:
        if len(self._exports) + len(self._proxies) + len(self._moved_in) >= MAX_NAMES:
            raise codec.MessageFormatError(f"more than {MAX_NAMES} port names on one connection")

    def _counted(self, port: Port, disposition: int) -> PortRight:
        if disposition == MACH_MSG_TYPE_PORT_SEND_ONCE:
            return SendOnceRight(port)
        port._add_send_right(made=True)
        return SendRight(port)

    def _move_in(self, name: int) -> ReceiveRight:
        """The peer hands us the receive right of its port `name`: it becomes a real port here
        (a proxy we had for it stops forwarding)."""
        if name in self._moved_in:
            raise codec.MessageFormatError(f"receive right for port {name} moved here twice")
        proxy = self._proxies.pop(name, None)
        if proxy is not None:
            del self._proxy_of[proxy.port]
            proxy.set_kobject(None)
            right = proxy
        else:
            self._check_room()
            right = port_allocate(f"{self.peer_name} port {name}, moved here")
        right.port.host = self.local_name
        self._moved_in[name] = right
        self._moved_in_of[right.port] = name
        self._watch(right.port, "moved in", name)
        return right

    def _watch(self, port: Port, what: str, name: int) -> None:
        """Be told when `port` dies, to tell the peer."""
        self._watched[port.name] = (what, name)
        SendRight(port).request_dead_name(SendRight(self._notify.port))

    # -- outgoing ----------------------------------------------------------------------------

    def _forwarder(self, destination: int) -> Callable[[Port, Message], None]:
        def forward(port: Port, message: Message) -> None:
            self._queue(destination, message)

        return forward

    def _name_of(self, right: PortRight) -> int:
        port = right.port
        proxied = self._proxy_of.get(port)
        if proxied is not None:
            if isinstance(right, ReceiveRight):
                raise codec.MessageFormatError("cannot move the receive right of a proxy")
            return YOURS | proxied
        moved_out = self._moved_out.get(port)
        if moved_out is not None:
            return moved_out
        moved_in = self._moved_in_of.get(port)
        if moved_in is not None:
            if isinstance(right, ReceiveRight):
                raise codec.MessageFormatError("cannot move a port back to the peer that moved it here")
            # The peer still has its old port under this name, forwarding here.
            return YOURS | moved_in
        name = self._export(port)
        if isinstance(right, ReceiveRight):
            # The port moves to the peer: from now on what is sent to it goes there.
            self._moved_out[port] = name
            pending, port._queue = port._queue, deque()
            port.kobject = self._forwarder(name)
            right._valid = False
            # Queued there: they follow the message that moves the port (see _queue).
            self._moving.extend((name, message) for message in pending)
        return name

    def _export(self, port: Port) -> int:
        name = self._export_of.get(port)
        if name is not None:
            return name
        self._check_room()
        name = next(self._names)
        self._exports[name] = port
        self._export_of[port] = name
        self._watch(port, "export", name)
        return name

    def _port_died(self, notify_port: Port, message: Message) -> None:
        """One of our exported or moved-in ports died: the peer must stop using it."""
        if not isinstance(message, MachNotifyDeadName) or self.closed.is_set():
            return
        what, name = self._watched.pop(message.name, ("", 0))
        if what == "export":
            self._queue_dead(name)
        elif what == "moved in":
            right = self._moved_in.pop(name, None)
            if right is not None:
                self._moved_in_of.pop(right.port, None)
            self._queue_dead(YOURS | name)

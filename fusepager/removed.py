"""Removed objects whose memory object port kernels may still hold.

`rmdir objects/NAME` removes an object no kernel has initialised: no `memory_object_init` came
from any kernel, or each kernel that sent one has terminated since.  A kernel can still hold a
send right to the object's port: it mapped the object (vm_map) and has not faulted yet, since
a kernel introduces itself with `memory_object_init` at its first fault, not at the map.  The
manager cannot tell such a kernel from one that looked the object up and let go.

Destroying the port would make that kernel's first fault fail with "memory manager died",
which is not true: the manager is alive, the object is gone.  So the port stays alive, and
every `memory_object_init` it gets is answered with `memory_object_destroy(KERN_TERMINATED)`:
the kernel fails the fault with KernMemoryError "memory object destroyed by its manager
(reason KERN_TERMINATED)" and terminates its use of the object.  When no send right to the
port is left anywhere (the no-senders notification), the port is destroyed.  A kernel in
another process holds its rights through its connection, so the port goes when it
disconnects.
"""

from __future__ import annotations

from kernelsim import messages as m
from kernelsim.interface import KERN_TERMINATED, MachSendInvalidDest
from kernelsim.ipc_port import port_allocate

from .pager import Pager
from .trace import Stats, Trace

REMOVED_REASON = KERN_TERMINATED
"""The reason a kernel hears in memory_object_destroy for an object removed before its init."""


class RemovedObject:
    """The port of a removed object, answering kernels until none holds it."""

    def __init__(self, pager: Pager, trace: Trace, stats: Stats, registry: set[RemovedObject]) -> None:
        """Take over `pager`'s port; in `registry` until the port goes (at once if no kernel
        holds it)."""
        self.pager = pager
        self.name = pager.name
        self.trace = trace
        self.stats = stats
        self._registry = registry
        registry.add(self)
        pager.on_removed = self.answer
        self._notify = port_allocate(f"removed object {self.name} no-senders")
        self._notify.set_kobject(self._no_senders)
        pager.port.request_no_senders(self._notify.make_send())

    def answer(self, message: m.Message) -> None:
        """A message to the removed object (the pager has counted and traced it)."""
        if isinstance(message, m.MemoryObjectInit):
            host = message.control.host or f"kernel{message.control.name}"
            self.trace.line(f"{self.name} was removed before {host} initialised it: memory_object_destroy")
            destroy = m.MemoryObjectDestroy(reason=REMOVED_REASON)
            self.stats.sent(destroy)
            self.trace.message(self.name, host, destroy)
            try:
                message.control.send(destroy)
            except MachSendInvalidDest:
                pass  # the kernel is gone already: nobody to tell
        elif not isinstance(message, m.MemoryObjectTerminate):
            # Only an init or the terminate that follows our destroy can come: a kernel that
            # had initialised the object kept it from being removed (EBUSY).
            self.stats.refused += 1
            self.trace.line(f"{self.name} refused {message.mach_name}: the object was removed")
        # The terminate hands over the kernel's control and name ports: they go, as its use did.
        message.destroy_rights()

    def _no_senders(self, port: object, message: m.Message) -> None:
        if isinstance(message, m.MachNotifyNoSenders):
            self.trace.line(f"{self.name} (removed): no kernel holds its port any more; it goes")
            self.close()

    def close(self) -> None:
        """No kernel can send to the object any more (or the manager is closing): its port goes."""
        self.pager.port.destroy()
        self._notify.destroy()
        self._registry.discard(self)

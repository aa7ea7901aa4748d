"""kernelsim: a simulated Mach kernel speaking the GNU Mach External Memory Management protocol.

The pieces a memory manager or a test uses:

- `boot` / `Kernel`: a simulated host with its page size and memory limit; `Task` and its
  vm_* calls and `read`/`write`.
- `port_allocate`, `port_set_allocate` and the rights (`ipc_port`): the IPC.
- `messages`: every EMM message as a typed class; `codec` turns them into bytes and back.
- `calls`: the manager → kernel calls (memory_object_ready, memory_object_data_supply, ...).
- `interface`: the constants and errors (VM_PROT_*, MEMORY_OBJECT_*, KERN_*, Kern* exceptions).
"""

from . import calls, codec, interface, messages
from .ipc_port import (
    PortRight,
    PortSet,
    ReceivedMessage,
    ReceiveRight,
    SendOnceRight,
    SendRight,
    port_allocate,
    port_set_allocate,
)
from .kernel import Kernel, KernelStats, boot
from .task import Region, Task

__version__ = "0.1.0"

__all__ = [
    "calls",
    "codec",
    "interface",
    "messages",
    "Kernel",
    "KernelStats",
    "PortRight",
    "PortSet",
    "ReceiveRight",
    "ReceivedMessage",
    "Region",
    "SendOnceRight",
    "SendRight",
    "Task",
    "boot",
    "port_allocate",
    "port_set_allocate",
]

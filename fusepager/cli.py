"""The `fusepager` command: mount, umount, demo."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

import trio

from kernelsim import __version__

from kernelsim.transport import Address

from .mount import KernelSpec, MountError, daemon_log_path, default_listen, mount_state, serve, unmount

DESCRIPTION = """\
fusepager: external memory managers that keep their pages in real files and show them, and the
Mach External Memory Management protocol they speak with kernels, through a FUSE mount.
"""

EPILOG = """\
examples:
  fusepager demo                              mount a store in a temporary directory, have two
                                              kernels page through it, narrate, unmount
  fusepager demo --keep                       the same, then leave it mounted to look around
  fusepager mount /srv/store /mnt/pager       serve a store (in the background)
  mkdir /mnt/pager/objects/hello              create a memory object
  truncate -s 64K /mnt/pager/objects/hello/data
  tail -f /mnt/pager/trace                    watch the protocol
  fusepager mount STORE MNT -f --kernel k1:4096 --kernel k2:16384 --console
                                              foreground, with two kernels in the process taking
                                              commands on stdin: k1 map hello 64K; k1 read hello 16
  fusepager umount /mnt/pager                 unmount (also clears a stale mount)
"""

MOUNT_EPILOG = """\
The store is a plain directory: STORE/objects/NAME/data holds each object's bytes as a sparse
file, meta.json beside it its attributes.  A pager restarted on the same store serves the same
bytes.  In the background the daemon logs to STORE/fusepager.log.

Kernel console commands (with --console; prefix each with the kernel's name when there are
several): map NAME SIZE, read WHERE LEN [text], write WHERE TEXT, unmap WHERE, region WHERE,
protect WHERE SIZE PROT, fork, stat, help.  Every answer starts with 'ok' or 'error'.
"""


def _mount(args: argparse.Namespace) -> int:
    try:
        kernels = [KernelSpec.parse(text) for text in args.kernel]
    except ValueError as error:
        print(f"fusepager mount: {error}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.store):
        print(f"fusepager mount: store {args.store} is not a directory (mkdir -p {args.store})", file=sys.stderr)
        return 1
    foreground = args.foreground or args.debug or args.ready_fd is not None
    if args.console and not foreground:
        print("fusepager mount: --console reads commands from stdin; add -f", file=sys.stderr)
        return 2
    if not foreground:
        return _daemonize(args)
    options = {option for text in args.o for option in text.split(",") if option}
    if args.listen == "none":
        listen = None
    else:
        try:
            listen = Address.parse(args.listen) if args.listen else default_listen(args.store)
        except ValueError as error:
            print(f"fusepager mount: {error}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="fusepager: %(levelname)s %(name)s: %(message)s")

    def ready() -> None:
        message = f"fusepager: mounted {os.path.abspath(args.store)} at {os.path.abspath(args.mountpoint)} (pid {os.getpid()})"
        if listen is not None:
            message += f"; kernels connect to {listen}"
        if args.ready_fd is not None:
            os.write(args.ready_fd, f"ok {message}\n".encode())
            os.close(args.ready_fd)
        else:
            print(message, flush=True)

    try:
        trio.run(
            lambda: serve(
                args.store,
                args.mountpoint,
                fuse_options=options,
                kernels=kernels,
                console=args.console,
                debug=args.debug,
                default_manager=args.default_manager,
                listen=listen,
                on_ready=ready,
            )
        )
    except KeyboardInterrupt:
        return 130
    except (MountError, BaseExceptionGroup) as failure:
        error = _mount_error(failure)
        if error is None:
            raise
        if args.ready_fd is not None:
            os.write(args.ready_fd, f"error {error}\n".encode())
        print(f"fusepager mount: {error}", file=sys.stderr)
        return 1
    return 0


def _mount_error(error: BaseException) -> MountError | None:
    """`error`, or the MountError inside the exception group a nursery made of it."""
    if isinstance(error, MountError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _mount_error(inner)
            if found is not None:
                return found
    return None


def _daemonize(args: argparse.Namespace) -> int:
    """Start the daemon in its own session, wait until it has mounted, and leave it running."""
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "fusepager", "mount", args.store, args.mountpoint, "--ready-fd", str(write_end)]
    for text in args.o:
        command += ["-o", text]
    for text in args.kernel:
        command += ["--kernel", text]
    if not args.default_manager:
        command.append("--no-default-manager")
    if args.listen:
        command += ["--listen", args.listen]
    log_path = daemon_log_path(args.store)
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, pass_fds=(write_end,), start_new_session=True
        )
    os.close(write_end)
    with os.fdopen(read_end) as ready:
        answer = ready.read()
    if answer.startswith("ok "):
        print(answer[3:].strip())
        return 0
    child.wait(timeout=30)
    reason = answer[6:].strip() if answer.startswith("error ") else f"the daemon exited with status {child.returncode}"
    print(f"fusepager mount: {reason}\n(daemon log: {log_path})", file=sys.stderr)
    return 1


def _umount(args: argparse.Namespace) -> int:
    try:
        print(unmount(args.mountpoint))
    except MountError as error:
        print(f"fusepager umount: {error}", file=sys.stderr)
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    state = mount_state(args.mountpoint)
    print(f"{args.mountpoint}: {state}")
    return 0 if state == "mounted" else 1


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(keep=args.keep, directory=args.dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusepager", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fusepager {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    mount = commands.add_parser(
        "mount", help="mount a store (in the background unless -f)", description="Mount a fusepager store.", epilog=MOUNT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mount.add_argument("store", help="the store directory (created objects live in STORE/objects)")
    mount.add_argument("mountpoint", help="an empty directory to mount on")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument("-d", "--debug", action="store_true", help="FUSE and pager debug output (implies -f)")
    mount.add_argument("-o", action="append", default=[], metavar="OPT[,OPT...]", help="FUSE mount options (e.g. -o allow_other)")
    mount.add_argument("--kernel", action="append", default=[], metavar="NAME:PAGE_SIZE[:PAGES[:CLUSTER]]", help="run a kernel in the daemon (repeatable)")
    mount.add_argument("--console", action="store_true", help="with -f: take kernel commands on stdin")
    mount.add_argument(
        "--listen",
        metavar="ADDR",
        help="where kernel processes connect (kernelsim run --connect ADDR): unix:PATH or tcp:HOST:PORT; "
        "default unix:STORE/fusepager.sock (a short path in /tmp if that one is too long); 'none' to accept none",
    )
    mount.add_argument(
        "--no-default-manager",
        dest="default_manager",
        action="store_false",
        help="do not be the in-process kernels' default memory manager (their anonymous memory then cannot be paged out)",
    )
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.set_defaults(run=_mount)

    umount = commands.add_parser("umount", help="unmount (also clears a stale mount)", description="Unmount a fusepager mount and wait for its daemon.")
    umount.add_argument("mountpoint")
    umount.set_defaults(run=_umount)

    status = commands.add_parser("status", help="is a mount point mounted, free or stale?")
    status.add_argument("mountpoint")
    status.set_defaults(run=_status)

    demo = commands.add_parser("demo", help="a narrated tour: mount, two kernels, faults, what the shell sees")
    demo.add_argument("--keep", action="store_true", help="leave it mounted at the end and say how to look around")
    demo.add_argument("--dir", help="work in this directory instead of a new temporary one")
    demo.set_defaults(run=_demo)

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

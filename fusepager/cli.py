"""The `fusepager` command: mount, umount, status, demo, and the tools that work on a mount (top, import, sync, trace)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys

import trio

from kernelsim import __version__

from kernelsim.transport import Address

from .control import ControlError, parse_number
from .mount import KernelSpec, MountError, daemon_log_path, default_listen, mount_state, serve, unmount
from .trace import TRACE_KEEP, TRACE_SEGMENT
from .unmounting import RETURN_WAIT

MAX_TRACE_KEEP = 1000

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
  fusepager trace /mnt/pager --svg trace.svg  draw it as a message sequence diagram
  fusepager top /mnt/pager                    live page maps, message rates and locks (q quits)
  fusepager import disk.img /mnt/pager/objects/disk --create
                                              copy a file into a new object, with a progress bar
  fusepager sync /mnt/pager/objects/disk      have the kernels return its changed pages, store
                                              them (progress bar) and fsync
  fusepager mount STORE MNT -f --kernel k1:4096 --kernel k2:16384 --console
                                              foreground, with two kernels in the process taking
                                              commands on stdin: k1 map hello 64K; k1 read hello 16
  fusepager umount /mnt/pager                 unmount (also clears a stale mount)
"""

MOUNT_EPILOG = """\
The store is a plain directory: STORE/objects/NAME/data holds each object's bytes as a sparse
file, meta.json beside it its attributes.  A pager restarted on the same store serves the same
bytes.  In the background the daemon logs to STORE/fusepager.log.  The message log (MNT/trace)
is kept in STORE/trace/trace, rotated at --trace-size into trace.1 ... trace.N (also MNT/trace.1
...); each mount starts a new segment.

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
    try:
        unmount_wait = _unmount_wait(args.unmount_wait)
    except ValueError as error:
        print(f"fusepager mount: {error}", file=sys.stderr)
        return 2
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
                unmount_wait=unmount_wait,
                on_ready=ready,
                trace_size=args.trace_size,
                trace_keep=args.trace_keep,
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


def _trace_size(text: str) -> int:
    try:
        size = parse_number(text, "trace size")
    except ControlError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"trace size {text!r}: a segment holds at least a byte")
    return size


def _trace_keep(text: str) -> int:
    try:
        keep = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of segments") from None
    if not 0 <= keep <= MAX_TRACE_KEEP:
        raise argparse.ArgumentTypeError(f"{text!r}: keep 0 to {MAX_TRACE_KEEP} older segments")
    return keep


MAX_UNMOUNT_WAIT = 3600.0


def _unmount_wait(text: str) -> float:
    """--unmount-wait S: a number of seconds from 0 to MAX_UNMOUNT_WAIT; ValueError otherwise."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_UNMOUNT_WAIT:  # nan fails too
        raise ValueError(f"--unmount-wait {text!r}: give a number of seconds from 0 to {MAX_UNMOUNT_WAIT:g}")
    return seconds


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
    command += ["--trace-size", str(args.trace_size), "--trace-keep", str(args.trace_keep)]
    command += ["--unmount-wait", args.unmount_wait]
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


def _top(args: argparse.Namespace) -> int:
    from . import top

    if not args.interval > 0:
        print("fusepager top: --interval must be a positive number of seconds", file=sys.stderr)
        return 2
    return top.run(args.mountpoint, interval=args.interval, once=args.once, color=args.color)


TRACE_EPILOG = """\
TRACE is a mount's live trace file (MNT/trace; MNT alone means the same), a saved copy, or -
for standard input.  With no output option, Mermaid text is printed.

Lifelines: kernels first (k1, k2, ...), then memory objects (copies are NAME~N, the default
manager is `default` and its temporaries default/N), each in order of first appearance.
Arrows: one per message, labelled without the memory_object_ prefix, with offset+length,
access and lock values; kernel -> object in blue, object -> kernel in green, data_error and
destroy in red; in the SVG, the trace's time on the left and the whole line as a tooltip.
Notes: the trace's other lines are notes on the lifeline they name (`hello: copy 1 saved ...`,
`mount truncated hello ...`); --notes adds those about the daemon as a whole (across every
lifeline), --no-notes leaves all out.  Notes about an object not drawn are always left out.

Filters: --object and --kernel take names or shell patterns ('hello*' is hello and its copies),
repeated or comma-separated; --first N / --last N keep the first or last N messages (with the
notes among them); --since and --until take HH:MM[:SS[.micro]] of the trace's clock.

examples:
  fusepager trace /mnt/pager                  Mermaid text of the whole trace on stdout
  fusepager trace /mnt/pager --svg trace.svg  an SVG picture (no browser needed)
  fusepager trace /mnt/pager --svg t.svg --object hello --kernel k1,k2 --last 40
  fusepager trace saved.trace --first 30 -o first30.mmd --png first30.png
  fusepager trace saved.trace --since 12:00:01 --until 12:00:02.5 --notes --svg second.svg
  grep -v data_initialize /mnt/pager/trace | fusepager trace - --svg quiet.svg
"""


def _clock(text: str) -> float:
    from .diagram import clock_seconds

    try:
        return clock_seconds(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive number of messages: {text!r}")
    return int(text)


def _trace(args: argparse.Namespace) -> int:
    from . import diagram

    def fail(message: str, status: int = 2) -> int:
        print(f"fusepager trace: {message}", file=sys.stderr)
        return status

    source = args.source
    if source != "-" and os.path.isdir(source):
        source = os.path.join(source, "trace")  # the mount point: its trace file
    try:
        if source == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(source, "rb") as file:
                data = file.read()
    except OSError as error:
        return fail(f"cannot read {source}: {error.strerror or error}")
    parsed = diagram.parse_trace(data.decode("utf-8", "replace").splitlines())
    shown = "standard input" if source == "-" else source
    if not parsed.messages:
        return fail(f"no messages in {shown} ({parsed.lines} lines; a message line reads 'HH:MM:SS.micro k1 -> hello memory_object_...(...)')")
    def names(texts: list[str]) -> tuple[str, ...]:  # repeated, or comma lists
        return tuple(name for text in texts for name in text.split(",") if name)

    selection = diagram.Selection(
        objects=names(args.object), kernels=names(args.kernel), since=args.since, until=args.until, first=args.first, last=args.last
    )
    drawn = diagram.build_diagram(diagram.select(parsed.events, selection), args.notes, parsed.names)
    if not drawn.messages:
        kernels = " ".join(dict.fromkeys(message.kernel for message in parsed.messages))
        objects = " ".join(dict.fromkeys(message.object for message in parsed.messages))
        return fail(f"none of the {len(parsed.messages)} messages in {shown} is left after the filters (its kernels: {kernels}; objects: {objects})")
    mermaid = args.mermaid or args.output is not None or not (args.svg or args.png)
    if mermaid and args.output in (None, "-") and args.svg == "-":
        return fail("--svg - and the Mermaid text would both go to stdout: give -o FILE for one of them")
    written = []
    try:
        if mermaid:
            text = diagram.render_mermaid(drawn, title=args.title)
            if args.output is None or args.output == "-":
                sys.stdout.write(text)
            else:
                with open(args.output, "w", encoding="utf-8") as file:
                    file.write(text)
                written.append(args.output)
        if args.svg or args.png:
            picture = diagram.layout(drawn, show_time=args.time, title=args.title)
            if args.svg == "-":
                sys.stdout.write(diagram.render_svg(picture))
            elif args.svg:
                with open(args.svg, "w", encoding="utf-8") as file:
                    file.write(diagram.render_svg(picture))
                written.append(args.svg)
            if args.png:
                diagram.render_png(picture, args.png)
                written.append(args.png)
    except diagram.DiagramError as error:
        return fail(str(error))
    except OSError as error:
        return fail(f"cannot write {error.filename}: {error.strerror or error}", 1)
    if written:
        names = " ".join(participant.name for participant in drawn.participants)
        print(
            f"fusepager trace: {len(drawn.messages)} messages, {len(drawn.notes)} notes, lifelines {names} -> {', '.join(written)}",
            file=sys.stderr,
        )
    return 0


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
    mount.add_argument(
        "--trace-size",
        type=_trace_size,
        default=TRACE_SEGMENT,
        metavar="BYTES",
        help=f"rotate the trace (STORE/trace/trace, MNT/trace) when it would pass BYTES (K, M, G suffixes; default {TRACE_SEGMENT >> 20}M)",
    )
    mount.add_argument(
        "--trace-keep",
        type=_trace_keep,
        default=TRACE_KEEP,
        metavar="N",
        help=f"older trace segments kept, trace.1 ... trace.N, in the store and the mount (default {TRACE_KEEP})",
    )
    mount.add_argument(
        "--unmount-wait",
        metavar="S",
        default=str(RETURN_WAIT),
        help=f"at unmount, wait up to S seconds for every kernel to return its changed pages (default {RETURN_WAIT:g}, "
        f"at most {MAX_UNMOUNT_WAIT:g}; 0: do not ask, kernel processes keep them for the next daemon); "
        "kernels that do not answer are named in the log and the trace",
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

    top = commands.add_parser(
        "top", help="a live view of a mount: page maps per kernel, message rates, locks",
        description="A live view of a fusepager mount: each kernel's resident pages of each object, messages per second "
        "by kind, faults served and their latency, and the locks the manager keeps or waits on.  q or Ctrl-C quits.",
    )  # fmt: skip
    top.add_argument("mountpoint", help="a fusepager mount")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="seconds between refreshes (default 1)")
    top.add_argument("--once", action="store_true", help="print one frame and exit (rates since the mount)")
    top.add_argument("--no-color", dest="color", action="store_false", help="no colours (none either when stdout is not a terminal)")
    top.set_defaults(run=_top)

    from . import tools  # import and sync: long work through a mount, with a progress bar

    load = commands.add_parser(
        "import", help="copy a file into a memory object through the mount, with progress", epilog=tools.IMPORT_EPILOG,
        description="Copy FILE into the memory object MNT/objects/NAME (sparse: zero chunks stay holes), then sync it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load.add_argument("file", metavar="FILE", help="the file to copy in; - for stdin (size unknown)")
    load.add_argument("object", metavar="MNT/objects/NAME", help="the object's directory in a fusepager mount")
    load.add_argument("--create", action="store_true", help="create the object if it does not exist")
    load.add_argument("--chunk", metavar="BYTES", help="bytes per write (default 1M; K, M, G suffixes)")
    load.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary (errors still)")
    load.set_defaults(run=tools.run_import)

    sync = commands.add_parser(
        "sync", help="have kernels return an object's changed pages and store them, with progress", epilog=tools.SYNC_EPILOG,
        description="Clean the memory object MNT/objects/NAME chunk by chunk ('clean OFF LEN' to its ctl), then sync it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sync.add_argument("object", metavar="MNT/objects/NAME", help="the object's directory in a fusepager mount")
    sync.add_argument("offset", metavar="OFF", nargs="?", help="where the range starts (default: the whole object)")
    sync.add_argument("length", metavar="LEN", nargs="?", help="how long it is")
    sync.add_argument("--chunk", metavar="BYTES", help="bytes per clean command (default 4M; K, M, G suffixes)")
    sync.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary (errors still)")
    sync.set_defaults(run=tools.run_sync)

    trace = commands.add_parser(
        "trace", help="draw a trace as a message sequence diagram (Mermaid, SVG, PNG)", epilog=TRACE_EPILOG,
        description="Draw a fusepager trace as a message sequence diagram: kernels and memory objects as lifelines, "
        "messages as arrows, the engine's notes on the lifeline they are about.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    trace.add_argument("source", metavar="TRACE", help="MNT/trace (or MNT), a saved trace, or - for stdin")
    trace.add_argument("--mermaid", action="store_true", help="print Mermaid sequenceDiagram text (the default without --svg/--png)")
    trace.add_argument("-o", "--output", metavar="FILE", help="write the Mermaid text to FILE instead of stdout (implies --mermaid)")
    trace.add_argument("--svg", metavar="FILE", help="draw an SVG picture into FILE (- for stdout)")
    trace.add_argument("--png", metavar="FILE", help="draw a PNG picture into FILE (needs matplotlib)")
    trace.add_argument("--object", action="append", default=[], metavar="NAME", help="only messages of these objects (repeatable, comma list, 'hello*')")
    trace.add_argument("--kernel", action="append", default=[], metavar="NAME", help="only messages of these kernels (repeatable, comma list)")
    window = trace.add_mutually_exclusive_group()
    window.add_argument("--first", type=_count, metavar="N", help="only the first N messages (after the other filters)")
    window.add_argument("--last", type=_count, metavar="N", help="only the last N messages (after the other filters)")
    trace.add_argument("--since", type=_clock, metavar="HH:MM:SS", help="only lines from this time of the trace's clock on")
    trace.add_argument("--until", type=_clock, metavar="HH:MM:SS", help="only lines up to this time")
    notes = trace.add_mutually_exclusive_group()
    notes.add_argument("--notes", dest="notes", action="store_const", const="all", default="lifeline", help="also the notes about the daemon as a whole")
    notes.add_argument("--no-notes", dest="notes", action="store_const", const="none", help="no notes, messages only")
    trace.add_argument("--no-time", dest="time", action="store_false", help="SVG/PNG: leave out the time column")
    trace.add_argument("--title", metavar="TEXT", help="a title above the diagram")
    trace.set_defaults(run=_trace)

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""The `fusepager` command."""

from __future__ import annotations

import argparse
import sys

from kernelsim import __version__

DESCRIPTION = """\
fusepager: external memory managers that keep their pages in real files and show them through a
FUSE mount.  This version has the kernel side only (see `kernelsim --help` and
examples/hello_pager.py); the pager engine, the store and the mount are not built yet.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusepager", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"fusepager {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

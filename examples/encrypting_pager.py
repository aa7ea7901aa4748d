#!/usr/bin/env python3
"""A memory manager that keeps its object's pages encrypted at rest, one file per page.

Run it:  .venv/bin/python examples/encrypting_pager.py [--dir DIR] [--keep] [--trace]

Tasks see plaintext; the files in DIR/pages/ never hold any.  Each 4 KiB block of the object
is one file, `00003000.enc` for the block at offset 0x3000, laid out as

    nonce (16 bytes) | ciphertext (4096 bytes) | tag (32 bytes)

- the ciphertext is the block XORed with a keystream: keyed BLAKE2b in counter mode,
  BLAKE2b(key=K_enc, offset | nonce | counter), 64 bytes per counter value;
- the nonce is new for every write of the block (os.urandom), so no keystream is ever used
  twice, and writing the same bytes twice gives different files;
- the tag is HMAC-SHA256(K_mac, offset | nonce | ciphertext), checked before anything is
  decrypted (encrypt-then-MAC).  The offset is in it, so a page file copied over another
  offset fails its check too.

**This is for teaching, not a vetted cipher.**  It uses only the standard library because the
project takes no new dependencies.  A real manager would use an authenticated cipher from a
reviewed library, e.g. AES-GCM or ChaCha20-Poly1305 from `cryptography`
(cryptography.hazmat.primitives.ciphers.aead), keep its key out of the process that holds the
files, and guard against rollback (an attacker putting back an older, genuine page file: a
per-page version number kept elsewhere would catch it; this example does not).

The script writes secret text into an object, has the pages go home (pageout under a small
memory limit, then a flush), shows that no file holds any plaintext (`grep` finds nothing),
flips one bit of a page file and shows that the task's next fault on that page fails cleanly
(read_pages raises PagerError, the engine answers memory_object_data_error, the task's read
raises KernMemoryError), and that every other page reads back as written.  It exits 0 when all
of that holds, and 1 with a message saying what did not.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import shutil
import sys
import tempfile
from pathlib import Path

import trio

import kernelsim
from fusepager.pager import Pager, PagerCallbacks, PagerError
from kernelsim.interface import KERN_MEMORY_ERROR, KernMemoryError

BLOCK = 4096  # the smallest kernel page size: every kernel's pages are whole blocks
ZERO_BLOCK = bytes(BLOCK)
NONCE = 16
TAG = 32
OBJECT_SIZE = 16 * BLOCK
SECRET = b"TOP SECRET"
WRITTEN_PAGES = 12  # pages 0-11 get secret text; 12-15 are never written (holes)
TAMPERED_PAGE = 5


def say(who: str, text: str) -> None:
    print(f"  {who:<8} {text}", flush=True)


class CheckFailed(Exception):
    """What the example checks did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


class PageCipher:
    """Seals and opens one block: see the module's docstring.  Teaching code, not a vetted cipher."""

    def __init__(self, key: bytes) -> None:
        # Two keys from one: never use the same key for encrypting and for authenticating.
        self.encryption_key = hashlib.blake2b(b"encrypt", key=key, digest_size=32).digest()
        self.mac_key = hashlib.blake2b(b"authenticate", key=key, digest_size=32).digest()

    def _keystream(self, offset: int, nonce: bytes) -> bytes:
        prefix = offset.to_bytes(8, "big") + nonce
        return b"".join(
            hashlib.blake2b(prefix + counter.to_bytes(8, "big"), key=self.encryption_key).digest()
            for counter in range(BLOCK // 64)
        )

    def _tag(self, offset: int, nonce: bytes, ciphertext: bytes) -> bytes:
        return hmac.new(self.mac_key, offset.to_bytes(8, "big") + nonce + ciphertext, hashlib.sha256).digest()

    def seal(self, offset: int, block: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        stream = self._keystream(offset, nonce)
        ciphertext = (int.from_bytes(block, "big") ^ int.from_bytes(stream, "big")).to_bytes(BLOCK, "big")
        return nonce + ciphertext + self._tag(offset, nonce, ciphertext)

    def open(self, offset: int, sealed: bytes) -> bytes:
        """The block, or ValueError if the file is not one this key sealed for this offset."""
        if len(sealed) != NONCE + BLOCK + TAG:
            raise ValueError(f"{len(sealed)} bytes, not {NONCE + BLOCK + TAG}")
        nonce, ciphertext, tag = sealed[:NONCE], sealed[NONCE:-TAG], sealed[-TAG:]
        if not hmac.compare_digest(tag, self._tag(offset, nonce, ciphertext)):
            raise ValueError("its tag does not match: tampered with, or not sealed for this offset")
        stream = self._keystream(offset, nonce)
        return (int.from_bytes(ciphertext, "big") ^ int.from_bytes(stream, "big")).to_bytes(BLOCK, "big")


class EncryptedPages(PagerCallbacks):
    """The object's bytes: one sealed file per 4 KiB block; no file means zeros (a hole)."""

    def __init__(self, directory: Path, size: int, cipher: PageCipher) -> None:
        self.directory = directory
        self.size = size
        self.cipher = cipher

    def path(self, offset: int) -> Path:
        return self.directory / f"{offset:08x}.enc"

    # A plain `def`: it cannot block, so the engine may answer a fault at once (pager-api.md §2).
    def read_pages(self, offset, length):
        blocks = []
        found = False
        for at in range(offset, offset + length, BLOCK):
            try:
                sealed = self.path(at).read_bytes()
            except FileNotFoundError:
                blocks.append(ZERO_BLOCK)
                continue
            try:
                blocks.append(self.cipher.open(at, sealed))
            except ValueError as error:
                say("epager", f"<- data_request {at:#06x}: page file {self.path(at).name} refused: {error}")
                # The engine answers memory_object_data_error; the faulting task gets KernMemoryError.
                raise PagerError(f"page file {self.path(at).name} fails its integrity check", KERN_MEMORY_ERROR) from None
            found = True
        if not found:
            return None  # a hole: memory_object_data_unavailable, the kernel zero-fills
        return b"".join(blocks)

    async def write_pages(self, offset, data):
        for at in range(0, len(data), BLOCK):
            if offset + at >= self.size:
                break  # a page can reach past the object's end: drop that part
            block = bytes(data[at : at + BLOCK])
            path = self.path(offset + at)
            if block == ZERO_BLOCK:
                path.unlink(missing_ok=True)  # zeros need no file (and a hole tells nothing)
                continue
            sealed = self.cipher.seal(offset + at, block)
            scratch = path.with_suffix(".tmp")
            scratch.write_bytes(sealed)
            os.replace(scratch, path)  # a crash leaves the old file or the new, never half
            say("epager", f"<- data_return  {offset + at:#06x}: sealed into {path.name}, nonce {sealed[:4].hex()}..")

    async def report_extent(self):
        return self.size


def secret_page(page: int) -> bytes:
    line = b"page %02d: %s, the launch code is 7-4-1-9.\n" % (page, SECRET)
    return (line * (BLOCK // len(line) + 1))[:BLOCK]


def files_with(directory: Path, needle: bytes) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if needle in path.read_bytes())


async def run(directory: Path, show_trace: bool) -> None:
    cipher = PageCipher(os.urandom(32))  # a new key every run: the files are for this run only
    store = EncryptedPages(directory, OBJECT_SIZE, cipher)
    pager = Pager(store, name="epager")
    trace_lines: list[str] = []
    pager.trace.listeners.append(trace_lines.append)
    if show_trace:
        pager.trace.listeners.append(lambda line: say("trace", line))
    expected = b"".join(secret_page(p) for p in range(WRITTEN_PAGES)) + bytes((16 - WRITTEN_PAGES) * BLOCK)

    async with trio.open_nursery() as nursery:
        await nursery.start(pager.serve)
        async with kernelsim.boot("k1", page_size=4096, memory_pages=8) as kernel:
            task = await kernel.task_create(name="t1")
            address = await task.vm_map(pager.send_right(), OBJECT_SIZE)
            print(f"k1 (4 KiB pages, 8 frames) maps {OBJECT_SIZE // 1024} KiB of 'epager'.")

            print(f"\nk1's task writes secret text into pages 0-{WRITTEN_PAGES - 1}; pageout sends older pages home:")
            for page in range(WRITTEN_PAGES):
                await task.write(address + page * BLOCK, secret_page(page))
            print("the manager flushes k1: every changed page comes home, and k1 drops them all:")
            await pager.flush()
            (record,) = pager.kernels.values()
            check(len(record.pagemap) == 0, f"k1 still holds {len(record.pagemap)} page(s) after the flush")

            print(f"\nWhat the task wrote, and what {store.path(0).name} holds:")
            say("task", f"{secret_page(0)[:40]!r}")
            say("file", f"{store.path(0).read_bytes()[:40].hex()}")
            names = sorted(path.name for path in directory.iterdir())
            check(len(names) == WRITTEN_PAGES, f"{len(names)} page files, not {WRITTEN_PAGES}: {names}")
            leaks = files_with(directory, SECRET) + files_with(directory, b"launch code")
            check(not leaks, f"plaintext found on disk in {leaks}")
            grep = shutil.which("grep")
            if grep:
                result = await trio.run_process([grep, "-rl", SECRET.decode(), str(directory)], check=False, capture_stdout=True)
                say("$", f"grep -rl '{SECRET.decode()}' {directory}   -> exit {result.returncode}, no file named")
                check(result.returncode == 1, f"grep found plaintext (exit {result.returncode}): {result.stdout!r}")
            print(f"no plaintext on disk: none of the {len(names)} page files holds '{SECRET.decode()}'")

            old = store.path(0).read_bytes()
            print("\nThe task writes page 0 again, the same bytes; a fresh nonce makes a different file:")
            await task.write(address, secret_page(0))
            await pager.flush(0, BLOCK)
            new = store.path(0).read_bytes()
            check(new != old and cipher.open(0, new) == cipher.open(0, old), "rewriting page 0 gave the same file")
            say("file", f"before {old[:8].hex()}.. after {new[:8].hex()}..: same plaintext, other bytes")

            tampered = store.path(TAMPERED_PAGE * BLOCK)
            genuine = tampered.read_bytes()
            flipped = bytearray(genuine)
            flipped[NONCE + 100] ^= 0x01  # one bit of the ciphertext
            tampered.write_bytes(flipped)
            print(f"\nOne bit of {tampered.name} flipped on disk; k1's task reads page {TAMPERED_PAGE}:")
            try:
                got = await task.read(address + TAMPERED_PAGE * BLOCK, 16)
            except KernMemoryError as error:
                say("task", f"KernMemoryError: {error}")
                check(error.reason == KERN_MEMORY_ERROR, f"the fault failed with reason {error.reason}, not KERN_MEMORY_ERROR")
                check(error.offset == TAMPERED_PAGE * BLOCK, f"the fault failed at {error.offset:#x}")
            else:
                raise CheckFailed(f"the tampered page read as {got!r} instead of failing")
            check(
                any("memory_object_data_error(" in line for line in trace_lines),
                "the manager sent no memory_object_data_error",
            )
            say("trace", next(line for line in trace_lines if "memory_object_data_error(" in line))

            print("\nEvery other page reads back as written (pages 12-15, never written, as zeros):")
            for page in range(16):
                if page != TAMPERED_PAGE:
                    got = await task.read(address + page * BLOCK, BLOCK)
                    check(got == expected[page * BLOCK : (page + 1) * BLOCK], f"page {page} read back wrong: {got[:40]!r}")
            say("task", "the 15 other pages read back intact")

            tampered.write_bytes(genuine)
            print(f"With the genuine {tampered.name} back, the kernel asks again, and the page reads:")
            got = await task.read(address + TAMPERED_PAGE * BLOCK, BLOCK)
            check(got == secret_page(TAMPERED_PAGE), f"page {TAMPERED_PAGE} read back wrong after the repair")
            say("task", f"{got[:40]!r}")
        while pager.kernels:  # wait for k1's memory_object_terminate
            await pager.wait_for_change()
        nursery.cancel_scope.cancel()

    # After the kernel is gone: every file opens with the key, and together they are the object.
    stored = bytearray(OBJECT_SIZE)
    for path in directory.iterdir():
        at = int(path.stem, 16)
        stored[at : at + BLOCK] = cipher.open(at, path.read_bytes())
    check(bytes(stored) == expected, "the page files, decrypted, are not what the task wrote")
    check(not files_with(directory, SECRET), "plaintext on disk at the end")
    print("\nOK: every check held")


def leaves(group: BaseExceptionGroup):
    for exception in group.exceptions:
        if isinstance(exception, BaseExceptionGroup):
            yield from leaves(exception)
        else:
            yield exception


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="where the page files go (DIR/pages); default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory at the end")
    parser.add_argument("--trace", action="store_true", help="print every message of the protocol as it goes")
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="encrypting-pager-"))
    directory = root / "pages"
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.enc"):  # page files of an earlier run: another key
        stale.unlink()
    status = 0
    try:
        trio.run(run, directory, args.trace)
    except* CheckFailed as failures:  # raised inside trio's nurseries, so it comes in a group
        for failure in leaves(failures):
            print(f"FAILED: {failure}", file=sys.stderr)
        status = 1
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root)
        else:
            print(f"the page files are in {directory}")
    return status


if __name__ == "__main__":
    sys.exit(main())

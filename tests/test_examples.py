"""The example memory managers in examples/: each runs as a user would run it, says what a
user looks for, checks itself (exit 0), and leaves in --dir what it said it would."""

from __future__ import annotations

import re
import subprocess
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, directory: Path, *, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, f"examples/{name}.py", "--dir", str(directory)]
    if code is not None:  # the example with something changed in it first
        command = [sys.executable, "-c", code, "--dir", str(directory)]
    return subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)


def succeeded(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert "OK: every check held" in lines
    return lines


def test_compressing_pager(tmp_path):
    lines = succeeded(run_example("compressing_pager", tmp_path))
    out = "\n".join(lines)
    assert "both tasks read back every byte as written" in out
    (ratio_line,) = [line for line in lines if line.startswith("compression ratio: ")]
    ratio = float(re.search(r"= ([\d.]+)x$", ratio_line).group(1))
    assert 1.5 < ratio < 3, ratio_line  # half text (about 16x), half random (about 1x)
    assert re.search(r"text .* 16 page files, .* compression ratio \d+(\.\d)?x", out)
    assert re.search(r"never written .* 0 page files", out)
    # The page files it left, as it said: one per written 4 KiB block, zlib streams of the bytes.
    pages = tmp_path / "pages"
    files = sorted(pages.iterdir())
    assert [p.name for p in files] == [f"{offset:08x}.z" for offset in range(0, 128 * 1024, 4096)]
    blocks = {int(p.stem, 16): zlib.decompress(p.read_bytes()) for p in files}
    assert all(len(block) == 4096 for block in blocks.values())
    assert blocks[0].startswith(b"line 0000: the quick brown fox")
    text_size = (pages / "00000000.z").stat().st_size
    assert f"  00000000.z: {text_size} bytes on disk for a 4096-byte page" in lines
    assert text_size < 1000 and (pages / "00010000.z").stat().st_size > 4096
    assert f"the page files are in {pages}" == lines[-1]


def test_encrypting_pager(tmp_path):
    lines = succeeded(run_example("encrypting_pager", tmp_path))
    out = "\n".join(lines)
    assert "no plaintext on disk: none of the 12 page files holds 'TOP SECRET'" in out
    assert "exit 1, no file named" in out  # grep found nothing
    # The tampered page's fault failed cleanly, and the rest read back.
    assert re.search(r"task +KernMemoryError: .*object offset 0x5000, reason KERN_MEMORY_ERROR", out)
    assert "memory_object_data_error(offset=0x5000 size=4096 error_value=KERN_MEMORY_ERROR)" in out
    assert "the 15 other pages read back intact" in out
    assert "task     b'page 05: TOP SECRET, the launch code is '" in out  # repaired, it reads again
    files = sorted((tmp_path / "pages").iterdir())
    assert len(files) == 12
    for path in files:
        data = path.read_bytes()
        assert len(data) == 16 + 4096 + 32
        assert b"SECRET" not in data and b"launch" not in data


def test_encrypting_pager_exits_1_when_a_check_fails(tmp_path):
    """The example's checks are real: with 'encryption' that leaves the bytes as they are, it
    says what it found and exits 1."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('example', 'examples/encrypting_pager.py')\n"
        "example = importlib.util.module_from_spec(spec); spec.loader.exec_module(example)\n"
        "example.PageCipher.seal = lambda self, offset, block: bytes(16) + block + bytes(32)\n"
        "example.PageCipher.open = lambda self, offset, sealed: sealed[16:-32]\n"
        "sys.exit(example.main())\n"
    )
    result = run_example("encrypting_pager", tmp_path, code=code)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("FAILED: plaintext found on disk in ['00000000.enc'"), result.stderr
    assert "OK: every check held" not in result.stdout


def test_snapshotting_pager(tmp_path):
    lines = succeeded(run_example("snapshotting_pager", tmp_path))
    out = "\n".join(lines)
    assert "k1 -> obj memory_object_copy(" in out
    assert "obj: copy 1 of 0x0+16384 for k1, served as obj~1" in out
    assert "the snapshot (the child) still reads the bytes as of the fork" in out
    assert "  child    page 0: 'page 0, version 2: written by the parent before the fork'" in lines
    assert "  parent   page 0: 'page 0, version 3: the parent, after the fork'" in lines
    # Which pages the snapshot saved, and what its file held.
    assert out.count("obj: copy 1 saved 1 page(s) from 0x0 before they change") == 2  # as it goes, and recalled
    assert "copy-1.data (8192 bytes, 2 page(s) saved):" in lines
    assert "  file     0x1000: 'page 1, version 1'" in lines
    assert "  file     0x3000: 'page 3: written by the child into its snapshot'" in lines
    assert "obj: copy 1 ended" in out
    # What it left: the object with the parent's writes and not the child's; no snapshot file.
    data = (tmp_path / "object.data").read_bytes()
    assert len(data) == 4 * 4096
    assert data[:4096].startswith(b"page 0, version 3: the parent, after the fork.")
    assert data[4096:8192].startswith(b"page 1, version 3")
    assert data[3 * 4096 :].startswith(b"page 3, version 1.")
    assert list((tmp_path / "snapshots").iterdir()) == []

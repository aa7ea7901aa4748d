"""docs/pager-api.md: its examples run as written and print what the page shows."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "pager-api.md"


def marked_block(marker: str) -> str:
    """The fenced block right after `<!-- MARKER -->`; there must be exactly one."""
    blocks = re.findall(rf"<!-- {re.escape(marker)} -->\n```[a-z]*\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, f"docs/pager-api.md must have exactly one block marked <!-- {marker} -->"
    return blocks[0]


def without_port_names(line: str) -> str:
    # Port names come from one counter per process: the doc says they may differ.
    return re.sub(r"\b(control|old_control|new_control|name|new_name|new_object|reply_to)=\d+", r"\1=N", line)


def run_example(name: str, tmp_path: Path) -> list[str]:
    script = tmp_path / f"{name}.py"
    script.write_text(marked_block(f"example: {name}"))
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"the example {name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout.splitlines()


def assert_output_is_shown(name: str, out: list[str]) -> None:
    # Lines from concurrent tasks may swap (the doc says so), so compare as multisets, and the
    # example's own prints in order.
    shown = marked_block(f"example-output: {name}").splitlines()
    assert Counter(map(without_port_names, out)) == Counter(map(without_port_names, shown)), (
        f"the output of the example {name} differs from what docs/pager-api.md shows:\n" + "\n".join(out)
    )
    assert [line for line in out if not line.startswith(" ")] == [line for line in shown if not line.startswith(" ")]


def test_the_complete_example_runs_and_prints_what_the_doc_shows(tmp_path):
    out = run_example("minimal-pager", tmp_path)

    # What the page says happened, in order: the read came from the callbacks, the hole was
    # zero-filled, the write was asked for with data_unlock, and sync returned only after the
    # write reached write_pages, so read_pages gives it back.
    assert "read: b'Hello, pager!'" in out
    assert "hole: b'\\x00\\x00\\x00\\x00'" in out
    assert any("memory_object_data_supply(offset=0x0" in line and "lock_value=-w-" in line for line in out)
    assert any("memory_object_data_unavailable(offset=0x5000" in line for line in out)
    assert any("memory_object_data_unlock(" in line and "desired_access=-w-" in line for line in out)
    assert out.count("k1 holds: ['0x0 4096 rw- dirty', '0x5000 4096 rw- dirty']") == 1
    writes = [i for i, line in enumerate(out) if line.startswith("  write_pages(0x0, <4096 bytes>)")]
    read_back = out.index("read_pages now: b'Hello, kernel'")
    assert len(writes) == 1 and writes[0] < read_back
    assert out[read_back + 1] == "k1 holds: ['0x0 4096 r-- -', '0x5000 4096 r-- -']"
    assert "memory_object_terminate(" in out[-1]

    # And the output shown on the page, line for line.
    assert_output_is_shown("minimal-pager", out)


def test_the_two_kernel_example_shows_coherence(tmp_path):
    out = run_example("two-kernels", tmp_path)

    def index(fragment: str, start: int = 0) -> int:
        return next(i for i in range(start, len(out)) if fragment in out[i])

    # k2's read cleans k1 first (k1 keeps a read-only copy), and k1's change is stored before
    # k2 is supplied, so k2 reads it.
    request = index("k2 -> shared memory_object_data_request(")
    clean = index("shared -> k1 memory_object_lock_request(offset=0x0 size=16384 should_return=dirty should_flush=0 lock_value=-w-", request)
    stored = index("write_pages(0x1000, <4096 bytes>)", clean)
    supplied = index("shared -> k2 memory_object_data_supply(offset=0x0 data=<16384 bytes> lock_value=-w-", clean)
    assert stored < supplied < out.index("k2 reads: b'from k1'")
    # k2's write takes the range from k1 (a flush) before k2's page is unlocked.
    unlock = index("k2 -> shared memory_object_data_unlock(")
    flush = index("shared -> k1 memory_object_lock_request(offset=0x0 size=16384 should_return=dirty should_flush=1 lock_value=---", unlock)
    assert flush < index("shared -> k2 memory_object_lock_request(offset=0x0 size=16384 should_return=none should_flush=0 lock_value=---", unlock)
    # read_through cleans k2 and reads after its change is stored.
    assert index("write_pages(0x0, <16384 bytes>)", flush) < out.index("store reads: b'FROM K2'")
    assert "k1 holds: []" in out and "k2 holds: ['0x0 16384 r-- -']" in out
    assert_output_is_shown("two-kernels", out)


def test_the_copy_call_example_keeps_the_old_bytes_for_the_child(tmp_path):
    out = run_example("copy-call", tmp_path)

    def index(fragment: str) -> int:
        return next(i for i, line in enumerate(out) if fragment in line)

    # The fork sends memory_object_copy for the whole mapping; the engine serves the new object
    # with a pager of its own, which the kernel inits at once.
    copy = index("k1 -> orig memory_object_copy(old_control=")
    assert "offset=0x0 length=8192 new_object=" in out[copy]
    started = index("orig: copy 1 of 0x0+8192 for k1, served as orig~1")
    assert copy < started < index("k1 -> orig~1 memory_object_init(") < index("orig~1 -> k1 memory_object_ready(")
    # The parent's write after the fork waits until the copy has saved the old page.
    assert index("orig: copy 1 saved 1 page(s) from 0x0 before they change") < out.index("parent reads: b'AFTER THE FORK!'")
    # The child's read goes to the copy's pager, which serves the saved page.
    request = index("k1 -> orig~1 memory_object_data_request(")
    assert request < index("orig~1 -> k1 memory_object_data_supply(") < out.index("child reads: b'before the fork'")
    assert "copy_contents: b'before the fork'" in out
    # The copy ends with its kernel's terminate.
    assert index("k1 -> orig~1 memory_object_terminate(") < index("orig: copy 1 ended") == len(out) - 1
    assert_output_is_shown("copy-call", out)

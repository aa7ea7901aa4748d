"""docs/pager-api.md: its complete example runs as written and prints what the page shows."""

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
    return re.sub(r"\b(control|name|reply_to)=\d+", r"\1=N", line)


def test_the_complete_example_runs_and_prints_what_the_doc_shows(tmp_path):
    script = tmp_path / "minimal_pager.py"
    script.write_text(marked_block("example: minimal-pager"))
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"the example failed:\n{result.stdout}\n{result.stderr}"
    out = result.stdout.splitlines()

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

    # And the output shown on the page, line for line.  Lines from concurrent tasks may swap
    # (the doc says so), so compare as multisets, and the example's own prints in order.
    shown = marked_block("example-output: minimal-pager").splitlines()
    assert Counter(map(without_port_names, out)) == Counter(map(without_port_names, shown)), (
        "the example's output differs from what docs/pager-api.md shows:\n" + result.stdout
    )
    assert [line for line in out if not line.startswith(" ")] == [line for line in shown if not line.startswith(" ")]

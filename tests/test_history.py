"""The history checker (tests/history.py): what it accepts, and what it must reject."""

from __future__ import annotations

import pytest

from history import HistoryError, Write, cell_value, check


def w(writer: str, offset: int, write_id: int, cells: int, began: float, acked: float) -> Write:
    return Write(writer, offset, cell_value(write_id) * cells, began, acked)


def holds(*cells: int) -> bytes:
    return b"".join(cell_value(c) if c else bytes(4) for c in cells)


def test_sequential_writes_leave_the_last_ones_value_cell_by_cell():
    writes = [w("a", 0, 1, 3, 0.0, 1.0), w("b", 4, 2, 1, 2.0, 3.0)]
    check(writes, holds(1, 2, 1))
    check(writes, holds(1, 2, 1, 0))  # a cell no write covers keeps what it held
    with pytest.raises(HistoryError, match="undone"):
        check(writes, holds(1, 1, 1))  # b's write lost: a's value, acknowledged before b began


def test_writes_that_overlap_in_time_may_land_in_either_order():
    writes = [w("a", 0, 1, 2, 0.0, 2.0), w("b", 0, 2, 2, 1.0, 3.0)]
    check(writes, holds(1, 1))
    check(writes, holds(2, 2))
    check(writes, holds(1, 2))  # cell by cell: each cell may have its own last writer


def test_a_write_is_undone_by_an_older_one_even_among_concurrent_ones():
    # a before c (acked 1.0 < began 2.0); b overlaps both: c or b may be last, never a.
    writes = [w("a", 0, 1, 1, 0.0, 1.0), w("b", 0, 2, 1, 0.5, 5.0), w("c", 0, 3, 1, 2.0, 3.0)]
    check(writes, holds(3))
    check(writes, holds(2))
    with pytest.raises(HistoryError) as failure:
        check(writes, holds(1))
    assert "a 0x0+4" in str(failure.value) and "c 0x0+4" in str(failure.value)


def test_values_no_write_made_are_rejected():
    writes = [w("a", 0, 1, 2, 0.0, 1.0)]
    with pytest.raises(HistoryError, match="no write of this cell had that value"):
        check(writes, holds(1, 7))
    with pytest.raises(HistoryError, match="no write of this cell had that value"):
        check(writes, holds(1, 0))  # the initial zeros after an acknowledged write: lost
    first, second = 0x01020304, 0x0A0B0C0D
    torn = cell_value(first)[:2] + cell_value(second)[2:]  # half of each of two concurrent writes
    with pytest.raises(HistoryError, match="torn"):
        check([w("a", 0, first, 1, 0.0, 2.0), w("b", 0, second, 1, 1.0, 3.0)], torn)
    with pytest.raises(HistoryError, match="no write covers it"):
        check(writes, holds(1, 1, 9))


def test_the_range_may_start_anywhere_and_writes_may_stick_out_of_it():
    writes = [w("a", 0, 1, 4, 0.0, 1.0), w("b", 12, 2, 2, 2.0, 3.0)]
    check(writes, holds(1, 2), offset=8)
    check(writes, holds(2, 2, 0, 0), offset=12, initial=holds(5, 6, 0, 0))
    with pytest.raises(HistoryError, match="held"):
        check(writes, holds(2, 2, 0, 0), offset=12, initial=holds(5, 6, 7, 0))


def test_misuse_is_a_value_error_not_a_verdict():
    with pytest.raises(ValueError, match="whole"):
        check([Write("a", 2, b"xyzw", 0.0, 1.0)], bytes(8))
    with pytest.raises(ValueError, match="before it began"):
        check([w("a", 0, 1, 1, 2.0, 1.0)], holds(1))
    with pytest.raises(ValueError, match="whole"):
        check([], bytes(6))
    with pytest.raises(ValueError):
        cell_value(0)
    with pytest.raises(ValueError):
        cell_value(1 << 32)

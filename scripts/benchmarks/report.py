"""The results as a Markdown table and a PNG chart (bench.py writes the JSON)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from .common import Result


def _target(result: Result) -> str:
    if result.target is None:
        return ""
    mark = "✓" if result.met else "✗"
    return f"{'≤' if result.lower_is_better else '≥'} {result.target} {mark}"


def markdown(results: list[Result]) -> str:
    """One row a figure, then the command that made each case's figures."""
    lines = [
        "| case | figure | value | anchor | anchor value | ratio | target |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.case} | {r.figure} | {r.value:,.0f} {r.unit} | {r.anchor} | {r.anchor_value:,.0f} {r.anchor_unit or r.unit} | "
            f"{r.ratio:.2f} | {_target(r)} |"
        )
    lines.append("")
    commands = dict.fromkeys(f"- {r.case}: `{r.command}`" for r in results)
    lines.extend(commands)
    return "\n".join(lines)


def chart(results: list[Result], path: Path, title: str) -> None:
    """A horizontal bar a figure: its ratio to its anchor, the target as a tick, green where
    met, red where missed, grey where there is no target."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    from matplotlib import pyplot

    labels = [f"{r.case}: {textwrap.shorten(r.figure, 70)}\nvs {textwrap.shorten(r.anchor, 66)}" for r in results]
    height = 0.8 + 0.6 * len(results)
    figure, axes = pyplot.subplots(figsize=(11, height), layout="constrained")
    colours = ["#8a8a8a" if r.met is None else "#2e8b57" if r.met else "#c0392b" for r in results]
    positions = range(len(results))
    axes.barh(positions, [r.ratio for r in results], color=colours)
    for position, r in zip(positions, results):
        axes.text(r.ratio, position, f" {r.ratio:.2f}", va="center", fontsize=8)
        if r.target is not None:
            axes.plot([r.target, r.target], [position - 0.4, position + 0.4], color="black", linewidth=2)
    axes.set_yticks(list(positions), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("ratio to the anchor (log scale); black tick: target")
    axes.set_title(title, fontsize=9)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)

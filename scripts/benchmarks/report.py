"""The results: a Markdown table (and the JSON written by bench.py)."""

from __future__ import annotations

from .common import Result


def markdown(results: list[Result]) -> str:
    lines = [
        "| case | figure | value | anchor | anchor value | ratio | target |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        target = f"≥ {r.target}" if r.target is not None else ""
        lines.append(
            f"| {r.case} | {r.figure} | {r.value:,.0f} {r.unit} | {r.anchor} | {r.anchor_value:,.0f} {r.anchor_unit or r.unit} | "
            f"{r.ratio:.2f} | {target} |"
        )
    lines.append("")
    commands = dict.fromkeys(f"- {r.case}: `{r.command}`" for r in results)
    lines.extend(commands)
    return "\n".join(lines)

"""Markdown tables: the sweep's trials.md and every benchmark's section of BENCHMARKS.md are written by this one
function. Needs nothing beyond the standard library (the GPU machine has no Ray and no pydantic)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], missing: str = "–") -> str:
    """A GitHub-flavoured table, one line per row; ``None`` cells print as ``missing``, others with ``str``."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row of {len(row)} cells under a header of {len(header)}: {list(row)}")
        lines.append("| " + " | ".join(missing if c is None else str(c) for c in row) + " |")
    return "\n".join(lines)

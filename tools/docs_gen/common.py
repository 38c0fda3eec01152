"""What every renderer shares: where the results are, loading one, and formatting numbers and tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"<!-- generated:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /generated:(?P=name) -->", re.S)


def load(name: str) -> dict:
    """benchmarks/results/<name> as a dict."""
    return json.loads((RESULTS / name).read_text())


def x(value: float | None, digits: int = 2) -> str:
    """A ratio: 1.49×."""
    return "–" if value is None else f"{value:.{digits}f}×"


def ci(interval: list | None, digits: int = 2, scale: float = 1.0) -> str:
    """A 95% interval: (1.44–1.52)."""
    if not interval:
        return ""
    lo, hi = (v * scale for v in interval)
    sep = " to " if lo < 0 else "–"
    return f"({lo:.{digits}f}{sep}{hi:.{digits}f})"


def pct(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value * 100:+.{digits}f}%" if sign else f"{value * 100:.{digits}f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(command: str | list | None, out: str, fallback: str = "") -> str:
    """The command that wrote a results file, as recorded in it (else the documented one)."""
    if isinstance(command, list):
        command = " ".join(command)
    command = (command or fallback).strip()
    return f"Written by `{command}` → `benchmarks/results/{out}`." if command else f"`benchmarks/results/{out}`."


def ratio_label(config: str) -> str:
    return config.removeprefix("civic ")

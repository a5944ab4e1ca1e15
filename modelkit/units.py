"""The kit's one format for sizes and counts, so a summary, a table and a progress bar
never disagree (``164.6 KB`` everywhere, never ``169k`` beside it)."""
from __future__ import annotations


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (powers of 1024, one decimal; whole bytes below 1 KB)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float, unit: str = "") -> str:
    """``21`` -> ``"21"``, ``3394`` -> ``"3,394"``; bytes (``unit="B"``) as :func:`human_bytes`."""
    if unit == "B":
        return human_bytes(n)
    text = f"{int(n):,}" if float(n).is_integer() else f"{n:,.1f}"
    return f"{text} {unit}" if unit else text

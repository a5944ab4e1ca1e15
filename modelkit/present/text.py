"""Plain-text formats every view shares (summaries, tables, model cards): no imports from
the rest of the kit, so any layer above may use them."""
from __future__ import annotations

import math
from typing import Any


def human_bytes(n: Any) -> str:
    """``1536`` -> ``"1.5 KB"``: the kit's one byte format (every summary, table and card
    prints sizes with it); blank for missing."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return ""
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)

"""How the review report writes values and tables (Markdown): `fmt` for every number, `md_table`,
`columns_table`. Used by pipeline_lib.report and its sections (pipeline_lib.report_serve)."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence


def fmt(value: Any) -> str:
    """How the report writes a value: 4 significant digits for floats, ints as they are, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    try:
        import numpy as np

        if isinstance(value, np.generic):
            value = value.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == int(value) and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def columns_table(rows: Sequence[Mapping[str, Any]], spec: Sequence[tuple[str, str]]) -> str:
    return md_table([h for _, h in spec], ([r.get(c) for c, _ in spec] for r in rows))

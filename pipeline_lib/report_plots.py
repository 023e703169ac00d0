"""The report's plots: PNG images drawn from the benchmark rows (pipeline_lib.report reads them from the CSV).

`plot_xrt(rows, path)` (x real time per backend / precision, one bar per thread count) and
`plot_breakdown(rows, path)` (seconds of each stage per second of audio, stacked: the bar is the RTF)
each write one PNG to `path` and return it; they read the rows only (the columns of
pipeline_lib.bench.COLUMNS) and decide nothing. matplotlib is imported inside them (Agg backend), so
importing this module needs no matplotlib. The report (pipeline_lib.report.build_report) names the
files (XRT_PNG, BREAKDOWN_PNG) and writes them atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline_lib.registry import DISPLAY_NAMES as BACKEND_NAMES
from pipeline_lib.report_format import fmt


def _label(row: Mapping[str, Any]) -> str:
    name = BACKEND_NAMES.get(row["backend"], row["backend"])
    return f"{name}\n{row['precision']}"


def plot_xrt(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Grouped bars: x real time per backend / precision, one bar per thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(dict.fromkeys(_label(r) for r in rows))
    threads = sorted({int(r["threads"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(groups) + 2), 4.8), dpi=120)
    colors = dict(zip(threads, plt.cm.viridis(np.linspace(0.2, 0.8, len(threads)))))
    width = 0.8 / max(1, len(threads))
    bars_by_threads: dict[int, tuple[list[float], list[float]]] = {n: ([], []) for n in threads}
    for i, g in enumerate(groups):  # each group's bars centred on its tick, whatever thread counts it has
        present = [(n, float(r["xrt"])) for n in threads for r in rows
                   if _label(r) == g and int(r["threads"]) == n and not math.isnan(float(r["xrt"]))]
        for j, (n, y) in enumerate(present):
            bars_by_threads[n][0].append(i + (j - (len(present) - 1) / 2) * width)
            bars_by_threads[n][1].append(y)
    for n in threads:
        xs, ys = bars_by_threads[n]
        bars = ax.bar(xs, ys, width=width * 0.95, color=colors[n], label=f"{n} thread{'s' if n > 1 else ''}")
        ax.bar_label(bars, labels=[fmt(y) for y in ys], padding=2, fontsize=8)
    ax.axhline(1.0, color="firebrick", linestyle="--", linewidth=1, label="real time (1x)")
    ax.set_xticks(range(len(groups)), groups, fontsize=9)
    ax.set_xlabel("backend and precision")
    ax.set_ylabel("x real time (audio s / wall s)")
    ax.set_title("Synthesis speed by backend and thread count (higher is better)")
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


STAGES = (  # (CSV column, legend label, colour)
    ("prefill_s", "LM prefill", "#4c72b0"),
    ("decode_s", "LM decode (per-token loop)", "#55a868"),
    ("lm_only_s", "LM, not split (upstream)", "#8fbc8f"),
    ("decoder_s", "decoder (upstream: incl. ISTFT)", "#c44e52"),
    ("istft_s", "ISTFT", "#dd8452"),
    ("other_s", "other (text, tokenizer, glue)", "#8c8c8c"),
)


def plot_breakdown(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Stacked horizontal bars: seconds of each stage per second of audio (the bar's length is the RTF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def val(r: Mapping[str, Any], key: str) -> float:
        if key == "lm_only_s":  # the LM where it is not split into prefill and decode
            split = not math.isnan(float(r["prefill_s"]))
            v = 0.0 if split else float(r["lm_s"])
        else:
            v = float(r[key])
        audio = float(r["audio_s"])
        return 0.0 if math.isnan(v) or not audio > 0 else max(v, 0.0) / audio

    labels = [f"{BACKEND_NAMES.get(r['backend'], r['backend'])} {r['precision']}, {int(r['threads'])}t" for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 2.2), dpi=120)
    left = [0.0] * len(rows)
    for key, name, color in STAGES:
        widths = [val(r, key) for r in rows]
        if not any(widths):
            continue
        ax.barh(range(len(rows)), widths, left=left, color=color, label=name, height=0.7)
        left = [a + b for a, b in zip(left, widths)]
    for i, (r, total) in enumerate(zip(rows, left)):
        ax.text(total, i, f" RTF {fmt(float(r['rtf']))}", va="center", fontsize=8)
    ax.axvline(1.0, color="firebrick", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("compute time per second of audio (s/s); the whole bar is the RTF, < 1 is faster than real time")
    ax.set_title("Where the time goes, per stage")
    ax.set_xlim(0, max([*left, 1.0]) * 1.18)  # room for the RTF labels
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="stage")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path

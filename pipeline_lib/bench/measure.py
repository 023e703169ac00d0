"""Measure one benchmark configuration in this process: load, synthesise, stream, batch, memory.

`measure(cfg)` builds the configuration's engine (pipeline_lib.bench.engines: one per backend, one
interface), warms it up, times `repeats` syntheses, the first streamed chunk and a batch, and returns
one row (pipeline_lib.bench.COLUMNS keys); `summarize` turns the runs into that row.

Random weights never emit [STOP], so the token count is fixed by max_new_tokens: every synthesis
generates exactly that many tokens, and the row records the count actually generated.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import statistics
import sys
import time
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline_lib.bench import COLUMNS, row_names
from pipeline_lib.bench.config import BATCH_TEXTS, BenchConfig
from pipeline_lib.bench.engines import ENGINES, NAN, Synthesis

log = logging.getLogger(__name__)

UPSTREAM_MAX_TOKENS = 512  # upstream generates until [STOP] or this many tokens


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else NAN


def _median(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(statistics.median(vals)) if vals else NAN


def measure(cfg: BenchConfig) -> dict[str, Any]:
    """Load, warm up, time `repeats` syntheses, streaming and batch; return one row (COLUMNS keys)."""
    max_new = cfg.num_tokens
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else NAN
    start = time.perf_counter()
    engine = ENGINES[cfg.backend](cfg)
    load_s = time.perf_counter() - start
    log.info("%s: loaded in %.2f s", cfg.label, load_s)

    # Warm-up: a short synthesis, so first-call allocations stay out of the timings (every engine,
    # upstream included: its generate() is held to the requested token count).
    if cfg.warmup_tokens > 0:
        engine.synthesize(cfg.text, min(cfg.warmup_tokens, max_new))
    runs = []
    for i in range(cfg.repeats):
        runs.append(engine.synthesize(cfg.text, max_new))
        r = runs[-1]
        log.info("  run %d: %d tokens, %.2f s audio in %.2f s (x%.2f real time)", i + 1, r.num_tokens, r.audio_s,
                 r.wall_s, r.audio_s / r.wall_s if r.wall_s else NAN)

    first_chunk = NAN
    if cfg.stream:
        chunks = [engine.first_chunk_s(cfg.text, max_new) for _ in range(cfg.repeats)]
        if all(c is not None for c in chunks):
            first_chunk = _median(chunks)

    batch_audio = batch_wall = NAN
    if cfg.batch_size:
        measured = engine.batch(BATCH_TEXTS[: cfg.batch_size], max_new)
        if measured is not None:
            batch_audio, batch_wall = measured

    per_token = [t for r in runs for t in r.per_token_s]
    row = summarize(cfg, runs, load_s, per_token, first_chunk, batch_audio, batch_wall)
    row["peak_rss_mb"] = peak_rss_mb()
    row["load_avg"] = load_avg
    return row


def summarize(
    cfg: BenchConfig,
    runs: Sequence[Synthesis],
    load_s: float,
    per_token: Sequence[float],
    first_chunk_s: float,
    batch_audio_s: float,
    batch_wall_s: float,
) -> dict[str, Any]:
    """The row of a configuration. Whole-synthesis figures come from the median run by wall time (the
    lower middle one for an even count), so that they add up: lm = prefill + decode and wall = lm +
    decoder + istft + other. Per-token percentiles pool the decode steps of all runs."""
    median_run = sorted(runs, key=lambda r: r.wall_s)[(len(runs) - 1) // 2]
    wall, audio = median_run.wall_s, median_run.audio_s
    lm, prefill = median_run.lm_s, median_run.prefill_s
    decoder, istft = median_run.decoder_s, median_run.istft_s
    accounted = [v for v in (lm, decoder, istft) if not math.isnan(v)]
    max_new = cfg.num_tokens
    tokens = median_run.num_tokens
    stopped = any(r.stop_emitted for r in runs)
    if stopped:
        note = f"[STOP] after {tokens} of {max_new} tokens"
    elif cfg.backend == "upstream":
        note = (f"fixed {tokens} tokens: upstream's generate() held to max_new_tokens={max_new} (it asks for "
                f"{UPSTREAM_MAX_TOKENS}), token for token with ours; random weights never emit [STOP]")
    else:
        note = f"fixed {tokens} tokens; random weights never emit [STOP]"
    names = row_names(cfg.backend, cfg.precision, cfg.decoder_backend, cfg.decoder_precision)
    row: dict[str, Any] = {c: NAN for c in COLUMNS}
    row.update(
        config=cfg.label,
        backend=names[1],
        precision=names[2],
        threads=cfg.threads,
        max_new_tokens=max_new,
        num_tokens=tokens,
        stop_emitted=int(stopped),
        repeats=len(runs),
        load_s=load_s,
        prefill_s=prefill,
        per_token_median_ms=1e3 * _percentile(per_token, 50),
        per_token_p90_ms=1e3 * _percentile(per_token, 90),
        decode_s=lm - prefill,
        lm_s=lm,
        decoder_s=decoder,
        istft_s=istft,
        other_s=wall - sum(accounted) if accounted else NAN,
        audio_s=audio,
        wall_s=wall,
        rtf=wall / audio if audio > 0 else NAN,
        xrt=audio / wall if wall > 0 else NAN,
        first_chunk_ms=1e3 * first_chunk_s,
        batch_size=cfg.batch_size if not math.isnan(batch_wall_s) else 0,
        batch_audio_s=batch_audio_s,
        batch_wall_s=batch_wall_s,
        batch8_xrt=batch_audio_s / batch_wall_s if batch_wall_s > 0 else NAN,
        note=note,
    )
    return row

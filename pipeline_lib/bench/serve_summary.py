"""What a level of the server load benchmark comes to: the rows of reports/serve.csv (closed loop,
COLUMNS) and reports/serve_open.csv (open loop, OPEN_COLUMNS), and the headline metrics
(metrics/serve.json, with the capacity).

x real time is the audio seconds received by all clients within the measurement window, per second
of it. The window runs from the level's start to the first request end at or after its time bound
(so that it ends on a request boundary: upstream sends each WAV in one piece, and a window cut
mid-request would miss the audio it was working on); to the last end if every request ended before
the bound; to the cut if none ended in between.

Requests still running `drain_s` after the time bound are cut: not errors, and their times so far
enter the TTFA and latency percentiles as lower bounds (both loops). In the open loop their playback
so far also counts in the stall figures and the capacity rule, up to the cut (a listener whose audio
had run out by then is waiting, and that wait counts); a cut request with no audio yet played nothing
and counts against the smooth share. The long requests are the ones most likely still running when a
level ends; leaving them out would flatter an overloaded level.

The capacity rule on the open loop's rows: pipeline_lib.bench.capacity.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from pipeline_lib.bench.capacity import STALL_LIMIT_S, capacity, within_capacity
from pipeline_lib.bench.serve_request import OURS, UPSTREAM, RequestResult, longest_stall_s, stall_s

NAN = float("nan")

# The columns of reports/serve.csv, one row per server x level. Times in ms where the name says so.
COLUMNS = (
    "server",            # ours | upstream
    "backend",           # ours: the runtime backend (onnx | openvino); upstream: upstream
    "precision",         # fp32 | int8 (upstream: fp32, transformers)
    "threads",
    "clients",           # concurrent clients (closed loop)
    "max_new_tokens",    # fixed tokens per sentence (random weights never emit [STOP])
    "response_format",   # what the client asked for (upstream: always WAV)
    "max_batch",         # our server's --max-batch (upstream: none)
    "max_queue",         # our server's --max-queue (upstream: none)
    "level_s",           # the level's time bound (no new requests after it)
    "requests_sent",
    "requests_ok",       # complete responses (status 200, every expected sample)
    "errors",            # status != 200, incomplete audio, transport failures
    "errors_by_status",  # e.g. "429:3 incomplete:1" (empty: none)
    "cut",               # requests still in flight drain_s after level_s (not errors; latencies are lower bounds)
    "window_s",          # the measurement window: level start to the first request end after level_s (see above)
    "audio_s",           # audio seconds received within the window
    "xrt",               # audio_s / window_s: aggregate x real time
    "ttfa_p50_ms",       # time to first audio byte
    "ttfa_p95_ms",
    "latency_p50_ms",    # request start to the body's last byte
    "latency_p95_ms",
    "stall_p50_ms",      # playback stalls (stall_s) of the complete responses: ours streams; upstream's WAV
    "stall_p95_ms",      # comes in one piece (not streamed), so its rows leave them empty
    "settle_s",          # waited for the server to go idle before the level (upstream finishes cut requests)
    "load_avg",          # 1-minute load average when the level started
    "note",
)

# The columns of reports/serve_open.csv, one row per server x arrival rate (open loop).
OPEN_COLUMNS = (
    "server", "backend", "precision", "threads", "max_new_tokens", "response_format", "max_batch", "max_queue",
    "rate_per_s",        # Poisson arrivals: new requests per second (nominal)
    "mean_audio_s",      # the text mix's mean audio length (random weights: every sentence runs to max_new_tokens)
    "offered_streams",   # rate_per_s x mean_audio_s: audio seconds asked for per second = listeners playing at once
    "long_share",        # the mix: probability that a request is one of the long texts
    "seed",              # the arrival schedule's seed (reproducible)
    "level_s",           # arrivals during this many seconds
    "requests_sent",
    "long_sent",         # of them long texts
    "requests_ok",
    "errors",
    "errors_by_status",
    "rejected_429",      # of the errors, 429 (queue full)
    "cut",
    "peak_in_flight",    # most requests open at once
    "window_s",
    "audio_s",
    "xrt",
    "ttfa_p50_ms",
    "ttfa_p95_ms",
    "latency_p50_ms",
    "latency_p95_ms",
    "stall_p50_ms",      # total stall per response heard (complete, or cut after some audio; up to the cut)
    "stall_p95_ms",
    "stalled_over_limit_share",  # of the responses heard: share with a single stall over STALL_LIMIT_S
    "smooth_share",      # of all requests sent: share heard without a stall over STALL_LIMIT_S (the capacity rule)
    "within_capacity",   # 1: this rate passes the capacity rule, 0: it does not
    "settle_s",
    "load_avg",
    "note",
)


@dataclass
class LevelResult:
    """One level's requests as they ran: `clients` (closed loop; 0 in the open loop) or `rate`."""

    clients: int
    started: float
    deadline: float
    requests: list[RequestResult]
    load_avg: float
    finished: float = NAN             # when the last request ended or was cut
    rate: float = NAN                 # open loop: arrivals per second (closed loop: NaN)


def window_end(level: LevelResult) -> float:
    """The measurement window's end (see the module docstring)."""
    ends = sorted(r.started + r.total_s for r in level.requests if r.total_s is not None and r.error != "cut")
    after = [e for e in ends if e >= level.deadline]
    if after:
        return after[0]
    if any(r.error == "cut" for r in level.requests):
        return level.finished if not math.isnan(level.finished) else level.deadline
    return ends[-1] if ends else level.deadline


def _pct_ms(values: Sequence[float], q: float) -> float:
    return 1e3 * float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else NAN


def _received(level: LevelResult, end: float) -> int:
    total = 0
    for r in level.requests:  # samples received by the window's end
        before = [n for t, n in r.arrivals if t <= end]
        total += before[-1] if before else 0
    return total


def _outcome(level: LevelResult, sample_rate: int) -> dict[str, Any]:
    """The figures both loops report: counts, errors by kind, the window and x real time, TTFA and
    latency percentiles (complete and cut requests)."""
    reqs = level.requests
    end = window_end(level)
    window = end - level.started
    received = _received(level, end)
    counted = [r for r in reqs if r.ok or r.error == "cut"]  # cut: latencies so far, lower bounds
    ttfa = [r.first_audio_s if r.first_audio_s is not None else r.total_s for r in counted]
    errors = Counter(r.error for r in reqs if r.error not in (None, "cut"))
    return {
        "requests_sent": len(reqs),
        "requests_ok": sum(r.ok for r in reqs),
        "errors": sum(errors.values()),
        "errors_by_status": " ".join(f"{k.removeprefix('http_')}:{v}" for k, v in sorted(errors.items())),
        "cut": sum(r.error == "cut" for r in reqs),
        "window_s": window,
        "audio_s": received / sample_rate,
        "xrt": received / sample_rate / window if window > 0 else NAN,
        "ttfa_p50_ms": _pct_ms(ttfa, 50),
        "ttfa_p95_ms": _pct_ms(ttfa, 95),
        "latency_p50_ms": _pct_ms([r.total_s for r in counted], 50),
        "latency_p95_ms": _pct_ms([r.total_s for r in counted], 95),
        "load_avg": level.load_avg,
    }


def summarize_level(level: LevelResult, sample_rate: int) -> dict[str, Any]:
    """A closed-loop level's figures (a subset of COLUMNS: the load and its outcome)."""
    ok = [r for r in level.requests if r.ok]
    stalls = [stall_s(r.arrivals, sample_rate) for r in ok]
    return {
        "clients": level.clients,
        **_outcome(level, sample_rate),
        # Playback underruns of the complete responses (stalled_share: for the log only).
        "stall_p50_ms": _pct_ms(stalls, 50),
        "stall_p95_ms": _pct_ms(stalls, 95),
        "stalled_share": sum(s > 0 for s in stalls) / max(1, len(ok)),
    }


def peak_in_flight(requests: Sequence[RequestResult]) -> int:
    """The most requests open at once (a request is open from its start to its end or cut)."""
    events = sorted([(r.started, 1) for r in requests]
                    + [(r.started + r.total_s, -1) for r in requests if r.total_s is not None])
    peak = now = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start (+1)
        now += step
        peak = max(peak, now)
    return peak


def summarize_open_level(level: LevelResult, sample_rate: int, long_texts: Collection[int] = ()) -> dict[str, Any]:
    """An open-loop level's figures (a subset of OPEN_COLUMNS). `long_texts`: the text indices that
    are long (for `long_sent`). Stalls count complete responses and cut ones with audio (see the
    module docstring); smooth_share: of all requests sent, those heard without a stall over the limit."""
    reqs = level.requests
    # Heard: complete, or cut after some audio (a cut listener whose audio had run out is still waiting:
    # that wait counts). A cut request with no audio yet plays nothing (its wait is its TTFA).
    heard = [r for r in reqs if r.ok or (r.error == "cut" and r.arrivals)]

    def until(r: RequestResult) -> float | None:
        return r.started + r.total_s if r.error == "cut" and r.total_s is not None else None

    stalls = [stall_s(r.arrivals, sample_rate, until(r)) for r in heard]
    longest = [longest_stall_s(r.arrivals, sample_rate, until(r)) for r in heard]
    over = sum(s > STALL_LIMIT_S for s in longest)
    row = {
        "rate_per_s": level.rate,
        **_outcome(level, sample_rate),
        "long_sent": sum(r.text_index in long_texts for r in reqs),
        "rejected_429": sum(r.error == "http_429" for r in reqs),
        "peak_in_flight": peak_in_flight(reqs),
        "stall_p50_ms": _pct_ms(stalls, 50),
        "stall_p95_ms": _pct_ms(stalls, 95),
        "stalled_over_limit_share": over / len(heard) if heard else NAN,
        "smooth_share": (len(heard) - over) / len(reqs) if reqs else NAN,
    }
    row["within_capacity"] = int(within_capacity(row))
    return row


def to_frame(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS):
    import pandas as pd

    return pd.DataFrame([{c: r.get(c, NAN) for c in columns} for r in rows], columns=list(columns))


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 4)
    return v.item() if isinstance(v, np.generic) else v


def headline(rows: Sequence[Mapping[str, Any]], open_rows: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The DVC metrics: per server and level x real time, p95 TTFA and errors, and the ratios of
    ours at 8 clients over ours at 1 and over upstream at 8 (where measured); with open-loop rows,
    per rate (key: the rate, 4 decimals) p95 TTFA, smooth share and 429s, and our server's capacity
    (`capacity`, see `capacity()`)."""
    out: dict[str, Any] = {"max_new_tokens": _clean(rows[0]["max_new_tokens"]) if rows else None,
                           "threads": _clean(rows[0]["threads"]) if rows else None}
    for key in ("xrt", "ttfa_p95_ms", "latency_p95_ms", "errors", "requests_ok"):
        out[key] = {s: {str(int(r["clients"])): _clean(r[key]) for r in rows if r["server"] == s}
                    for s in dict.fromkeys(r["server"] for r in rows)}
    xrt = out["xrt"]
    ours, up = xrt.get(OURS, {}), xrt.get(UPSTREAM, {})

    def ratio(a: Any, b: Any) -> Any:
        return round(a / b, 4) if a is not None and b else None

    out["ours_8_over_1_xrt"] = ratio(ours.get("8"), ours.get("1"))
    out["ours_over_upstream_8_xrt"] = ratio(ours.get("8"), up.get("8"))
    p95 = out["ttfa_p95_ms"].get(OURS, {})
    out["ours_ttfa_p95_8_over_1"] = ratio(p95.get("8"), p95.get("1"))
    mine = [r for r in open_rows if r["server"] == OURS]
    if mine:
        out["open_loop"] = {key: {f"{float(r['rate_per_s']):.4g}": _clean(float(r[key])) for r in mine}
                            for key in ("offered_streams", "xrt", "ttfa_p95_ms", "smooth_share", "rejected_429")}
        out["capacity"] = {k: _clean(v) for k, v in capacity(mine).items()}
    return out

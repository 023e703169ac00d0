"""The review report's section "Server under load": the closed loop's table (serve.csv,
pipeline_lib.bench.serve_summary.COLUMNS) with the serving issue's ratios and verdicts, and the open
loop's table (serve_open.csv, OPEN_COLUMNS) with the capacity (pipeline_lib.bench.capacity)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from pipeline_lib.bench.capacity import capacity
from pipeline_lib.report_format import columns_table, fmt, md_table

SERVE_PNG = "serve_xrt.png"  # written beside serve.csv by the serve_bench stage
SERVE_TABLE = (
    ("server", "server"), ("clients", "clients"), ("requests_sent", "requests"), ("requests_ok", "complete"),
    ("errors", "errors"), ("errors_by_status", "errors by status"), ("cut", "cut at the time bound"),
    ("window_s", "window (s)"), ("audio_s", "audio (s)"), ("xrt", "x real time"), ("ttfa_p50_ms", "TTFA p50 (ms)"),
    ("ttfa_p95_ms", "TTFA p95 (ms)"), ("latency_p50_ms", "latency p50 (ms)"), ("latency_p95_ms", "latency p95 (ms)"),
    ("stall_p50_ms", "playback stalls p50 (ms)"), ("stall_p95_ms", "playback stalls p95 (ms)"),
    ("settle_s", "idle wait before (s)"), ("load_avg", "load average"),
)
# Targets of the project's serving issue: our server at 8 concurrent clients against 1 client and
# against upstream's server at 8, its 1-client time to first audio against the runtime's own
# streaming first chunk (reports/bench.csv), and its p95 time to first audio at 8 against 1 client.
SERVE_SCALING_TARGET = 3.0
SERVE_UPSTREAM_TARGET = 10.0
SERVE_TTFA_OVERHEAD_TARGET = 1.2
SERVE_TTFA_P95_GROWTH_TARGET = 4.0


def serve_lines(serve: Sequence[Mapping[str, Any]], bench: Sequence[Mapping[str, Any]] = (),
                open_rows: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """The "Server under load" section: the table of serve.csv (one row per server x level), the
    ratios the serving issue targets with verdicts, the open loop's table and capacity (serve_open.csv,
    `open_loop_lines`; none without rows), and the plot. `bench`: the benchmark's rows, for the
    runtime's streaming first chunk of the same backend, precision and threads as our server."""

    def num(r: Mapping[str, Any] | None, key: str) -> float:
        try:
            v = float(r.get(key)) if r is not None and r.get(key) is not None else math.nan
        except (TypeError, ValueError):
            return math.nan
        return v

    def level(server: str, clients: int) -> Mapping[str, Any] | None:
        return next((r for r in serve if r["server"] == server and int(r["clients"]) == clients), None)

    rows = sorted(serve, key=lambda r: (0 if r["server"] == "ours" else 1, int(r["clients"])))
    ours1, ours8, up8 = level("ours", 1), level("ours", 8), level("upstream", 8)
    chunk_row = None
    if ours1 is not None:
        chunk_row = next((b for b in bench if b["backend"] == ours1["backend"] and b["precision"] == ours1["precision"]
                          and int(b["threads"]) == int(ours1["threads"])), None)
    table = []

    def add(what: str, a: float, b: float, target: float, higher: bool, how: str) -> None:
        ratio = a / b if not (math.isnan(a) or math.isnan(b)) and b != 0 else math.nan
        verdict = "-" if math.isnan(ratio) else ("met" if (ratio >= target if higher else ratio <= target) else "not met")
        table.append([what, fmt(a), fmt(b), fmt(ratio), (">= " if higher else "<= ") + fmt(target), verdict, how])

    add("x real time, ours at 8 clients over ours at 1", num(ours8, "xrt"), num(ours1, "xrt"), SERVE_SCALING_TARGET,
        True, "aggregate audio s / wall s")
    add("x real time, ours at 8 clients over upstream at 8", num(ours8, "xrt"), num(up8, "xrt"),
        SERVE_UPSTREAM_TARGET, True, "same checkpoint, threads and token count")
    chunk_what = ("runtime first chunk: " + (chunk_row["config"] if chunk_row is not None and "config" in chunk_row
                                            else "no benchmark row of the same backend, precision and threads"))
    add("TTFA at 1 client (p50, ms) over the runtime's streaming first chunk (ms)", num(ours1, "ttfa_p50_ms"),
        num(chunk_row, "first_chunk_ms"), SERVE_TTFA_OVERHEAD_TARGET, False, chunk_what + " (reports/bench.csv)")
    add("TTFA p95, ours at 8 clients over 1 client (ms)", num(ours8, "ttfa_p95_ms"), num(ours1, "ttfa_p95_ms"),
        SERVE_TTFA_P95_GROWTH_TARGET, False, "p95 time to first audio byte")
    below = [r for r in serve if r["server"] == "ours" and not math.isnan(num(r, "max_queue"))
             and int(r["clients"]) <= num(r, "max_queue")]
    errors = sum(int(num(r, "errors")) for r in below if not math.isnan(num(r, "errors")))
    if below:
        table.append(["errors, ours, levels at or below the queue limit (max_queue "
                      f"{fmt(int(num(below[0], 'max_queue')))})", fmt(errors), "-", "-", "= 0",
                      "met" if errors == 0 else "not met",
                      "clients " + ", ".join(fmt(int(r["clients"])) for r in below)])
    tokens = sorted({int(num(r, "max_new_tokens")) for r in serve if not math.isnan(num(r, "max_new_tokens"))})
    threads = sorted({int(num(r, "threads")) for r in serve if not math.isnan(num(r, "threads"))})
    fmts = ", ".join(f"{s}: {f}" for s, f in dict((r["server"], r["response_format"]) for r in rows).items())
    # The server uses `threads` cores and the load generator a little: a higher load is other work.
    busy = [r for r in rows if num(r, "load_avg") > num(r, "threads") + 1]
    busy_lines = [f"> **Other work competed for the cores in {len(busy)} of {len(rows)} levels** (1-minute load "
                  f"average above threads + 1, up to {fmt(max(num(r, 'load_avg') for r in busy))}; column `load "
                  "average`): their figures are low, upstream's most (torch's thread pool slows down sharply when "
                  "a core is taken).", ""] if busy else []
    return [
        "## Server under load", "",
        f"> **Random weights produce noise, not speech; max_new_tokens is fixed at {', '.join(map(fmt, tokens))} "
        "tokens per sentence for both servers** (random weights never emit [STOP]; upstream's generate() is held "
        "to the same count), so every complete response is (max_new_tokens - 1) x samples per token samples per "
        "sentence; any other length counts as an error (`incomplete`).", "",
        f"Concurrent clients on loopback (closed loop: each posts its next request when one ends; the texts of "
        f"`pipeline_lib.bench.serve_load.TEXTS` in turn, one or two sentences each), against our server "
        f"(`soprano-onnx serve`) and upstream's (`soprano.server` on the same checkpoint, transformers on CPU), each "
        f"in its own process with {', '.join(map(fmt, threads))} threads, one after the other (formats: {fmts}). "
        "x real time: audio seconds received by all clients within the window per second of it (the window runs "
        "from the level's start to the first request end after its time bound, so that it ends on a request "
        "boundary). TTFA: request start to the first audio byte (WAV: after the header; "
        "upstream sends its WAV in one piece, so its TTFA is its latency). Playback stalls: how long a listener who "
        "plays each complete response from its first audio byte on, pausing whenever it runs out, would have waited "
        "for audio (per response; upstream's WAV is not streamed, so none). Requests still running past the time "
        "bound plus a drain time are cut: not errors, and their times so far enter the percentiles as lower bounds; "
        "upstream's server cannot notice a client that left (its handler blocks its event loop), so each level "
        "waits until the server process is idle (`idle wait before`). "
        "The load generator shares the machine with the server, and on a shared machine one run is one sample.", "",
        *busy_lines,
        columns_table(rows, SERVE_TABLE), "",
        md_table(["figure", "value", "against", "ratio", "target", "verdict", "how"], table), "",
        *open_loop_lines(open_rows),
        f"![x real time and p95 time to first audio against concurrent clients]({SERVE_PNG})", "",
    ]


OPEN_TABLE = (
    ("server", "server"), ("rate_per_s", "arrivals (requests/s)"), ("offered_streams", "offered (real-time streams)"),
    ("requests_sent", "requests"), ("long_sent", "long"), ("requests_ok", "complete"), ("errors", "errors"),
    ("rejected_429", "429s"), ("errors_by_status", "errors by status"), ("cut", "cut at the time bound"),
    ("peak_in_flight", "peak in flight"), ("xrt", "x real time"), ("ttfa_p50_ms", "TTFA p50 (ms)"),
    ("ttfa_p95_ms", "TTFA p95 (ms)"), ("latency_p95_ms", "latency p95 (ms)"),
    ("stall_p50_ms", "playback stalls p50 (ms)"), ("stall_p95_ms", "playback stalls p95 (ms)"),
    ("stalled_over_limit_share", "responses with a stall over the limit"),
    ("smooth_share", "requests played without one"), ("within_capacity", "within capacity"),
    ("settle_s", "idle wait before (s)"), ("load_avg", "load average"),
)


def open_loop_lines(open_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The open loop's subsection: its table (serve_open.csv, one row per arrival rate) and our server's
    capacity by pipeline_lib.bench.capacity's rule; nothing without rows."""
    if not open_rows:
        return []
    rows = sorted(open_rows, key=lambda r: (str(r["server"]), float(r["rate_per_s"])))
    ours = [r for r in rows if r["server"] == "ours"]
    cap = capacity(ours)
    first = rows[0]
    if cap["rate_per_s"] is None:
        verdict = (f"**below the lowest rate measured** ({fmt(cap['lowest_rate_per_s'])} requests/s, "
                   f"{fmt(cap['first_failing_streams'])} real-time streams offered, fails the rule)")
    else:
        verdict = (f"**{fmt(cap['rate_per_s'])} requests/s = {fmt(cap['streams'])} real-time streams**"
                   + (f" ({fmt(cap['first_failing_rate_per_s'])} requests/s, {fmt(cap['first_failing_streams'])} "
                      "streams, fails the rule)" if cap["bounded"]
                      else " (every rate measured passed: the capacity is at least this)"))
    return [
        "### Capacity (open loop)", "",
        f"> **Random weights: audio is noise, and every sentence runs to the full {fmt(first['max_new_tokens'])} "
        "tokens**, so the audio lengths (and the offered load) are those of the token limit, not of speech; the "
        "capacity is that of this checkpoint's size, not of a trained model's output.", "",
        "Requests arrive as a Poisson process at each rate whatever is in flight, as listeners do (a seeded "
        f"schedule, seed {fmt(first['seed'])}: the same arrivals every run), for {fmt(first['level_s'])} s per rate; "
        f"each is a long text of several sentences with probability {fmt(first['long_share'])}, else a text of one "
        "or two, streamed (pcm) and measured as in the closed loop. Offered load: the rate x the mix's mean audio "
        f"length ({fmt(first['mean_audio_s'])} s), in audio seconds per second: the mean number of listeners "
        "playing at once. Requests still running past the time bound plus a drain time are cut, as in the closed "
        "loop; their audio so far counts in the stall figures, up to the cut (a listener whose audio had run out "
        "by then is waiting), and one cut before any audio played nothing. Upstream's server runs one request at a time, so it "
        "gets no open loop.", "",
        columns_table(rows, OPEN_TABLE), "",
        f"Capacity: the highest rate whose p95 time to first audio is at most {fmt(cap['ttfa_p95_limit_ms'])} ms "
        f"and at which at least {fmt(100 * cap['smooth_share_limit'])}% of the requests play without a single stall "
        f"over {fmt(cap['stall_limit_ms'])} ms (a 429 or an error plays nothing and counts against it), every lower "
        f"rate passing too: {verdict}.", "",
    ]

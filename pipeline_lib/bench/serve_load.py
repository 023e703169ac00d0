"""Load benchmark of the speech server on loopback: our server (`soprano-onnx serve`) against
upstream's (`soprano.server`, through pipeline_lib.bench.upstream_server), each in its own process,
one at a time; a closed loop (C concurrent clients) and, for our server, an open loop (Poisson
arrivals at given rates, texts of mixed length) with the capacity it gives.

    python -m pipeline_lib.bench.serve_load --model artifacts/onnx/int8 --checkpoint artifacts/checkpoints/random-80m \
        --threads 2 --csv reports/serve.csv --plot reports/serve_xrt.png
    python -m pipeline_lib.bench.serve_load --model artifacts/onnx/int8 --servers ours --mode open \
        --streams 4 8 12 --open-csv serve_open.csv --json serve.json

The pieces: pipeline_lib.bench.serve_request (one request, measured), serve_process (the server
processes), serve_drivers (the closed and open loops), serve_summary (the rows, the capacity rule,
the headline metrics). This module runs them per server and writes the CSVs, the plot and the JSON.

Per closed-loop level (reports/serve.csv, COLUMNS): aggregate x real time, p50 / p95 time to the first
audio byte (WAV: the first byte after the header), total latency and playback stalls, errors by kind,
requests completed. Per open-loop rate (reports/serve_open.csv, OPEN_COLUMNS): the same, the offered
load in real-time streams, 429s, the share of requests that play without a stall over 100 ms, and
whether the rate is within capacity (the rule: pipeline_lib.bench.serve_summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from pipeline_lib.bench.capacity import capacity, describe, within_capacity  # noqa: F401
from pipeline_lib.bench.serve_drivers import (  # noqa: F401  (the load benchmark's API, in one place)
    CLIENT_LEVELS,
    OPEN_STREAMS,
    LoadSettings,
    OpenLoopSettings,
    arrival_schedule,
    mean_audio_s,
    rates_for_streams,
    run_level,
    run_levels,
    run_open_level,
    run_open_levels,
)
from pipeline_lib.bench.serve_process import ServerSpec, ours_spec, server_process, upstream_spec  # noqa: F401
from pipeline_lib.bench.serve_request import (  # noqa: F401
    LONG_TEXTS,
    OURS,
    SERVERS,
    SPEECH_PATH,
    TEXTS,
    UPSTREAM,
    AudioBody,
    AudioGeometry,
    RequestResult,
    Target,
    expected_samples,
    one_request,
    sentence_count,
    stall_s,
)
from pipeline_lib.bench.serve_summary import (  # noqa: F401
    COLUMNS,
    NAN,
    OPEN_COLUMNS,
    LevelResult,
    headline,
    summarize_level,
    summarize_open_level,
    to_frame,
    window_end,
)
from pipeline_lib.errors import InputError, SopranoOnnxError

log = logging.getLogger(__name__)


def note(spec: ServerSpec, settings: LoadSettings) -> str:
    base = (f"max_new_tokens fixed at {settings.max_new_tokens} per sentence (random weights never emit [STOP]); "
            f"{len(settings.texts)} texts of 1-2 sentences in turn")
    if spec.name == UPSTREAM:
        return (base + "; upstream soprano.server on the same checkpoint (transformers, CPU), its generate() held "
                "to max_new_tokens; WAV, not streamed")
    return base + f"; {spec.response_format}, stream_format=audio"


def open_note(spec: ServerSpec, settings: OpenLoopSettings) -> str:
    return (f"max_new_tokens fixed at {settings.max_new_tokens} per sentence (random weights never emit [STOP]); "
            f"Poisson arrivals, seed {settings.seed}; a long text ({len(settings.long_indices())} of "
            f"{len(settings.texts)}, several sentences) with probability {settings.long_share:g}; "
            f"{spec.response_format}, stream_format=audio")


def _server_columns(spec: ServerSpec, max_new_tokens: int) -> dict[str, Any]:
    return dict(server=spec.name, backend=spec.backend, precision=spec.precision, threads=spec.threads,
                max_new_tokens=max_new_tokens, response_format=spec.target().response_format,
                max_batch=spec.max_batch if spec.max_batch is not None else NAN,
                max_queue=spec.max_queue if spec.max_queue is not None else NAN)


def bench_server(spec: ServerSpec, settings: LoadSettings | None, geometry: AudioGeometry, log_path: Path,
                 open_settings: OpenLoopSettings | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Start one server, load it at every closed-loop level (`settings`; None: none), then at every
    open-loop rate (`open_settings`; None: none), stop it: (one row of COLUMNS per level, one row of
    OPEN_COLUMNS per rate). The open loop warms up only when no closed loop ran before it."""
    if settings is None and open_settings is None:
        raise InputError("bench_server: neither closed-loop nor open-loop levels to run")
    with server_process(spec, log_path) as target:
        levels = run_levels(target, settings, geometry) if settings is not None else []
        opened = []
        if open_settings is not None:
            warm = open_settings if settings is None else dataclasses.replace(open_settings, warmup_requests=0)
            opened = run_open_levels(target, warm, geometry)
    open_rows = []
    for lv in opened:
        row = {c: NAN for c in OPEN_COLUMNS}
        row.update(_server_columns(spec, open_settings.max_new_tokens), note=open_note(spec, open_settings), **lv)
        open_rows.append(row)
    rows = []
    for lv in levels:
        row: dict[str, Any] = {c: NAN for c in COLUMNS}
        row.update(_server_columns(spec, settings.max_new_tokens), level_s=settings.level_s,
                   note=note(spec, settings), **lv)
        if spec.name != OURS:  # a WAV in one piece: no playback while it arrives
            row.update(stall_p50_ms=NAN, stall_p95_ms=NAN)
        rows.append(row)
    return rows, open_rows


SERVER_NAMES = {OURS: "soprano-onnx serve", UPSTREAM: "upstream soprano.server"}


def plot_serve(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Two panels against concurrent clients, one line per server: aggregate x real time, p95 TTFA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for server, style in ((OURS, "o-"), (UPSTREAM, "s--")):
        rs = sorted((r for r in rows if r["server"] == server), key=lambda r: int(r["clients"]))
        if not rs:
            continue
        c = [int(r["clients"]) for r in rs]
        ax1.plot(c, [float(r["xrt"]) for r in rs], style, label=SERVER_NAMES[server])
        ax2.plot(c, [float(r["ttfa_p95_ms"]) / 1e3 for r in rs], style, label=SERVER_NAMES[server])
    tokens = sorted({int(r["max_new_tokens"]) for r in rows})
    for ax, title, ylabel in ((ax1, "Aggregate x real time (higher is better)", "audio s received / wall s"),
                              (ax2, "p95 time to first audio byte (lower is better)", "seconds")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({int(r["clients"]) for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_yscale("log")
    fig.suptitle(f"Server under load ({', '.join(map(str, tokens))} tokens per sentence, fixed; random weights)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def run_benchmark(specs: Sequence[ServerSpec], settings: LoadSettings | None, geometry: AudioGeometry,
                  log_dir: Path, server_settings: dict[str, LoadSettings] | None = None,
                  open_settings: OpenLoopSettings | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each server in turn (one process at a time): every closed-loop level (`settings`, overridden per
    server name by `server_settings`: upstream's shorter levels; None: no closed loop), and for our
    server every open-loop rate (`open_settings`; None: none). Upstream's server runs one request at a
    time, so it gets no open loop: arrivals would only queue. (closed rows, open rows) in order."""
    rows: list[dict[str, Any]] = []
    open_rows: list[dict[str, Any]] = []
    for spec in specs:
        s = (server_settings or {}).get(spec.name, settings) if settings is not None else None
        o = open_settings if spec.name == OURS else None
        if s is None and o is None:
            continue
        closed, opened = bench_server(spec, s, geometry, Path(log_dir) / f"serve_{spec.name}.log", o)
        rows += closed
        open_rows += opened
    return rows, open_rows


CLOSED_PRINT = ["server", "clients", "requests_ok", "errors", "cut", "xrt", "ttfa_p50_ms", "ttfa_p95_ms",
                "latency_p95_ms", "stall_p95_ms"]
OPEN_PRINT = ["rate_per_s", "offered_streams", "requests_sent", "requests_ok", "rejected_429", "errors", "cut", "xrt",
              "ttfa_p50_ms", "ttfa_p95_ms", "stall_p50_ms", "stall_p95_ms", "smooth_share", "within_capacity"]


def capacity_line(open_rows: Sequence[dict[str, Any]]) -> str:
    """One line for people: our server's capacity from its open-loop rows."""
    return describe(capacity([r for r in open_rows if r["server"] == OURS]))


def main(argv: Sequence[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True,
                   help="our server's model folder (export folder or e.g. artifacts/onnx/int8); also gives the "
                        "sample rate and samples per token")
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory for upstream's server")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=None,
                   help="default: both (closed loop), ours (--mode open: upstream's serial server gets no open loop)")
    p.add_argument("--mode", choices=("closed", "open", "both"), default="closed",
                   help="closed: C concurrent clients per level; open: Poisson arrivals per rate (our server); both")
    p.add_argument("--backend", default="onnx", choices=("onnx", "openvino"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", type=int, nargs="+", default=list(CLIENT_LEVELS))
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    p.add_argument("--max-requests", dest="max_requests", type=int, default=96)
    p.add_argument("--level-s", dest="level_s", type=float, default=12.0)
    p.add_argument("--drain-s", dest="drain_s", type=float, default=8.0)
    p.add_argument("--idle-timeout-s", dest="idle_timeout_s", type=float, default=15.0)
    p.add_argument("--upstream-level-s", dest="upstream_level_s", type=float, default=None)
    p.add_argument("--upstream-drain-s", dest="upstream_drain_s", type=float, default=None)
    rates = p.add_mutually_exclusive_group()
    rates.add_argument("--rates", type=float, nargs="+", default=None,
                       help="open loop: arrival rates, new requests per second")
    rates.add_argument("--streams", type=float, nargs="+", default=None,
                       help="open loop: offered real-time streams; rate = streams / the text mix's mean audio length "
                            f"(default {' '.join(f'{s:g}' for s in OPEN_STREAMS)})")
    p.add_argument("--open-level-s", dest="open_level_s", type=float, default=OpenLoopSettings.level_s,
                   help="open loop: seconds of arrivals per rate")
    p.add_argument("--open-drain-s", dest="open_drain_s", type=float, default=OpenLoopSettings.drain_s)
    p.add_argument("--long-share", dest="long_share", type=float, default=OpenLoopSettings.long_share,
                   help="open loop: probability that a request is a long text (several sentences)")
    p.add_argument("--seed", type=int, default=OpenLoopSettings.seed, help="open loop: the arrival schedule's seed")
    p.add_argument("--warmup-requests", dest="warmup_requests", type=int, default=2)
    p.add_argument("--response-format", dest="response_format", default="pcm", choices=("pcm", "wav"))
    p.add_argument("--max-batch", dest="max_batch", type=int, default=8)
    p.add_argument("--max-queue", dest="max_queue", type=int, default=64)
    p.add_argument("--csv", type=Path, default=None, help="closed-loop rows")
    p.add_argument("--open-csv", dest="open_csv", type=Path, default=None, help="open-loop rows")
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="headline metrics (with the capacity)")
    p.add_argument("--log-dir", dest="log_dir", type=Path, default=None, help="server logs (default: a temp folder)")
    a = p.parse_args(argv)
    closed, opened = a.mode in ("closed", "both"), a.mode in ("open", "both")
    servers = a.servers or ([OURS] if a.mode == "open" else list(SERVERS))
    if a.mode == "open" and OURS not in servers:
        p.error("--mode open loads our server only (upstream's server is serial); use --servers ours")
    if not opened and (a.rates or a.streams or a.open_csv):
        p.error("--rates / --streams / --open-csv need --mode open or both")
    if a.plot and not closed:
        p.error("--plot draws the closed loop: it needs --mode closed or both")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    try:
        geometry = AudioGeometry.from_model_dir(a.model)
        settings = upstream = open_settings = None
        if closed:
            settings = LoadSettings(clients=tuple(a.clients), max_requests=a.max_requests, level_s=a.level_s,
                                    drain_s=a.drain_s, max_new_tokens=a.max_new_tokens,
                                    warmup_requests=a.warmup_requests, idle_timeout_s=a.idle_timeout_s)
            upstream = dataclasses.replace(settings, level_s=a.upstream_level_s or settings.level_s,
                                           drain_s=a.upstream_drain_s if a.upstream_drain_s is not None
                                           else settings.drain_s)
        if opened:
            base = dict(level_s=a.open_level_s, drain_s=a.open_drain_s, long_share=a.long_share, seed=a.seed,
                        max_new_tokens=a.max_new_tokens, warmup_requests=a.warmup_requests,
                        idle_timeout_s=a.idle_timeout_s)
            if a.rates:
                open_settings = OpenLoopSettings(rates=tuple(a.rates), **base)
            else:
                probe = OpenLoopSettings(rates=(1.0,), **base)
                open_settings = dataclasses.replace(
                    probe, rates=rates_for_streams(a.streams or OPEN_STREAMS, probe, geometry))
    except InputError as exc:
        p.error(str(exc))
    specs = []
    if OURS in servers:
        specs.append(ours_spec(a.model, a.threads, a.backend, response_format=a.response_format,
                               max_batch=a.max_batch, max_queue=a.max_queue))
    if UPSTREAM in servers and closed:
        if a.checkpoint is None:
            p.error("--servers upstream needs --checkpoint")
        specs.append(upstream_spec(a.checkpoint, a.threads, a.max_new_tokens))
    try:
        with tempfile.TemporaryDirectory(prefix="soprano-serve-") as tmp:
            rows, open_rows = run_benchmark(specs, settings, geometry, a.log_dir or Path(tmp),
                                            {UPSTREAM: upstream} if upstream else None, open_settings)
    except SopranoOnnxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rows:
        print(to_frame(rows)[CLOSED_PRINT].to_string(index=False))
    if open_rows:
        print(to_frame(open_rows, OPEN_COLUMNS)[OPEN_PRINT].to_string(index=False))
        print(capacity_line(open_rows))
    if a.csv and rows:
        to_frame(rows).to_csv(a.csv, index=False, float_format="%.6g")
    if a.open_csv:
        to_frame(open_rows, OPEN_COLUMNS).to_csv(a.open_csv, index=False, float_format="%.6g")
    if a.plot:
        plot_serve(rows, a.plot)
    if a.json:
        from pipeline_lib.fsutil import write_json

        write_json(a.json, headline(rows, open_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

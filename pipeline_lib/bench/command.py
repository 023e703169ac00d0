"""`soprano-onnx bench`: benchmark one backend configuration (RTF, per-stage times, streaming, memory).

Run each configuration in its own process (the `benchmark` stage does, through pipeline_lib.bench.sweep)
so that memory peaks and thread pools of one configuration do not leak into the next.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pipeline_lib.registry import BACKENDS, BENCH_BACKENDS, PRECISIONS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", required=True, choices=BENCH_BACKENDS,
                   help="onnx / openvino: the runtime on exported files; torch: our torch reference "
                        "(--lm = checkpoint dir); upstream: the soprano-tts package (--lm = checkpoint dir)")
    p.add_argument("--lm", type=Path, help="LM model (folder or file); torch / upstream: the checkpoint directory")
    p.add_argument("--decoder", type=Path, help="decoder model (folder or file); torch: decoder.pth (default: LM/decoder.pth)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="label of the precision (default: the one a path names, e.g. artifacts/onnx/int8, else fp32)")
    p.add_argument("--decoder_backend", "--decoder-backend", choices=BACKENDS, default=None,
                   help="run the decoder on this backend instead of --backend's (a pair such as onnx-int4+openvino-int8)")
    p.add_argument("--decoder_precision", "--decoder-precision", choices=PRECISIONS, default=None,
                   help="label of the decoder's precision where it differs from --precision")
    p.add_argument("--num_threads", "--num-threads", "--threads", dest="threads", type=int, default=None,
                   help="intra-op threads (default: the physical cores this process may use, cgroup quota included)")
    p.add_argument("--num_tokens", "--num-tokens", "--max_new_tokens", "--max-new-tokens", dest="num_tokens",
                   type=int, default=128,
                   help="tokens to generate per synthesis (max_new_tokens; random weights never emit [STOP], "
                        "so this fixes the count). Upstream too: its generate() is held to this count.")
    p.add_argument("--text", default=None, help="text to synthesise (default: one sentence)")
    p.add_argument("--repeats", type=int, default=3, help="timed syntheses after one warm-up (medians are reported)")
    p.add_argument("--warmup_tokens", "--warmup-tokens", dest="warmup_tokens", type=int, default=16)
    p.add_argument("--batch", dest="batch_size", type=int, default=8,
                   help="sentences in the batch measurement (infer_batch); 0 turns it off")
    p.add_argument("--no_stream", "--no-stream", dest="stream", action="store_false",
                   help="skip the streaming first-chunk measurement")
    p.add_argument("--json", type=Path, default=None, help="write the result row here as JSON")


def _precision(args: argparse.Namespace) -> str:
    if args.precision:
        return args.precision
    parts = [part.lower() for p in (args.lm, args.decoder) if p is not None for part in Path(p).parts]
    return next((p for p in PRECISIONS if p != "fp32" and any(p in part for part in parts)), "fp32")


def _fmt(v: object, unit: str = "", digits: int = 3) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def format_row(row: dict) -> str:
    lines = [
        f"{row['config']}: {row['note']}",
        f"  load           {_fmt(row['load_s'], ' s')}",
        f"  prefill        {_fmt(row['prefill_s'] * 1e3, ' ms', 1)}",
        f"  per token      median {_fmt(row['per_token_median_ms'], ' ms', 2)}, p90 {_fmt(row['per_token_p90_ms'], ' ms', 2)}",
        f"  LM total       {_fmt(row['lm_s'], ' s')}",
        f"  decoder        {_fmt(row['decoder_s'] * 1e3, ' ms', 1)}",
        f"  ISTFT          {_fmt(row['istft_s'] * 1e3, ' ms', 1)}",
        f"  audio          {_fmt(row['audio_s'], ' s')} ({row['num_tokens']} tokens)",
        f"  wall           {_fmt(row['wall_s'], ' s')}",
        f"  RTF            {_fmt(row['rtf'])} (wall / audio; < 1 is faster than real time)",
        f"  x real time    {_fmt(row['xrt'], 'x', 2)}",
        f"  first chunk    {_fmt(row['first_chunk_ms'], ' ms', 1)} (streaming, chunk_size=1)",
        f"  batch of {row['batch_size']}     {_fmt(row['batch8_xrt'], 'x real time', 2)}",
        f"  peak RSS       {_fmt(row['peak_rss_mb'], ' MiB', 0)}",
        f"  load average   {_fmt(row['load_avg'], '', 2)} at the start (above the thread count: a busy machine, noisy timings)",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import logging

    from pipeline_lib.bench.config import DEFAULT_TEXT, BenchConfig
    from pipeline_lib.bench.measure import measure
    from pipeline_lib.cpuinfo import default_threads
    from pipeline_lib.fsutil import check_output_file, write_json

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.json is not None:
        check_output_file(args.json, "--json")  # before the benchmark, whose result would be lost
    cfg = BenchConfig(
        backend=args.backend,
        lm=args.lm,
        decoder=args.decoder,
        precision=_precision(args),
        threads=args.threads if args.threads is not None else default_threads(),
        num_tokens=args.num_tokens,
        text=args.text or DEFAULT_TEXT,
        repeats=args.repeats,
        warmup_tokens=args.warmup_tokens,
        stream=args.stream,
        batch_size=args.batch_size,
        decoder_backend=args.decoder_backend,
        decoder_precision=args.decoder_precision,
    )
    row = measure(cfg)
    print(format_row(row))
    if args.json:
        # JSON has no NaN: unmeasured figures are null.
        write_json(args.json, {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
        print(f"wrote {args.json}")
    return 0

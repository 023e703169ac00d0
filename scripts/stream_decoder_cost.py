"""Decoder work of the server's streaming windows against one non-streamed decode, per sentence length.

The batching scheduler (pipeline_lib.runtime.scheduler) decodes each row's audio in lossless
windows: the first after `first_chunk` tokens (plus the stream context), later ones `chunk_growth`
times larger up to `max_chunk`. Each window decodes its context again, so streaming costs more
decoder time than one decode of the whole sentence. This script times both on the same hidden
states, alternating, and prints the medians and their ratio per length (target: at most 1.25).

    python scripts/stream_decoder_cost.py --model artifacts/onnx/int8 --threads 2 --lengths 64 128 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def windows(n: int, ctx: int, first: int, growth: int, cap: int) -> list[tuple[int, int, int]]:
    """(start, end, last) of each window for a sentence of n hidden vectors, as the scheduler cuts them."""
    out, emitted, chunk, have = [], 0, first, 0
    for have in range(1, n + 1):
        while have - 1 - ctx - emitted >= chunk:
            out.append((emitted, emitted + chunk, emitted + chunk + ctx))
            emitted += chunk
            chunk = min(cap, chunk * growth)
    if n - 1 > emitted:
        out.append((emitted, n - 1, n - 1))
    return out


def main() -> None:
    from pipeline_lib.runtime.scheduler import BatchScheduler
    from pipeline_lib.runtime.tts import SopranoTTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", default="onnx_cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--first-chunk", type=int, default=None, help="default: the scheduler's")
    ap.add_argument("--chunk-growth", type=int, default=None, help="default: the scheduler's")
    ap.add_argument("--max-chunk", type=int, default=None, help="default: the scheduler's")
    args = ap.parse_args()
    tts = SopranoTTS.from_dir(args.model, backend=args.backend, num_threads=args.threads, stateful=False)
    policy = {k: v for k, v in (("first_chunk", args.first_chunk), ("chunk_growth", args.chunk_growth),
                                ("max_chunk", args.max_chunk)) if v is not None}
    sched = BatchScheduler(tts, **policy)  # the scheduler's window policy, or the one given
    ctx = tts.stream_context
    rng = np.random.default_rng(0)
    print(f"model {args.model} ({args.backend}, {args.threads} threads); windows: first {sched.first_chunk}, "
          f"growth x{sched.chunk_growth}, at most {sched.max_chunk} tokens; stream context {ctx}")
    print("tokens | windows | full decode ms | streamed ms | streamed / full")
    for n in args.lengths:
        hidden = rng.standard_normal((1, n, tts.spec.hidden_size), dtype=np.float32)
        plan = windows(n, ctx, sched.first_chunk, sched.chunk_growth, sched.max_chunk)
        full, streamed = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            tts._decode(hidden)
            full.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for start, _end, last in plan:
                a = max(0, start - ctx)
                tts._decode(hidden[:, a:last + 1])
            streamed.append(time.perf_counter() - t0)
        f, s = statistics.median(full), statistics.median(streamed)
        print(f"{n} | {len(plan)} | {f * 1e3:.1f} | {s * 1e3:.1f} | {s / f:.3f}")


if __name__ == "__main__":
    main()

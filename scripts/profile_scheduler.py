"""Where the server's worker spends its time under load: the scheduler in-process, no HTTP.

    python scripts/profile_scheduler.py --model artifacts/onnx/int8 [--threads 2] [--clients 1 8] \
        [--seconds 12] [--max-new-tokens 64] [--rounds 2] \
        [--variant NAME:KEY=VALUE,...]...

C client threads in a closed loop (the load benchmark's texts in turn, `--max-new-tokens` per
sentence: random weights never emit [STOP]) submit to one `BatchScheduler` over one `SopranoTTS`, the
server's own objects. Per level: aggregate x real time (audio seconds made per wall second, from the
first submit to the last job's end), p50 / p95 time to first audio, and the worker thread's wall time
split into the LM decode step (by rows in the batch), prefill, the decoder's windows (count and mean
tokens per window), sampling and the rest (Python bookkeeping, waiting); the listeners' playback
stalls (`SpeechJob.stall_s`: time a listener playing from the first chunk on would have waited for
audio, p50 / p95 over jobs) and the decoder's tokens per token of audio (1.0 = non-streamed). Each
`--variant` (A/B runs) is a set of BatchScheduler keyword values (true / false, ints, floats or
strings), e.g. `--variant before:min_window=64,lane=false --variant now`. Levels and variants alternate over
`--rounds` rounds; figures are medians over rounds, with [min-max]. Random weights: the audio is
noise; the timings are valid.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class Timers:
    """Seconds and calls per phase, from the worker thread only."""

    def __init__(self) -> None:
        self.s: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)
        self.tokens: dict[str, int] = defaultdict(int)

    def wrap(self, obj: Any, name: str, phase: str, tokens: Any = None) -> None:
        fn = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.s[phase] += time.perf_counter() - t0
                self.n[phase] += 1
                if tokens is not None:
                    self.tokens[phase] += tokens(*args, **kwargs)

        setattr(obj, name, timed)


def run_level(tts: Any, clients: int, seconds: float, max_new_tokens: int, max_batch: int,
              **scheduler: Any) -> dict[str, Any]:
    from pipeline_lib.bench.serve_load import TEXTS
    from pipeline_lib.runtime.scheduler import BatchScheduler, SpeechRequest

    sched = BatchScheduler(tts, max_batch=max_batch, max_queue=64, **scheduler)
    timers = Timers()
    timers.wrap(sched, "_prefill", "prefill")
    timers.wrap(sched, "_sample", "sample")
    timers.wrap(tts, "_decode", "decoder", tokens=lambda hidden: hidden.shape[1])
    step_by_rows: dict[int, list[float]] = defaultdict(list)
    orig_iteration = sched._iteration

    # The decode step: lm.run with the batch's rows, timed inside the iteration (prefill calls
    # lm.run too, with a longer input: told apart by input length).
    wrapped: list[Any] = []  # the worker's lm context, once its run is timed

    def iteration(lm: Any) -> None:
        if lm not in wrapped:
            run = lm.run

            def timed_run(feed: dict[str, np.ndarray]) -> Any:
                t0 = time.perf_counter()
                out = run(feed)
                if feed["input_ids"].shape[1] == 1:
                    step_by_rows[feed["input_ids"].shape[0]].append(time.perf_counter() - t0)
                return out

            lm.run = timed_run
            wrapped.append(lm)
        orig_iteration(lm)

    sched._iteration = iteration  # type: ignore[method-assign]
    worker_cpu: list[float] = []
    orig_work = sched._work

    def work() -> None:
        c0 = time.thread_time()
        try:
            orig_work()
        finally:
            worker_cpu.append(time.thread_time() - c0)

    sched._work = work  # type: ignore[method-assign]
    sched.start()
    jobs: list[Any] = []
    lock = threading.Lock()
    t_start = time.perf_counter()
    deadline = t_start + seconds

    def client(k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            job = sched.submit(SpeechRequest(TEXTS[i % len(TEXTS)], max_new_tokens=max_new_tokens))
            job.audio()
            with lock:
                jobs.append(job)
            i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        sched.close(drain=True)
    finally:  # the next level wraps the shared tts afresh, not on top of this level's timer
        del tts._decode
    audio_s = sum(j.samples for j in jobs) / tts.sample_rate
    ttfa = [j.first_audio_at - j.submitted_at for j in jobs]
    stalls = [j.stall_s for j in jobs]
    steps = sum(len(v) for v in step_by_rows.values())
    step_s = sum(sum(v) for v in step_by_rows.values())
    rows_mean = sum(k * len(v) for k, v in step_by_rows.items()) / max(1, steps)
    return {
        "clients": clients, "jobs": len(jobs), "wall_s": wall, "xrt": audio_s / wall,
        "ttfa_p50_ms": 1e3 * float(np.percentile(ttfa, 50)), "ttfa_p95_ms": 1e3 * float(np.percentile(ttfa, 95)),
        "step_s": step_s, "steps": steps, "rows_mean": rows_mean,
        "step_ms_by_rows": {k: 1e3 * statistics.median(v) for k, v in sorted(step_by_rows.items())},
        "prefill_s": timers.s["prefill"], "prefills": timers.n["prefill"],
        "decoder_s": timers.s["decoder"], "windows": timers.n["decoder"],
        "window_tokens_mean": timers.tokens["decoder"] / max(1, timers.n["decoder"]),
        "sample_s": timers.s["sample"], "worker_cpu_s": worker_cpu[0] if worker_cpu else float("nan"),
        "lane_steps": sched.lane_steps,
        "stall_p50_ms": 1e3 * float(np.percentile(stalls, 50)), "stall_p95_ms": 1e3 * float(np.percentile(stalls, 95)),
        "decode_ratio": timers.tokens["decoder"] / max(1.0, sum(j.samples for j in jobs) / tts.samples_per_token),
    }


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """'NAME:KEY=VALUE,...' (or just 'NAME') -> (NAME, {KEY: bool (true / false) | int | float | str})."""
    name, _, rest = text.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"--variant {text!r}: expected NAME:KEY=VALUE,KEY=VALUE")
        if value.lower() in ("true", "false"):
            kwargs[key] = value.lower() == "true"
            continue
        for cast in (int, float, str):
            try:
                kwargs[key] = cast(value)
                break
            except ValueError:
                continue
    return name, kwargs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--backend", default="onnx")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variant", action="append", default=None, metavar="NAME:KEY=VALUE,...",
                   help="BatchScheduler keyword values to A/B (repeatable; default: one variant, the defaults)")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or ["default"])]

    from pipeline_lib.runtime.tts import SopranoTTS

    # as the server loads it (server.app): the step LM that takes the cache as inputs
    tts = SopranoTTS.from_dir(args.model, backend=args.backend, num_threads=args.threads, stateful=False,
                              static_decode_width=None)
    print(f"{args.model} ({args.backend}, {args.threads} threads), {args.max_new_tokens} tokens per sentence, "
          f"random weights: noise audio, valid timings", flush=True)
    results: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for rnd in range(args.rounds):
        for c in args.clients:
            for name, kwargs in variants:
                r = run_level(tts, c, args.seconds, args.max_new_tokens, args.max_batch, **kwargs)
                results[name, c].append(r)
                w = r["wall_s"]
                rest = w - r["step_s"] - r["prefill_s"] - r["decoder_s"] - r["sample_s"]
                print(f"round {rnd + 1} {name} clients {c:2d}: xRT {r['xrt']:.2f}, TTFA p50 {r['ttfa_p50_ms']:.0f} / p95 "
                      f"{r['ttfa_p95_ms']:.0f} ms, {r['jobs']} jobs; of {w:.1f} s wall: step {r['step_s']:.1f} s "
                      f"({r['steps']} steps, {r['rows_mean']:.1f} rows mean), prefill {r['prefill_s']:.1f} s "
                      f"({r['prefills']}), decoder {r['decoder_s']:.1f} s ({r['windows']} windows, "
                      f"{r['window_tokens_mean']:.1f} tokens mean), sample {r['sample_s']:.2f} s, rest {rest:.1f} s; "
                      f"worker CPU {r['worker_cpu_s']:.1f} s; stalls p50 {r['stall_p50_ms']:.0f} / p95 "
                      f"{r['stall_p95_ms']:.0f} ms; decoder tokens per audio token {r['decode_ratio']:.2f}; "
                      f"{r['lane_steps']} lane steps", flush=True)
                print("    step ms by rows: " + ", ".join(f"{k}: {v:.1f}" for k, v in r["step_ms_by_rows"].items()), flush=True)

    def med(name: str, c: int, key: str) -> str:
        vals = [r[key] for r in results[name, c]]
        return f"{statistics.median(vals):.2f} [{min(vals):.2f}-{max(vals):.2f}]"

    print("\nmedians over rounds [min-max]:")
    for name, _ in variants:
        for c in args.clients:
            print(f"{name} clients {c:2d}: xRT {med(name, c, 'xrt')}, TTFA p50 {med(name, c, 'ttfa_p50_ms')} ms, "
                  f"p95 {med(name, c, 'ttfa_p95_ms')} ms, stalls p50 {med(name, c, 'stall_p50_ms')} ms, "
                  f"p95 {med(name, c, 'stall_p95_ms')} ms, decoder tokens per audio token {med(name, c, 'decode_ratio')}")
        if len(args.clients) > 1:
            lo, hi = min(args.clients), max(args.clients)
            ratios = [b["xrt"] / a["xrt"] for a, b in zip(results[name, lo], results[name, hi])]
            p95 = [b["ttfa_p95_ms"] / a["ttfa_p95_ms"] for a, b in zip(results[name, lo], results[name, hi])]
            print(f"{name}: {hi} clients over {lo}: xRT ratio {statistics.median(ratios):.2f}, "
                  f"p95 TTFA ratio {statistics.median(p95):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

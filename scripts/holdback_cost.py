"""What the hallucination guard's holdback costs in time to first audio, by hand (docs/design.md, "The
hallucination guard in one generation core"): for each mode (guard off; guard on with --holdback clean;
with --holdback sentence) a fresh `soprano-onnx serve` process (pipeline_lib.bench.serve_load's), loaded
by serve_load's closed loop at 1 and 8 clients, 64 tokens per sentence, pcm; modes alternate per round.
One JSON line per (round, mode, level) on stdout.

    PYTHONPATH=. python scripts/holdback_cost.py [--rounds 2] [--model artifacts/onnx/int8] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from pipeline_lib.bench import serve_load as sl

MODES = {"off": (), "clean": ("--hallucination-guard", "--hallucination-retries", "1", "--holdback", "clean"),
         "sentence": ("--hallucination-guard", "--hallucination-retries", "1", "--holdback", "sentence")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", type=Path, default=Path("artifacts/onnx/int8"))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    settings = sl.LoadSettings(clients=(1, 8), max_requests=96, level_s=12.0, drain_s=8.0, max_new_tokens=64)
    geometry = sl.AudioGeometry.from_model_dir(a.model)
    order = list(MODES)
    for rnd in range(a.rounds):
        for mode in (order if rnd % 2 == 0 else order[::-1]):
            spec = sl.ours_spec(a.model, a.threads, "onnx", response_format="pcm", max_batch=16, max_queue=64)
            spec = dataclasses.replace(spec, argv=spec.argv + MODES[mode])
            with tempfile.TemporaryDirectory() as tmp:
                rows = sl.bench_server(spec, settings, geometry, Path(tmp) / "log.txt")
            for r in rows:
                print(json.dumps({"round": rnd, "mode": mode, "clients": r["clients"], "ok": r["requests_ok"],
                                  "errors": r["errors"], "xrt": r["xrt"], "ttfa_p50_ms": r["ttfa_p50_ms"],
                                  "ttfa_p95_ms": r["ttfa_p95_ms"], "stall_p95_ms": r.get("stall_p95_ms"),
                                  "at": time.strftime("%H:%M:%S")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LM decode step of our ONNX Runtime LM folders against ONNX Runtime GenAI builder models, each in a fresh
process, in alternating rounds (the issue-24 method).

    python scripts/lm_peer_step.py --ours int4=artifacts/onnx/int4/lm --genai int4=/tmp/genai-int4 \
        [--threads 2] [--prompt 24] [--steps 200] [--rounds 6]

`--ours LABEL=FOLDER`: a folder with soprano_lm_step.onnx and its config JSON (a convert target's lm/ or
the export); timed by the runtime's own loop (pipeline_lib.runtime.generate: greedy, repetition penalty
1.2, the KV cache handling), one row. `--genai LABEL=FOLDER`: a model folder written by
`python -m onnxruntime_genai.models.builder` (genai_config.json), timed by its Generator loop (greedy; the
stop token is held off by min_length so that every engine runs the same number of steps); both as
pipeline_lib.bench.peer times them (the peer stage: ours against one GenAI model). Each child warms up
with 20 steps, then times `steps` decode steps after a `prompt`-token prompt and prints the mean
ms per step. Prints each engine's median and range over the rounds and, per round, each engine's time
over the first --ours engine's (the medians of those ratios).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from pipeline_lib.bench.peer import STEP_FUNCTIONS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", action="append", default=[], metavar="LABEL=FOLDER")
    ap.add_argument("--genai", action="append", default=[], metavar="LABEL=FOLDER")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=24)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, folder = args.child
        ms, n = STEP_FUNCTIONS[kind](Path(folder), args.threads, args.prompt, args.steps)
        print(json.dumps({"ms": ms, "steps": n}))
        return
    engines = [(f"ours {s.split('=', 1)[0]}", "ours", s.split("=", 1)[1]) for s in args.ours]
    engines += [(f"genai {s.split('=', 1)[0]}", "genai", s.split("=", 1)[1]) for s in args.genai]
    for label, _, folder in engines:
        if not Path(folder).is_dir():
            sys.exit(f"error: {label}: {folder} is not a folder")
    ms: dict[str, list[float]] = {e[0]: [] for e in engines}
    steps: dict[str, int] = {}
    for r in range(args.rounds):
        for label, kind, folder in (engines if r % 2 == 0 else engines[::-1]):
            argv = [sys.executable, __file__, "--threads", str(args.threads), "--prompt", str(args.prompt),
                    "--steps", str(args.steps), "--child", kind, folder]
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"error: {label} failed:\n{proc.stderr[-2000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            ms[label].append(res["ms"])
            steps[label] = res["steps"]
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in ms.items()), flush=True)
    base = engines[0][0]
    print(f"\nthreads {args.threads}, batch 1, prompt {args.prompt}, {args.rounds} rounds, a process per engine "
          f"and round (ms per decode step; ratios within a round to {base}, medians)")
    for label, v in ms.items():
        ratio = statistics.median(a / b for a, b in zip(v, ms[base]))
        print(f"  {label:28s} median {statistics.median(v):.2f}  range {min(v):.2f}-{max(v):.2f}  "
              f"ratio {ratio:.3f}  steps timed {steps[label]}")


if __name__ == "__main__":
    main()

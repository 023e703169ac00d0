"""LM decode-step latency of the runtime's generation loop, ONNX Runtime against OpenVINO, fp32 and
int8, interleaved so that all see the same machine state.

    python scripts/lm_step_latency.py [--threads 2] [--batch 1] [--steps 200] [--rounds 6] [--isolated]

Two ways to interleave:
- default, one process: all four models are loaded first, then each round runs every one of them
  once (in alternating order, 0.1 s apart so that no model's idle threads still spin);
- `--isolated`: each round runs every model in a fresh process of its own (alternating order), as
  the benchmark does. Two runtimes' thread pools in one process can get in each other's way: here,
  at 2 threads, ONNX Runtime int8 measured ~6.9 ms per step beside OpenVINO and ~5.7 ms alone.

Prints, per backend and precision, the mean decode step of each round (the loop's own timing:
sampling, cache handling and the forward; `steps` greedy steps after a `prompt`-token prompt per
row, after a 20-step warm-up), their median and minimum, int8 over fp32 per backend, and OpenVINO
against ONNX Runtime per precision (medians; "faster in k of n" counts the rounds). Every backend and
precision of pipeline_lib.registry; OpenVINO runs the stateful LM (the runtime's choice); --plain adds
its plain IR of the ONNX step model. Needs `dvc repro` (artifacts/<backend>/<precision>/lm).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline_lib import registry

ROOT = Path(__file__).resolve().parents[1]


def targets(plain: bool) -> dict[str, tuple[str, str]]:
    """label -> (backend, LM file stem): every registry backend with the LM the runtime picks (the stateful
    one where the backend has it); --plain adds OpenVINO's IR of the ONNX step model."""
    out = {b: (b, registry.STATEFUL_FILE if registry.backend(b).stateful_lm else registry.LM_FILE)
           for b in registry.BACKENDS}
    if plain:
        out["openvino-plain"] = ("openvino", registry.LM_FILE)
    return out


def load(target: tuple[str, str], precision: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """The LM backend and its spec, warmed up."""
    from pipeline_lib.runtime.backends import load_backends
    from pipeline_lib.runtime.generate import LMSpec

    name, stem = target
    backend = registry.backend(name)
    folder = ROOT / registry.target(name, precision).folder
    lm_path = folder / registry.LM_DIR / f"{stem}{backend.suffix}"
    if not lm_path.is_file():
        sys.exit(f"{lm_path} is missing: run `dvc repro` first")
    spec = LMSpec.from_json(lm_path.with_name(lm_path.stem + registry.LM_CONFIG_SUFFIX))
    decoder = folder / registry.DECODER_DIR / f"{registry.DECODER_FILE}{backend.suffix}"
    lm, _ = load_backends(backend.runtime, lm_path, decoder, args.threads)
    step_ms(lm, spec, args, steps=20)  # warm-up
    return lm, spec


def step_ms(lm: Any, spec: Any, args: argparse.Namespace, steps: int | None = None) -> float:
    """Mean decode step (ms) of one greedy generation."""
    from pipeline_lib.runtime.generate import generate
    from pipeline_lib.runtime.sampling import SamplingParams

    prompts = [[5 + (i + j) % 50 for j in range(args.prompt + i)] for i in range(args.batch)]
    out = generate(lm, spec, prompts, max_new_tokens=steps or args.steps, params=SamplingParams(0.0, 1.0, 0, 1.2))
    return 1e3 * out.timings.per_step_s


def child_argv(args: argparse.Namespace, label: str, precision: str) -> list[str]:
    return [sys.executable, __file__, "--threads", str(args.threads), "--batch", str(args.batch), "--steps",
            str(args.steps), "--prompt", str(args.prompt), "--child", label, precision]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompt", type=int, default=30, help="prompt tokens of the first row (row i has prompt + i)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--plain", action="store_true", help="also OpenVINO's plain IR (explicit cache, static decode width)")
    ap.add_argument("--isolated", action="store_true", help="each model in a fresh process every round")
    ap.add_argument("--child", nargs=2, metavar=("LABEL", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    labels = targets(args.plain)
    if args.child:  # --isolated: one model, one measurement, printed as JSON
        label, precision = args.child
        lm, spec = load(labels[label], precision, args)
        print(json.dumps({"ms": step_ms(lm, spec, args)}))
        return
    # Registered targets only (no onnx-bf16); bf16 only where the CPU has it (else the runtime refuses it).
    from pipeline_lib.cpuinfo import missing_bf16

    keys = [(label, p) for label in labels for p in registry.PRECISIONS if (labels[label][0], p) in registry.TARGETS
            and not (registry.precision(p).inference == "bf16" and missing_bf16())]
    runs = {} if args.isolated else {k: load(labels[k[0]], k[1], args) for k in keys}
    ms: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    for r in range(args.rounds):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            if args.isolated:
                proc = subprocess.run(child_argv(args, *key), capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{key[0]} {key[1]} failed:\n{proc.stderr[-2000:]}")
                ms[key].append(json.loads(proc.stdout.strip().splitlines()[-1])["ms"])
            else:
                time.sleep(0.1)  # let the previous model's worker threads stop spinning (ONNX Runtime's do)
                ms[key].append(step_ms(*runs[key], args))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{b} {p} {v[-1]:.2f}" for (b, p), v in ms.items()), flush=True)
    med = {k: statistics.median(v) for k, v in ms.items()}
    how = "a process per model and round" if args.isolated else "one process"
    print(f"\nthreads {args.threads}, batch {args.batch}, {args.steps} steps, {args.rounds} rounds, {how} (ms per decode step)")
    for (b, p), v in ms.items():
        print(f"  {b:9s} {p}: median {med[(b, p)]:.2f}, min {min(v):.2f}  [{' '.join(f'{x:.2f}' for x in v)}]")
    for b in labels:
        for p in registry.PRECISIONS[1:]:
            if (b, p) not in med or (b, "fp32") not in med:
                continue
            print(f"  {b} {p} over fp32: {med[(b, 'fp32')] / med[(b, p)]:.2f}x")
    for p in registry.PRECISIONS:
        if ("openvino", p) not in ms or ("onnx", p) not in ms:
            continue
        ov, ort = ms[("openvino", p)], ms[("onnx", p)]
        wins = sum(a < b for a, b in zip(ov, ort))
        print(f"  {p}: OpenVINO / ONNX Runtime {med[('openvino', p)] / med[('onnx', p)]:.3f} (median), "
              f"OpenVINO faster in {wins} of {len(ov)} rounds")


if __name__ == "__main__":
    main()

"""LM decode-step latency of the runtime's generation loop, ONNX Runtime against OpenVINO, fp32 and
int8, in one process, interleaved: all four are loaded first, then each round runs every one of
them once (in alternating order, 0.1 s apart so that no model's idle threads still spin), so that
all see the same machine state.

    python scripts/lm_step_latency.py [--threads 2] [--batch 1] [--steps 200] [--rounds 6]

Prints, per backend and precision, the mean decode step of each round (the loop's own timing:
sampling, cache handling and the forward; `steps` greedy steps after a `prompt`-token prompt per
row), their median and minimum, int8 over fp32 per backend, and OpenVINO against ONNX Runtime per
precision (medians; "faster in k of n" counts the rounds). OpenVINO runs
the stateful LM (the runtime's choice); --plain adds its plain IR of the ONNX step model. Needs `dvc repro`
(artifacts/{onnx,openvino}/{fp32,int8}/lm).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from pipeline_lib.runtime.backends import load_backends
from pipeline_lib.runtime.generate import LMSpec, generate
from pipeline_lib.runtime.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1] / "artifacts"
# (label, runtime backend, artifacts folder, LM file); OpenVINO: the stateful LM, the runtime's choice.
TARGETS = [("onnx", "onnx_cpu", "onnx", "soprano_lm_step.onnx"),
           ("openvino", "openvino_cpu", "openvino", "soprano_lm_stateful.xml")]
PLAIN = ("openvino-plain", "openvino_cpu", "openvino", "soprano_lm_step.xml")  # --plain: the IR of the ONNX step model
PRECISIONS = ("fp32", "int8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompt", type=int, default=30, help="prompt tokens of the first row (row i has prompt + i)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--plain", action="store_true", help="also OpenVINO's plain IR (explicit cache, static decode width)")
    args = ap.parse_args()
    params = SamplingParams(0.0, 1.0, 0, 1.2)
    prompts = [[5 + (i + j) % 50 for j in range(args.prompt + i)] for i in range(args.batch)]
    runs = {}
    for label, backend, folder, lm_file in TARGETS + ([PLAIN] if args.plain else []):
        for precision in PRECISIONS:
            lm_path = ROOT / folder / precision / "lm" / lm_file
            spec = LMSpec.from_json(lm_path.with_name(lm_path.stem + "_config.json"))
            ext = lm_path.suffix
            lm, _ = load_backends(backend, lm_path, ROOT / folder / precision / "decoder" / f"soprano_decoder_preistft{ext}",
                                  args.threads)
            generate(lm, spec, prompts, max_new_tokens=20, params=params)  # warm-up
            runs[(label, precision)] = (lm, spec)
    ms: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    for r in range(args.rounds):
        for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            lm, spec = runs[key]
            time.sleep(0.1)  # let the previous model's worker threads stop spinning (ONNX Runtime's do)
            out = generate(lm, spec, prompts, max_new_tokens=args.steps, params=params)
            ms[key].append(1e3 * out.timings.per_step_s)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{b} {p} {v[-1]:.2f}" for (b, p), v in ms.items()), flush=True)
    med = {k: statistics.median(v) for k, v in ms.items()}
    print(f"\nthreads {args.threads}, batch {args.batch}, {args.steps} steps, {args.rounds} rounds (ms per decode step)")
    for (b, p), v in ms.items():
        print(f"  {b:9s} {p}: median {med[(b, p)]:.2f}, min {min(v):.2f}  [{' '.join(f'{x:.2f}' for x in v)}]")
    for b in sorted({b for b, _ in runs}):
        print(f"  {b} int8 over fp32: {med[(b, 'fp32')] / med[(b, 'int8')]:.2f}x")
    for p in PRECISIONS:
        ov, ort = ms[("openvino", p)], ms[("onnx", p)]
        wins = sum(a < b for a, b in zip(ov, ort))
        print(f"  {p}: OpenVINO / ONNX Runtime {med[('openvino', p)] / med[('onnx', p)]:.3f} (median), "
              f"OpenVINO faster in {wins} of {len(ov)} rounds")


if __name__ == "__main__":
    main()

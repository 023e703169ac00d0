"""LM decode-step latency of the runtime's generation loop, ONNX Runtime against OpenVINO, fp32 and
int8, in one process (same machine state for all four), on the pipeline's artifacts.

    python scripts/lm_step_latency.py [--threads 2] [--batch 1] [--steps 200] [--rounds 2]

Prints, per backend and precision, the mean decode step (the loop's own timing: sampling, cache
handling and the forward) over `steps` greedy steps after a `prompt`-token prompt per row, best of
`rounds`. Needs `dvc repro` (artifacts/{onnx,openvino}/{fp32,int8}/lm).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline_lib.runtime.backends import load_backends
from pipeline_lib.runtime.generate import LMSpec, generate
from pipeline_lib.runtime.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1] / "artifacts"
TARGETS = [("onnx_cpu", "onnx", ".onnx"), ("openvino_cpu", "openvino", ".xml")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompt", type=int, default=30, help="prompt tokens of the first row (row i has prompt + i)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    params = SamplingParams(0.0, 1.0, 0, 1.2)
    prompts = [[5 + (i + j) % 50 for j in range(args.prompt + i)] for i in range(args.batch)]
    for backend, folder, ext in TARGETS:
        for precision in ("fp32", "int8"):
            root = ROOT / folder / precision
            spec = LMSpec.from_json(root / "lm" / "soprano_lm_step_config.json")
            lm, _ = load_backends(backend, root / "lm" / f"soprano_lm_step{ext}",
                                  root / "decoder" / f"soprano_decoder_preistft{ext}", args.threads)
            generate(lm, spec, prompts, max_new_tokens=20, params=params)  # warm-up
            best = min(
                generate(lm, spec, prompts, max_new_tokens=args.steps, params=params).timings.per_step_s
                for _ in range(args.rounds)
            )
            print(f"{backend:13s} {precision}  threads {args.threads}  batch {args.batch}: "
                  f"{1e3 * best:.2f} ms per decode step", flush=True)


if __name__ == "__main__":
    main()

"""Probe: OpenVINO's LM step as a *stateful* model (the KV cache kept in OpenVINO state by
`apply_make_stateful_transformation`, past_* -> present_*) against ONNX Runtime, per decode step.

The runtime does not use the stateful form: with shared input tensors and a bucketed cache
(pipeline_lib/runtime/generate.py) the plain IR is as fast, and it keeps one LM interface for both
backends. This script is the measurement behind that choice.

    python scripts/probe_ov_stateful.py [--precision fp32|int8] [--threads 2] [--steps 150]

Needs the pipeline's artifacts (`dvc repro`): artifacts/openvino/<p>/lm and artifacts/onnx/<p>/lm.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pipeline_lib.convert import compile_openvino, import_openvino
from pipeline_lib.runtime.backends import OrtLM
from pipeline_lib.runtime.generate import LMSpec

ROOT = Path(__file__).resolve().parents[1] / "artifacts"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--prompt", type=int, default=30, help="prompt tokens before the decode steps")
    args = ap.parse_args()
    ov = import_openvino()
    from openvino._offline_transformations import apply_make_stateful_transformation

    spec = LMSpec.from_json(ROOT / "onnx" / args.precision / "lm" / "soprano_lm_step_config.json")
    model = ov.Core().read_model(str(ROOT / "openvino" / args.precision / "lm" / "soprano_lm_step.xml"))
    apply_make_stateful_transformation(model, dict(zip(spec.past_names, spec.present_names)))
    request = compile_openvino(model, args.threads).create_infer_request()
    ort_lm = OrtLM(ROOT / "onnx" / args.precision / "lm" / "soprano_lm_step.onnx", args.threads)
    kv = (1, spec.num_kv_heads, 0, spec.head_dim)
    p0 = args.prompt

    def prompt_feed() -> dict[str, np.ndarray]:
        return {"input_ids": np.full((1, p0), 5, np.int64), "attention_mask": np.ones((1, p0), np.int64),
                "position_ids": np.arange(p0, dtype=np.int64)[None]}

    def step_feed(p: int) -> dict[str, np.ndarray]:
        return {"input_ids": np.full((1, 1), 7, np.int64), "attention_mask": np.ones((1, p + 1), np.int64),
                "position_ids": np.full((1, 1), p, np.int64)}

    def stateful() -> float:
        request.reset_state()
        for state in request.query_state():
            state.state = ov.Tensor(np.zeros(kv, np.float32))
        request.infer(prompt_feed(), share_inputs=True, share_outputs=True)
        times = []
        for s in range(args.steps):
            t = time.perf_counter()
            res = request.infer(step_feed(p0 + s), share_inputs=True, share_outputs=True)
            np.array(res["logits"]), np.array(res["hidden_states"])
            times.append(time.perf_counter() - t)
        return 1e3 * float(np.median(times))

    def onnxruntime() -> float:
        feed = prompt_feed()
        feed.update((n, np.zeros(kv, np.float32)) for n in spec.past_names)
        out = ort_lm.run(feed)
        times = []
        for s in range(args.steps):
            feed = step_feed(p0 + s)
            feed.update(zip(spec.past_names, (out[n] for n in spec.present_names)))
            t = time.perf_counter()
            out = ort_lm.run(feed)
            times.append(time.perf_counter() - t)
        return 1e3 * float(np.median(times))

    for rep in range(3):
        print(f"{args.precision}, {args.threads} threads, round {rep + 1}: OpenVINO stateful {stateful():.2f} ms/step, "
              f"ONNX Runtime {onnxruntime():.2f} ms/step (median of {args.steps} steps)", flush=True)


if __name__ == "__main__":
    main()

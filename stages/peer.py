"""Stage peer: CHECKPOINT_DIR LM_DIR METRICS_JSON -> ours against ONNX Runtime GenAI's builder, LM step.

Builds GenAI's int4 model of the checkpoint (pipeline_lib.bench.peer.build_genai; block bench.peer.block_size,
hidden states as an output) in a temporary folder, then times one decode step of ours (LM_DIR: a target's
lm/ folder, the runtime's loop) and of GenAI's Generator, each in a fresh process, in alternating rounds
at `threads` threads. Reported, not gated: where the builder is missing or rejects the checkpoint, the
metrics record that the row was skipped and why (the report prints it).
"""

import sys
import tempfile
from pathlib import Path

from pipeline_lib.bench.peer import PeerSkipped, build_genai, compare
from pipeline_lib.fsutil import write_json
from pipeline_lib.stage import load_params, stage_outputs

if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python stages/peer.py CHECKPOINT_DIR LM_DIR METRICS_JSON")
    ckpt, lm_dir, metrics = (Path(a) for a in sys.argv[1:])
    params = load_params()
    cfg = params.bench.peer
    with stage_outputs("peer", metrics):
        out = {"engine": "onnxruntime-genai builder", "precision": "int4", "block_size": int(cfg.block_size),
               "ours": str(lm_dir)}
        try:
            with tempfile.TemporaryDirectory(prefix="genai-") as tmp:
                built = build_genai(ckpt, Path(tmp) / "model", "int4", int(cfg.block_size), float(cfg.timeout_s))
                res = compare(lm_dir, built, int(params.threads), int(cfg.prompt_tokens), int(cfg.steps),
                              int(cfg.rounds), float(cfg.timeout_s))
            out.update(res.to_dict())
            print(f"peer: ours {res.ours_ms:.2f} ms/step, GenAI int4 {res.peer_ms:.2f} ms/step, "
                  f"ours/GenAI {res.ratio:.3f} (median of {res.rounds} rounds)")
        except PeerSkipped as exc:
            out["skipped"] = str(exc)
            print(f"peer: skipped: {exc}")
        write_json(metrics, out)

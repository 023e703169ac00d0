"""Stage convert@BACKEND-PRECISION: DECODER_DIR LM_DIR OUT_DIR METRICS_JSON [CHECKPOINT_DIR] -> one runtime folder.

OUT_DIR/{lm,decoder}/ hold the converted model, its JSON config (with a ``conversion`` block) and, for the
LM, the tokenizer; for OpenVINO, with CHECKPOINT_DIR, also the stateful LM (pipeline_lib.openvino_stateful).
METRICS_JSON: conversion seconds and sizes (MB) per model (the time is here, never in the artifacts).
"""

import sys
from pathlib import Path

from pipeline_lib.convert import ConvertSettings, convert_target
from pipeline_lib.fsutil import write_json
from pipeline_lib.stage import load_params, stage_outputs

if __name__ == "__main__":
    backend, precision = sys.argv[1], sys.argv[2]
    dec_dir, lm_dir, out, metrics = map(Path, sys.argv[3:7])
    ckpt_dir = Path(sys.argv[7]) if len(sys.argv) > 7 else None
    settings = ConvertSettings.from_params(load_params().convert)
    # The outs are lm/ and decoder/ (DVC cache); certificate.json beside them is parity_convert's.
    with stage_outputs(f"convert@{backend}-{precision}", out / "lm", out / "decoder", metrics):
        figures = convert_target(backend, precision, dec_dir, lm_dir, out, settings, ckpt_dir)
        flat = {}
        for which, f in figures.items():
            flat[f"{which}_seconds"] = f["seconds"]
            flat[f"{which}_mb"] = round(f["bytes"] / 1e6, 3)
            flat[f"{which}_size_ratio"] = round(f["bytes"] / f["source_bytes"], 4)
        write_json(metrics, {f"{backend}_{precision}": flat})

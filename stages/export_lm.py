"""Stage export_lm: CHECKPOINT_DIR OUT_DIR -> soprano_lm_step.onnx + its config JSON + the tokenizer files."""

import sys
from pathlib import Path

from pipeline_lib.export.lm import copy_tokenizer_files, export_lm
from pipeline_lib.stage import load_params, stage_outputs

if __name__ == "__main__":
    ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
    params = load_params()
    with stage_outputs("export_lm", out):
        export_lm(ckpt, out, opset=int(params.export.opset))
        copy_tokenizer_files(ckpt, out)

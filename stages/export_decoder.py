"""Stage export_decoder: CHECKPOINT_DIR OUT_DIR -> soprano_decoder_preistft.onnx + its ISTFT config JSON."""

import sys
from pathlib import Path

from pipeline_lib.export.decoder import export_decoder
from pipeline_lib.stage import load_params, stage_outputs

if __name__ == "__main__":
    ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
    params = load_params()
    with stage_outputs("export_decoder", out):
        export_decoder(ckpt, out, opset=int(params.export.opset))

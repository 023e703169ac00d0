"""Stage parity: CHECKPOINT_DIR DECODER_DIR LM_DIR METRICS_JSON -> parity metrics; a missed threshold fails."""

import json
import sys
from pathlib import Path

from pipeline_lib.audio.istft import IstftConfig
from pipeline_lib.errors import ParityError
from pipeline_lib.fsutil import write_json
from pipeline_lib.model.decoder import load_decoder
from pipeline_lib.model.lm import load_lm
from pipeline_lib.parity import (
    ParityReport,
    ParityThresholds,
    check_decoder,
    check_lm,
    format_report,
    model_file,
    ort_runner,
)
from pipeline_lib.registry import DECODER_CONFIG, DECODER_DIR, LM_CONFIG, LM_DIR
from pipeline_lib.stage import load_params, stage_outputs

if __name__ == "__main__":
    ckpt, dec_dir, lm_dir, metrics = map(Path, sys.argv[1:5])
    # parity.convert_* are the thresholds of stage parity_convert (converted artifacts), not of this stage.
    th = ParityThresholds.from_mapping({k: v for k, v in load_params().parity.items() if not k.startswith("convert_")})
    with stage_outputs("parity", metrics):
        report = ParityReport()
        lm = load_lm(ckpt)
        decoder = load_decoder(ckpt / "decoder.pth", expected_input_channels=lm.cfg.hidden_size)
        run_decoder = ort_runner(model_file(dec_dir, DECODER_DIR))
        check_decoder(decoder, run_decoder, IstftConfig.from_json(dec_dir / DECODER_CONFIG), th, report)
        stop_id = json.loads((lm_dir / LM_CONFIG).read_text())["special_tokens"]["stop"]
        check_lm(lm, ort_runner(model_file(lm_dir, LM_DIR)), stop_id, th, report)
        print(format_report(report))
        if not report.passed:
            raise ParityError("; ".join(report.failures))
        write_json(metrics, {"onnx_fp32": report.metrics})

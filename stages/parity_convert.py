"""Stage parity_convert@BACKEND-PRECISION: CKPT EXPORT_DECODER EXPORT_LM TARGET_DIR METRICS_JSON.

fp32 targets: the same checks and limits as the export's parity stage (against the torch reference).
int8 targets: against the fp32 export run by ONNX Runtime: LM hidden-state cosine, greedy token agreement,
decoder audio SNR (limits and reasons: conf/parity/default.yaml, convert_int8). A missed limit fails the stage.
OpenVINO: the stateful LM beside the plain IR gets the same LM checks (metrics prefixed stateful_).
"""

import json
import sys
from pathlib import Path

from pipeline_lib.audio.istft import IstftConfig
from pipeline_lib.convert import DECODER_DIR, LM_DIR, model_file
from pipeline_lib.errors import ParityError
from pipeline_lib.export.decoder import DECODER_CONFIG
from pipeline_lib.export.lm import LM_CONFIG
from pipeline_lib.fsutil import write_json
from pipeline_lib.parity import (
    ParityReport,
    ParityThresholds,
    QuantParityThresholds,
    check_decoder,
    check_lm,
    check_quantized,
    format_report,
    runner_for,
)
from pipeline_lib.openvino_stateful import STATEFUL_FILE
from pipeline_lib.stage import load_params, stage_outputs

if __name__ == "__main__":
    backend, precision = sys.argv[1], sys.argv[2]
    ckpt, exp_dec, exp_lm, target, metrics = map(Path, sys.argv[3:8])
    params = load_params().parity
    name = f"parity_convert@{backend}-{precision}"
    with stage_outputs(name, metrics):
        report = ParityReport()
        dec_dir, lm_dir = target / DECODER_DIR, target / LM_DIR
        lm_config = json.loads((lm_dir / LM_CONFIG).read_text())
        istft_config = IstftConfig.from_json(dec_dir / DECODER_CONFIG)
        # OpenVINO: the stateful LM (the runtime's choice) is checked too, its metrics prefixed stateful_.
        stateful = lm_dir / f"{STATEFUL_FILE}.xml"
        run_dec, run_lm = runner_for(model_file(dec_dir, DECODER_DIR)), runner_for(model_file(lm_dir, LM_DIR))
        if precision == "fp32":
            from pipeline_lib.model.decoder import load_decoder
            from pipeline_lib.model.lm import load_lm

            th = ParityThresholds.from_mapping(params[f"convert_{precision}"])
            lm = load_lm(ckpt)
            decoder = load_decoder(ckpt / "decoder.pth", expected_input_channels=lm.cfg.hidden_size)
            check_decoder(decoder, run_dec, istft_config, th, report)
            check_lm(lm, run_lm, lm_config["special_tokens"]["stop"], th, report)
            if stateful.is_file():
                report.merge(check_lm(lm, runner_for(stateful), lm_config["special_tokens"]["stop"], th), "stateful_")
        else:
            th = QuantParityThresholds.from_mapping(params[f"convert_{precision}"])
            ref_dec, ref_lm = runner_for(model_file(exp_dec, DECODER_DIR)), runner_for(model_file(exp_lm, LM_DIR))
            check_quantized(ref_lm, run_lm, ref_dec, run_dec, lm_config, istft_config, th, report)
            if stateful.is_file():
                report.merge(check_quantized(ref_lm, runner_for(stateful), None, None, lm_config, istft_config, th),
                             "stateful_")  # the LM only: the decoder is the one checked above
        print(f"{name}:\n{format_report(report)}")
        if not report.passed:
            raise ParityError("; ".join(report.failures))
        write_json(metrics, {f"{backend}_{precision}": report.metrics})

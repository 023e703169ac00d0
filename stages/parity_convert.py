"""Stage parity_convert@BACKEND-PRECISION: CKPT EXPORT_DECODER EXPORT_LM TARGET_DIR METRICS_JSON
-> METRICS_JSON and TARGET_DIR/certificate.json (pipeline_lib.certificate: metrics, limits, checkpoint identity,
the certified files' hashes, verdict), which travels with the models.

What a target is checked against follows its precision (pipeline_lib.registry.Precision.parity):
"reference" (fp32): the same checks and limits as the export's parity stage, against the torch reference;
"quantized" (int8, int4, bf16): against the fp32 export run by ONNX Runtime on the same inputs: LM
hidden-state cosine (min, mean), teacher-forced top-1 agreement, free-running greedy agreement, decoder
audio SNR, and the log-mel distance of the audio decoded end to end from the same token sequence. Limits and reasons: conf/parity/default.yaml,
convert_<precision> (its `trained` block replaces them for a checkpoint whose weights are not random). On
random weights the limits are guards: a miss means a broken conversion and fails the stage (no certificate).
On a trained checkpoint a miss of a precision with `trained` limits (int8, bf16, int4) is a quality verdict:
the certificate says "fail" (so precision="auto" skips the target), the stage succeeds and says so; fp32
has none (its limits check a correct export against the reference), so its miss fails the stage there too. A backend with a stateful LM (OpenVINO): that LM gets the same LM checks (metrics
prefixed stateful_). A bf16 target on a CPU without bf16 instructions is not checked (OpenVINO would
compute it in f32): the metrics record that it was skipped and why, the certificate says "unchecked".
"""

import dataclasses
import json
import sys
from pathlib import Path

from pipeline_lib import certificate, registry
from pipeline_lib.audio.istft import IstftConfig
from pipeline_lib.errors import ParityError
from pipeline_lib.fsutil import write_json
from pipeline_lib.parity import (
    ParityReport,
    check_decoder,
    check_lm,
    format_report,
    model_file,
    runner_for,
)
from pipeline_lib.parity_quant import check_quantized, convert_thresholds, has_quality_limits
from pipeline_lib.stage import load_params, stage_outputs

if __name__ == "__main__":
    backend, precision = sys.argv[1], sys.argv[2]
    ckpt, exp_dec, exp_lm, target, metrics = map(Path, sys.argv[3:8])
    params = load_params().parity
    name = f"parity_convert@{backend}-{precision}"
    prec = registry.precision(precision)
    skipped = None
    if prec.inference == "bf16":
        from pipeline_lib.cpuinfo import missing_bf16

        skipped = missing_bf16()
    cert_path = target / certificate.CERTIFICATE_FILE
    with stage_outputs(name, metrics, cert_path):
        identity = certificate.checkpoint_identity(ckpt)
        # a miss is a quality verdict (certificate "fail", the stage succeeds) only on a trained checkpoint and
        # where the precision has trained limits; elsewhere the limits are guards and a miss fails the stage
        trained = not identity["random_weights"]
        verdict_only = trained and has_quality_limits(precision, params)
        target_info = registry.target(backend, precision)
        reference = ("the torch reference (checkpoint)" if prec.parity == registry.PARITY_REFERENCE
                     else "the fp32 ONNX export run by ONNX Runtime, same inputs")
        if skipped:  # OpenVINO would compute in f32 and "pass": record why nothing was checked instead
            print(f"{name}: skipped: {skipped}")
            write_json(metrics, {f"{backend}_{precision}": {"skipped_no_bf16_cpu": 1.0}})
            certificate.write(target, certificate.build(target_info, identity, certificate.model_files(target),
                                                        reference=reference, limits=None, metrics=None,
                                                        unchecked=f"not checked on the machine that built it: {skipped}"))
        else:
            report = ParityReport()
            th = convert_thresholds(precision, params, trained=trained)
            dec_dir, lm_dir = target / registry.DECODER_DIR, target / registry.LM_DIR
            lm_config = json.loads((lm_dir / registry.LM_CONFIG).read_text())
            istft_config = IstftConfig.from_json(dec_dir / registry.DECODER_CONFIG)
            stateful = lm_dir / f"{registry.STATEFUL_FILE}.xml"  # the runtime's choice where it is there

            def runner(path: Path):
                return runner_for(path, inference_precision=prec.inference)

            run_dec = runner(model_file(dec_dir, registry.DECODER_DIR))
            run_lm = runner(model_file(lm_dir, registry.LM_DIR))
            if prec.parity == registry.PARITY_REFERENCE:
                from pipeline_lib.model.decoder import load_decoder
                from pipeline_lib.model.lm import load_lm

                lm = load_lm(ckpt)
                decoder = load_decoder(ckpt / "decoder.pth", expected_input_channels=lm.cfg.hidden_size)
                check_decoder(decoder, run_dec, istft_config, th, report)
                check_lm(lm, run_lm, lm_config["special_tokens"]["stop"], th, report)
                if stateful.is_file():
                    report.merge(check_lm(lm, runner(stateful), lm_config["special_tokens"]["stop"], th), "stateful_")
            else:
                ref_dec = runner_for(model_file(exp_dec, registry.DECODER_DIR))
                ref_lm = runner_for(model_file(exp_lm, registry.LM_DIR))
                check_quantized(ref_lm, run_lm, ref_dec, run_dec, lm_config, istft_config, th, report)
                if stateful.is_file():
                    report.merge(check_quantized(ref_lm, runner(stateful), None, None, lm_config, istft_config, th),
                                 "stateful_")  # the LM only: the decoder is the one checked above
            print(f"{name}:\n{format_report(report)}")
            if not report.passed and not verdict_only:
                raise ParityError("; ".join(report.failures))
            # certificate_passed: 0 only on a trained checkpoint's quality miss (a guard miss fails the stage)
            write_json(metrics, {f"{backend}_{precision}": {**report.metrics,
                                                            "certificate_passed": float(report.passed)}})
            cert = certificate.build(target_info, identity, certificate.model_files(target), reference=reference,
                                     limits=dataclasses.asdict(th), metrics=report.metrics, failures=report.failures)
            certificate.write(target, cert)
            print(f"{name}: certificate {cert['verdict']} ({cert['limits_kind']} limits) -> {cert_path}")
            if not report.passed:
                print(f"{name}: WARNING: {target_info.label} misses the quality limits for a trained checkpoint; "
                      "precision='auto' will not pick it: " + "; ".join(report.failures))

"""Quality certificates: the parity_convert stage writes one per target (metrics, limits, checkpoint identity,
certified files, verdict); precision="auto" picks only passed ones and names them; a target named explicitly
loads with a warning when its certificate failed; an edited model makes its certificate stale.

The deliberately broken int4: converted from the export of ANOTHER checkpoint (tiny with another seed), so its
LM computes something else than the fp32 export it is checked against."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_lib import certificate, recommend, registry

REPO_ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"avx2", "fma"}  # rule order for stream: onnx-int4, onnx-int8, ...
pytestmark = pytest.mark.slow


def _parity_convert(workdir: Path, label: str, ckpt: Path, export: Path, target: Path) -> subprocess.CompletedProcess:
    backend, precision = label.split("-")
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages/parity_convert.py"), backend, precision, str(ckpt), str(export),
         str(export), str(target), str(workdir / f"{label}.json")],
        cwd=workdir, capture_output=True, text=True, timeout=900, env=dict(os.environ))


@pytest.fixture(scope="module")
def certified_root(tiny_checkpoint, tiny_export, module_tmp):
    """ROOT with onnx-fp32 (export), onnx-int8 and a broken onnx-int4, certified by the real stage, plus
    the checkpoints and a scratch folder with params.yaml (decode_steps 16)."""
    from pipeline_lib.checkpoint import CheckpointConfig, fetch_checkpoint
    from pipeline_lib.config import compose
    from pipeline_lib.convert import convert_target
    from pipeline_lib.export.decoder import export_decoder
    from pipeline_lib.export.lm import copy_tokenizer_files, export_lm

    tmp = module_tmp.mktemp("cert")
    work = tmp / "work"
    work.mkdir()
    params = compose(conf_dir=REPO_ROOT / "conf")
    for key in ("convert_fp32", "convert_int8", "convert_int4"):
        params["parity"][key]["decode_steps"] = 16
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # "trained": the tiny checkpoint with source.json saying its weights are not random (quality limits apply)
    trained = tmp / "trained"
    shutil.copytree(tiny_checkpoint, trained)
    src = json.loads((trained / "source.json").read_text())
    (trained / "source.json").write_text(json.dumps({**src, "name": "trained", "random_weights": False}))
    # another checkpoint's export: what the broken int4 is converted from
    cfg = yaml.safe_load((REPO_ROOT / "conf/checkpoint/tiny.yaml").read_text())
    other = fetch_checkpoint(CheckpointConfig.from_mapping({**cfg, "seed": 1, "name": "other"}), tmp / "other")
    other_export = tmp / "other_export"
    export_decoder(other, other_export)
    export_lm(other, other_export)
    copy_tokenizer_files(other, other_export)

    root = tmp / "root"
    for which in (registry.LM_DIR, registry.DECODER_DIR):
        shutil.copytree(tiny_export, root / "onnx/fp32" / which)
    convert_target("onnx", "int8", tiny_export, tiny_export, root / "onnx/int8")
    convert_target("onnx", "int4", other_export, other_export, root / "onnx/int4")
    return root, work, tiny_checkpoint, trained, tiny_export


def test_broken_int4_fails_the_guard_on_random_weights(certified_root):
    root, work, ckpt, _, export = certified_root
    proc = _parity_convert(work, "onnx-int4", ckpt, export, root / "onnx/int4")
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "lm_hidden_cosine" in proc.stdout + proc.stderr
    assert not (root / "onnx/int4" / certificate.CERTIFICATE_FILE).exists()


def test_auto_skips_the_failed_certificate(certified_root, caplog):
    from pipeline_lib.runtime.tts import SopranoTTS

    root, work, ckpt, trained, export = certified_root
    for label in ("onnx-fp32", "onnx-int8"):
        proc = _parity_convert(work, label, ckpt, export, root / label.replace("-", "/"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # trained checkpoint: a miss is a verdict, the stage succeeds and the certificate says "fail"
    proc = _parity_convert(work, "onnx-int4", trained, export, root / "onnx/int4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WARNING" in proc.stdout and "auto" in proc.stdout

    from pipeline_lib.report import quality_passed

    metrics = {**json.loads((work / "onnx-int4.json").read_text()), **json.loads((work / "onnx-int8.json").read_text())}
    assert metrics["onnx_int4"]["certificate_passed"] == 0.0 and metrics["onnx_int8"]["certificate_passed"] == 1.0
    verdicts = quality_passed(metrics)  # the report's recommendation leaves it out too
    assert verdicts["onnx-int8"] == "passed" and "certificate failed" in verdicts["onnx-int4"]
    cert = json.loads((root / "onnx/int4" / certificate.CERTIFICATE_FILE).read_text())
    assert cert["verdict"] == "fail" and cert["passed"] is False and cert["limits_kind"] == "quality"
    assert cert["checkpoint"]["name"] == "trained" and cert["checkpoint"]["random_weights"] is False
    assert len(cert["checkpoint"]["weights_sha256"]["model.safetensors"]) == 64
    assert cert["limits"]["lm_token_agreement_min"] == 0.85  # parity.convert_int4.trained
    assert cert["metrics"]["lm_hidden_cosine_min"] < 0.95 and cert["failures"]
    assert set(cert["files"]) >= {"lm/soprano_lm_step.onnx", "decoder/soprano_decoder_preistft.onnx"}
    good = json.loads((root / "onnx/int8" / certificate.CERTIFICATE_FILE).read_text())
    assert good["verdict"] == "pass" and good["limits_kind"] == "guard"
    assert good["metrics"]["lm_hidden_cosine_min"] > 0.97
    # the same inputs give the same certificate: no time, host or path in it
    assert str(work) not in json.dumps(good) and "seconds" not in json.dumps(good)

    p = recommend.pick(root, "stream", AVX2, "Test CPU")
    assert p.choice.label == "onnx-int8"
    assert "onnx-int4 (certificate failed" in p.reason and "relied on" in p.reason
    assert [s.state for s in p.certificates] == ["passed"]
    with caplog.at_level(logging.INFO, logger="pipeline_lib.runtime.model_files"):
        tts = SopranoTTS.from_dir(root, precision="auto", num_threads=1, warm_up=False)
    assert "int4" not in tts.choice.label
    assert any("relied on" in r.message and certificate.CERTIFICATE_FILE in r.message for r in caplog.records)

    # named explicitly: loads, with a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline_lib.runtime.model_files"):
        tts = SopranoTTS.from_dir(root, precision="onnx-int4", num_threads=1, warm_up=False)
    assert tts.choice.label == "onnx-int4"
    assert any("onnx-int4 is failed" in r.message for r in caplog.records), [r.message for r in caplog.records]

    # a model file changed after certification: the certificate no longer covers it
    cfg = root / "onnx/int8/lm/soprano_lm_step_config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert certificate.status(root / "onnx/int8").state == "stale"
    assert recommend.pick(root, "stream", AVX2).choice.label == "onnx-fp32"


def test_a_broken_fp32_fails_the_stage_on_a_trained_checkpoint(certified_root, tmp_path):
    """fp32 is checked against the torch reference and has no `trained` limits: its limits stay guards on a
    trained checkpoint too, so a miss is a broken export that fails the stage, never a certificate "fail"."""
    root, work, _, trained, export = certified_root
    broken = tmp_path / "onnx/fp32"
    for which in (registry.LM_DIR, registry.DECODER_DIR):
        shutil.copytree(root.parent / "other_export", broken / which)  # another checkpoint's export
    proc = _parity_convert(work, "onnx-fp32", trained, export, broken)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "stage parity_convert@onnx-fp32 failed" in proc.stderr and "lm_greedy_token_agreement" in proc.stderr
    assert not (broken / certificate.CERTIFICATE_FILE).exists()

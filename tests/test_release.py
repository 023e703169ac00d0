"""Release bundles (pipeline_lib.release, runtime.bundle): the onnx-community layout, certificates and model card;
from_dir / speak load the bundle (default variant, "auto", a named one) with the same audio as the target folder;
a hub id goes through huggingface_hub (never the network here: stubbed), and offline it is an error that
names the local-folder way."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib import certificate, registry
from pipeline_lib.errors import ModelFileError

TEXT = "Hello there, this is a test."


def _certify(folder: Path, label: str, failures=()) -> None:
    t = registry.choice(label).lm
    ident = {"name": "tiny", "source": "random", "seed": 0, "random_weights": True,
             "weights_sha256": {"model.safetensors": "0" * 64}}
    metrics = {"lm_hidden_cosine_min": 0.996, "lm_token_agreement": 0.9, "audio_log_mel_distance_db": 0.2}
    limits = {"lm_hidden_cosine_min": 0.97, "lm_token_agreement_min": 0.5, "audio_log_mel_distance_max": 1.0}
    certificate.write(folder, certificate.build(t, ident, certificate.model_files(folder), reference="test",
                                                limits=limits, metrics=metrics, failures=failures))


@pytest.fixture(scope="module")
def built(tiny_export, module_tmp):
    from pipeline_lib.convert import convert_target
    from pipeline_lib.release import build_bundle

    tmp = module_tmp.mktemp("release")
    root = tmp / "artifacts"
    for which in (registry.LM_DIR, registry.DECODER_DIR):
        shutil.copytree(tiny_export, root / "onnx/fp32" / which)
    convert_target("onnx", "int8", tiny_export, tiny_export, root / "onnx/int8")
    _certify(root / "onnx/fp32", "onnx-fp32")
    _certify(root / "onnx/int8", "onnx-int8")
    bench = tmp / "bench.csv"
    with open(bench, "w", newline="") as f:
        w = csv.DictWriter(f, ["config", "backend", "precision", "threads", "xrt", "per_token_median_ms", "first_chunk_ms"])
        w.writeheader()
        w.writerow({"config": "onnx-int8-t2", "backend": "onnx", "precision": "int8", "threads": 2, "xrt": 12.5,
                    "per_token_median_ms": 4.25, "first_chunk_ms": 80})
        w.writerow({"config": "openvino-int8-t2", "backend": "openvino", "precision": "int8", "threads": 2, "xrt": 9})
    env = tmp / "env.json"
    env.write_text(json.dumps({"cpu": "Test CPU 9000", "physical_cores": 2, "libraries": {"onnxruntime": "1.0"}}))
    out = build_bundle(root, ["onnx-int8", "onnx-fp32"], tmp / "bundle", "onnx-int8", bench, env)
    return root, out


def test_layout_certificates_and_model_card(built):
    root, out = built
    for name in ("README.md", "config.json", "tokenizer.json", "onnx/soprano_lm_step_quantized.onnx",
                 "onnx/soprano_lm_step_quantized_config.json", "onnx/soprano_decoder_preistft_quantized.onnx",
                 "onnx/soprano_decoder_preistft_quantized_istft_config.json", "onnx/soprano_lm_step.onnx",
                 "certificates/onnx-int8.json", "certificates/onnx-fp32.json"):
        assert (out / name).is_file(), name
    # hard links: the bundle costs no second copy
    assert (out / "onnx/soprano_lm_step_quantized.onnx").stat().st_ino == (root / "onnx/int8/lm/soprano_lm_step.onnx").stat().st_ino
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["soprano_onnx"]["default"] == "onnx-int8" and set(cfg["soprano_onnx"]["variants"]) == {"onnx-int8", "onnx-fp32"}
    assert cfg["checkpoint"]["random_weights"] is True
    lm_cfg = json.loads((out / "onnx/soprano_lm_step_quantized_config.json").read_text())
    assert lm_cfg["file"] == "soprano_lm_step_quantized.onnx"
    cert = json.loads((out / "certificates/onnx-int8.json").read_text())
    assert set(cert["files"]) == {"onnx/soprano_lm_step_quantized.onnx", "onnx/soprano_decoder_preistft_quantized.onnx"}
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0") and "pipeline_tag: text-to-speech" in card
    assert "| onnx-int8 | pass | guard | 0.996 (≥ 0.97) |" in card
    assert "| onnx-int8 | 2 | 12.5 | 4.25 | 80 |" in card and "openvino-int8" not in card.split("## Speed")[1]
    assert "Test CPU 9000" in card and "huggingface-cli upload" in card and "## License" in card


def test_from_dir_and_speak_load_the_bundle(built, tmp_path, caplog):
    from pipeline_lib.cli import main
    from pipeline_lib.runtime.tts import SopranoTTS

    root, out = built
    ref = SopranoTTS.from_dir(root / "onnx/int8", num_threads=1, warm_up=False).synthesize(TEXT, max_new_tokens=24)["audio"]
    tts = SopranoTTS.from_dir(out, num_threads=1, warm_up=False)
    assert tts.choice.label == "onnx-int8" and tts.lm_path == out / "onnx/soprano_lm_step_quantized.onnx"
    assert np.array_equal(tts.synthesize(TEXT, max_new_tokens=24)["audio"], ref)
    with caplog.at_level(logging.INFO, logger="pipeline_lib.runtime.bundle"):
        auto = SopranoTTS.from_dir(out, precision="auto", num_threads=1, warm_up=False)
    assert auto.choice.label in ("onnx-int8", "onnx-fp32")
    assert any("relied on" in r.message and "certificates/" in r.message for r in caplog.records)
    fp32 = SopranoTTS.from_dir(out, precision="onnx-fp32", num_threads=1, warm_up=False)
    assert fp32.lm_path.name == "soprano_lm_step.onnx"
    with pytest.raises(ModelFileError, match="no variant onnx-int4"):
        SopranoTTS.from_dir(out, precision="onnx-int4", num_threads=1, warm_up=False)
    wav = tmp_path / "o.wav"
    assert main(["speak", TEXT, "-o", str(wav), "--model", str(out), "--threads", "1", "--max-new-tokens", "16"]) == 0
    assert wav.stat().st_size > 1000


def test_a_failed_variant_is_skipped_by_auto_and_warned_about_when_named(built, tmp_path, caplog):
    from pipeline_lib.release import build_bundle
    from pipeline_lib.runtime.tts import SopranoTTS

    root, _ = built
    bad = tmp_path / "root"
    shutil.copytree(root, bad)
    _certify(bad / "onnx/int8", "onnx-int8", failures=("lm_token_agreement = 0.1 is below 0.85",))
    out = build_bundle(bad, ["onnx-int8", "onnx-fp32"], tmp_path / "bundle", "onnx-int8")
    assert "| onnx-int8 | fail |" in (out / "README.md").read_text()
    assert SopranoTTS.from_dir(out, precision="auto", num_threads=1, warm_up=False).choice.label == "onnx-fp32"
    with caplog.at_level(logging.WARNING, logger="pipeline_lib.runtime.bundle"):
        assert SopranoTTS.from_dir(out, num_threads=1, warm_up=False).choice.label == "onnx-int8"
    assert any("is failed" in r.message for r in caplog.records)


def test_hub_id_offline_names_the_local_path_and_online_loads(built, monkeypatch):
    from pipeline_lib.runtime.tts import SopranoTTS

    _, out = built
    calls = []

    def offline(repo_id, **kw):
        calls.append(repo_id)
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    fake = types.ModuleType("huggingface_hub")
    fake.snapshot_download = offline
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    with pytest.raises(ModelFileError, match=r"owner/soprano-onnx: no such local folder.*--model DIR"):
        SopranoTTS.from_dir("owner/soprano-onnx", num_threads=1, warm_up=False)
    fake.snapshot_download = lambda repo_id, **kw: calls.append(repo_id) or str(out)
    tts = SopranoTTS.from_dir("owner/soprano-onnx", num_threads=1, warm_up=False)
    assert tts.choice.label == "onnx-int8" and calls == ["owner/soprano-onnx", "owner/soprano-onnx"]
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ModelFileError, match="pip install huggingface_hub"):
        SopranoTTS.from_dir("owner/soprano-onnx", num_threads=1, warm_up=False)


def test_release_command(built, tmp_path):
    from pipeline_lib.cli import main

    root, _ = built
    assert main(["release", "--artifacts", str(root), "--targets", "onnx-int8", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b/onnx/soprano_lm_step_quantized.onnx").is_file()
    assert main(["release", "--artifacts", str(root), "--targets", "openvino-int8", "--out", str(tmp_path / "c")]) == 2


def test_the_bundle_ships_the_certified_files_where_the_export_differs(built, tiny_export, tmp_path):
    """onnx-fp32's certificate lives in ROOT/onnx/fp32 (the fused LM graph) while ROOT/export holds the traced one:
    the bundle takes the certified folder's files, so its fp32 variant passes and is byte for byte what was checked."""
    from pipeline_lib.release import build_bundle

    root = tmp_path / "artifacts"
    shutil.copytree(built[0], root)
    export_lm = root / "export" / registry.LM_DIR
    shutil.copytree(root / "onnx/fp32" / registry.LM_DIR, export_lm)
    shutil.copytree(root / "onnx/fp32" / registry.DECODER_DIR, root / "export" / registry.DECODER_DIR)
    step = export_lm / f"{registry.LM_FILE}.onnx"
    step.unlink()
    shutil.copyfile(tiny_export / f"{registry.FUSED_FILE}.onnx", step)  # another graph than the certified one
    certified = root / "onnx/fp32" / registry.LM_DIR / f"{registry.LM_FILE}.onnx"
    assert certificate.sha256_file(step) != certificate.sha256_file(certified)

    out = build_bundle(root, ["onnx-fp32"], tmp_path / "bundle", "onnx-fp32")
    cert = json.loads((out / "certificates/onnx-fp32.json").read_text())
    assert cert["verdict"] == "pass" and cert["passed"], cert.get("failures")
    shipped = out / json.loads((out / "config.json").read_text())["soprano_onnx"]["variants"]["onnx-fp32"]["lm"]
    assert certificate.sha256_file(shipped) == certificate.sha256_file(certified)

"""Conversion to OpenVINO IR (fp32, int8) and int8 ONNX: round trips, sizes, parity, the ovc CLI, bad files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline_lib.audio.istft import IstftConfig
from pipeline_lib.convert import ConvertSettings, convert_onnx_to_openvino, convert_target
from pipeline_lib.errors import MissingBackendError, ModelFileError
from pipeline_lib.export.decoder import DECODER_CONFIG, DECODER_ONNX
from pipeline_lib.export.lm import FUSED_ONNX, LM_CONFIG, LM_ONNX
from pipeline_lib.openvino_ir import compile_openvino, load_openvino_model
from pipeline_lib.parity import (
    ParityThresholds,
    check_decoder,
    check_lm,
    model_file,
    openvino_runner,
    ort_runner,
    runner_for,
)
from pipeline_lib.parity_quant import QuantParityThresholds, check_quantized

REPO_ROOT = Path(__file__).resolve().parents[1]


def _conf(group: str) -> dict:
    return yaml.safe_load((REPO_ROOT / f"conf/{group}/default.yaml").read_text())


def _lm_feed(lm_config: dict, past: int = 5, seq: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {
        "input_ids": rng.integers(0, lm_config["vocab_size"], (1, seq)).astype(np.int64),
        "attention_mask": np.ones((1, past + seq), np.int64),
        "position_ids": np.arange(past, past + seq, dtype=np.int64)[None],
    }
    shape = (1, lm_config["num_kv_heads"], past, lm_config["head_dim"])
    for i in range(lm_config["num_layers"]):
        for kind in ("key", "value"):
            feed[f"past_{kind}_{i}"] = rng.standard_normal(shape, dtype=np.float32)
    return feed


def _const_types(xml_path: Path) -> set[str]:
    root = ET.parse(xml_path).getroot()
    return {l.find("data").get("element_type") for l in root.iter("layer") if l.get("type") == "Const"}


@pytest.fixture(scope="module")
def lm_config(tiny_export: Path) -> dict:
    return json.loads((tiny_export / LM_CONFIG).read_text())


@pytest.fixture(scope="module")
def targets(tiny_checkpoint: Path, tiny_export: Path, module_tmp) -> dict[str, Path]:
    """Every backend x precision of the tiny export, built as the convert stage builds them (params from conf/,
    the checkpoint for OpenVINO's stateful LM)."""
    settings = ConvertSettings.from_params(_conf("convert"))
    root = module_tmp.mktemp("converted")
    out = {}
    for backend in ("onnx", "openvino"):
        for precision in ("fp32", "int8"):
            out[f"{backend}-{precision}"] = root / backend / precision
            convert_target(backend, precision, tiny_export, tiny_export, out[f"{backend}-{precision}"], settings,
                           tiny_checkpoint)
    return out


# --- fp32 IR ----------------------------------------------------------------------------------------------


def test_fp32_ir_keeps_fp32_weights_and_matches_onnx(tiny_export, lm_config, tmp_path):
    xml = convert_onnx_to_openvino(tiny_export / LM_ONNX, tmp_path / "lm.xml")
    assert xml == tmp_path / "lm.xml" and xml.with_suffix(".bin").is_file()
    assert "f16" not in _const_types(xml), "fp32 IR must not hold fp16 weights (save_model's default)"
    assert xml.with_suffix(".bin").stat().st_size > 0.95 * (tiny_export / LM_ONNX).stat().st_size
    feed = _lm_feed(lm_config)
    ref, got = ort_runner(tiny_export / LM_ONNX)(feed), openvino_runner(xml)(feed)
    assert np.abs(got["logits"] - ref["logits"]).max() < 2e-3
    assert np.abs(got["hidden_states"] - ref["hidden_states"]).max() < 1e-3
    for i in range(lm_config["num_layers"]):
        assert got[f"new_key_{i}"].shape == ref[f"new_key_{i}"].shape == (1, 1, 3, 128)  # the 3 new tokens
        assert np.abs(got[f"new_value_{i}"] - ref[f"new_value_{i}"]).max() < 1e-4


def test_default_out_path_is_beside_the_onnx(tiny_export, tmp_path):
    onnx = Path(shutil.copy2(tiny_export / DECODER_ONNX, tmp_path / DECODER_ONNX))
    xml = convert_onnx_to_openvino(onnx)
    assert xml == tmp_path / "soprano_decoder_preistft_fp32.xml"
    hidden = np.random.default_rng(0).standard_normal((2, 512, 9), dtype=np.float32)
    ref = ort_runner(onnx)({"hidden_states": hidden})["spectrum"]
    got = openvino_runner(xml)({"hidden_states": hidden})["spectrum"]
    assert got.shape == ref.shape == (2, 1025, 33, 2)
    assert np.abs(got - ref).max() < 1e-3


def test_openvino_fp32_passes_the_export_parity_checks(tiny_checkpoint, targets):
    from pipeline_lib.model.decoder import load_decoder
    from pipeline_lib.model.lm import load_lm

    folder = targets["openvino-fp32"]
    th = ParityThresholds.from_mapping(_conf("parity")["convert_fp32"] | {"decode_steps": 16})
    lm = load_lm(tiny_checkpoint)
    decoder = load_decoder(tiny_checkpoint / "decoder.pth", expected_input_channels=lm.cfg.hidden_size)
    report = check_decoder(decoder, runner_for(model_file(folder / "decoder", "decoder")),
                           IstftConfig.from_json(folder / "decoder" / DECODER_CONFIG), th)
    check_lm(lm, runner_for(model_file(folder / "lm", "lm")), 3, th, report)
    assert report.passed, report.failures
    assert report.metrics["lm_greedy_token_agreement"] == 1.0


# --- the stateful OpenVINO LM --------------------------------------------------------------------------------


def _stateful(folder: Path) -> Path:
    return folder / "lm" / "soprano_lm_stateful.xml"


def test_stateful_lm_keeps_the_cache_in_state_and_fuses_attention(targets, lm_config):
    """Both OpenVINO precisions carry the stateful LM: its cache is 2 x layers state variables (no past_* /
    new_* ports), and the CPU plugin fuses each layer's cache and attention into one node (the point of it)."""
    import collections

    import openvino as ov

    layers = lm_config["num_layers"]
    for precision in ("fp32", "int8"):
        xml = _stateful(targets[f"openvino-{precision}"])
        model = load_openvino_model(xml)
        assert sorted(p.get_any_name() for p in model.inputs) == ["attention_mask", "beam_idx", "input_ids", "position_ids"]
        assert sorted(p.get_any_name() for p in model.outputs) == ["hidden_states", "logits"]
        assert len(model.get_sinks()) == 2 * layers
        assert ("f16" not in _const_types(xml)) if precision == "fp32" else ({"i8", "u8"} & _const_types(xml))
        cfg = json.loads((xml.parent / "soprano_lm_stateful_config.json").read_text())
        assert cfg["file"] == xml.name and cfg["kv_cache"] == "openvino_state" and len(cfg["state"]) == 2 * layers
        assert cfg["conversion"]["precision"] == precision
        runtime = compile_openvino(model, 1).get_runtime_model()
        kinds = collections.Counter(op.get_rt_info()["layerType"].astype(str) for op in runtime.get_ops())
        assert kinds["ScaledDotProductAttention"] == layers and kinds["MemoryInput"] == 2 * layers, kinds
        assert isinstance(model, ov.Model)


def test_stateful_lm_passes_the_parity_checks(tiny_checkpoint, targets, tiny_export, lm_config):
    """fp32: the export's checks against torch (batch 2 with a left-padded row, 16 greedy steps against full
    forwards); int8: the int8 limits against the fp32 export."""
    from pipeline_lib.model.lm import load_lm

    th = ParityThresholds.from_mapping(_conf("parity")["convert_fp32"] | {"decode_steps": 16})
    report = check_lm(load_lm(tiny_checkpoint), runner_for(_stateful(targets["openvino-fp32"])), 3, th)
    assert report.passed, report.failures
    assert report.metrics["lm_greedy_token_agreement"] == 1.0
    assert report.metrics["lm_decode_hidden_max_abs"] < 1e-4
    qth = QuantParityThresholds.from_mapping(_conf("parity")["convert_int8"])
    dec = runner_for(model_file(tiny_export, "decoder"))
    q = check_quantized(ort_runner(tiny_export / LM_ONNX), runner_for(_stateful(targets["openvino-int8"])), dec, dec,
                        lm_config, IstftConfig.from_json(tiny_export / DECODER_CONFIG), qth)
    assert q.passed, q.failures
    # The LM alone (as parity_convert checks the stateful LM beside the decoder already checked): the
    # same LM figures, no decoder run.
    lm_only = check_quantized(ort_runner(tiny_export / LM_ONNX), runner_for(_stateful(targets["openvino-int8"])),
                              None, None, lm_config, IstftConfig.from_json(tiny_export / DECODER_CONFIG), qth)
    assert lm_only.metrics == {k: v for k, v in q.metrics.items() if k.startswith("lm_")}
    assert not any(k.startswith("decoder_") for k in lm_only.metrics)


def test_stateful_conversion_needs_a_checkpoint(tiny_export, tmp_path):
    with pytest.raises(ModelFileError, match="not a checkpoint folder.*dvc repro fetch"):
        convert_target("openvino", "fp32", tiny_export, tiny_export, tmp_path / "ov", None, tmp_path)
    assert not (tmp_path / "ov").exists()


def test_compile_uses_f32_precision(targets):
    compiled = compile_openvino(targets["openvino-fp32"] / "decoder" / "soprano_decoder_preistft.xml", num_threads=1)
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower() in ("f32", "<type: 'float32'>", "float32")
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    # The stateful LM's cache in f32, not the plugin's default u8 (which moved hidden states by ~0.07).
    compiled = compile_openvino(_stateful(targets["openvino-fp32"]), num_threads=1)
    assert str(compiled.get_property("KV_CACHE_PRECISION")).lower() in ("f32", "<type: 'float32'>", "float32")


# --- the stage's folders ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"])
def test_target_folders_are_self_contained(targets, name):
    folder = targets[name]
    backend, precision = name.split("-")
    assert sorted(p.name for p in folder.iterdir()) == ["decoder", "lm"]
    for which, cfg_name in (("lm", LM_CONFIG), ("decoder", DECODER_CONFIG)):
        model = model_file(folder / which, which)
        assert model.is_file() and model.suffix == (".xml" if backend == "openvino" else ".onnx")
        cfg = json.loads((folder / which / cfg_name).read_text())
        conversion = cfg["conversion"] if which == "lm" else cfg["onnx"]["conversion"]
        assert (conversion["backend"], conversion["precision"]) == (backend, precision)
    assert (folder / "lm" / "tokenizer.json").is_file()
    IstftConfig.from_json(folder / "decoder" / DECODER_CONFIG)  # the runtime's strict reader accepts it
    if backend == "openvino":
        assert (folder / "lm" / "soprano_lm_step.bin").is_file()


def test_onnx_fp32_is_the_export(targets, tiny_export):
    """The LM: the export's fused graph (its ort_file), under the runtime's name."""
    assert (targets["onnx-fp32"] / "lm" / LM_ONNX).read_bytes() == (tiny_export / FUSED_ONNX).read_bytes()


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_int8_is_smaller_and_close_to_fp32(targets, tiny_export, lm_config, backend):
    folder = targets[f"{backend}-int8"]
    for which, src in (("lm", tiny_export / LM_ONNX), ("decoder", tiny_export / DECODER_ONNX)):
        model = model_file(folder / which, which)
        size = sum(p.stat().st_size for p in (model, model.with_suffix(".bin")) if p.is_file())
        assert size < 0.5 * src.stat().st_size, (which, size)
    if backend == "openvino":
        assert {"u8", "i8"} & _const_types(model_file(folder / "lm", "lm"))
    th = QuantParityThresholds.from_mapping(_conf("parity")["convert_int8"])
    report = check_quantized(
        ort_runner(tiny_export / LM_ONNX), runner_for(model_file(folder / "lm", "lm")),
        ort_runner(tiny_export / DECODER_ONNX), runner_for(model_file(folder / "decoder", "decoder")),
        lm_config, IstftConfig.from_json(tiny_export / DECODER_CONFIG), th,
    )
    assert report.passed, report.failures
    assert report.metrics["lm_hidden_cosine_min"] < 1.0  # it is quantised


def test_check_quantized_catches_a_broken_model(tiny_export, lm_config):
    ref = ort_runner(tiny_export / LM_ONNX)

    def noisy(feed):
        out = ref(feed)
        rng = np.random.default_rng(0)
        return {**out, "hidden_states": rng.standard_normal(out["hidden_states"].shape).astype(np.float32),
                "logits": rng.standard_normal(out["logits"].shape).astype(np.float32)}

    dec = ort_runner(tiny_export / DECODER_ONNX)
    th = QuantParityThresholds.from_mapping(_conf("parity")["convert_int8"] | {"decode_steps": 16})
    report = check_quantized(ref, noisy, dec, dec, lm_config, IstftConfig.from_json(tiny_export / DECODER_CONFIG), th)
    assert not report.passed
    assert any("lm_hidden_cosine_min" in f for f in report.failures)
    assert any("lm_token_agreement" in f for f in report.failures)


# --- ovc command line -------------------------------------------------------------------------------------


def test_ovc_cli_converts_our_onnx(tiny_export, tmp_path):
    import openvino as ov

    ovc = shutil.which("ovc", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if ovc is None:
        pytest.skip("ovc not on PATH")
    out = tmp_path / "cli" / "decoder.xml"
    proc = subprocess.run([ovc, str(tiny_export / DECODER_ONNX), "--output_model", str(out), "--compress_to_fp16=False"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    model = ov.Core().read_model(str(out))
    assert [i.get_any_name() for i in model.inputs] == ["hidden_states"]
    assert "spectrum" in model.outputs[0].get_names()
    assert "f16" not in _const_types(out)
    hidden = np.random.default_rng(1).standard_normal((1, 512, 5), dtype=np.float32)
    ref = ort_runner(tiny_export / DECODER_ONNX)({"hidden_states": hidden})["spectrum"]
    assert np.abs(openvino_runner(out)({"hidden_states": hidden})["spectrum"] - ref).max() < 1e-3


# --- bad files, missing packages, atomic outputs ----------------------------------------------------------


def test_xml_without_bin_names_the_file(targets, tmp_path):
    xml = Path(shutil.copy2(targets["openvino-fp32"] / "lm" / "soprano_lm_step.xml", tmp_path / "lm.xml"))
    with pytest.raises(ModelFileError, match=r"lm\.bin"):
        load_openvino_model(xml)
    with pytest.raises(ModelFileError, match=r"lm\.bin"):
        openvino_runner(xml)


def test_bin_of_another_model_names_the_file(targets, tmp_path):
    """OpenVINO alone reads the decoder's (larger) .bin under the LM's .xml without a word."""
    xml = Path(shutil.copy2(targets["openvino-fp32"] / "lm" / "soprano_lm_step.xml", tmp_path / "lm.xml"))
    shutil.copy2(targets["openvino-fp32"] / "decoder" / "soprano_decoder_preistft.bin", tmp_path / "lm.bin")
    with pytest.raises(ModelFileError, match=r"lm\.bin.*another model"):
        load_openvino_model(xml)


def test_truncated_bin_and_bad_xml(targets, tmp_path):
    src = targets["openvino-int8"] / "decoder"
    xml = Path(shutil.copy2(src / "soprano_decoder_preistft.xml", tmp_path / "d.xml"))
    (tmp_path / "d.bin").write_bytes((src / "soprano_decoder_preistft.bin").read_bytes()[:1000])
    with pytest.raises(ModelFileError, match=r"d\.bin"):
        load_openvino_model(xml)
    xml.write_text("<net><layers>")
    with pytest.raises(ModelFileError, match=r"d\.xml"):
        load_openvino_model(xml)
    with pytest.raises(ModelFileError, match="nothing.xml"):
        load_openvino_model(tmp_path / "nothing.xml")


def test_missing_openvino_package(monkeypatch, tiny_export, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingBackendError, match=r"pip install 'soprano-onnx\[openvino\]'"):
        convert_onnx_to_openvino(tiny_export / DECODER_ONNX, tmp_path / "d.xml")
    with pytest.raises(MissingBackendError, match=r"pip install 'soprano-onnx\[openvino\]'"):
        load_openvino_model(tmp_path / "d.xml")
    with pytest.raises(ImportError):  # MissingBackendError is an ImportError too
        openvino_runner(tmp_path / "d.xml")
    assert not list(tmp_path.iterdir())


def test_failed_save_leaves_neither_file(monkeypatch, tiny_export, tmp_path):
    import openvino as ov

    real = ov.save_model

    def half_then_fail(model, path, **kw):
        real(model, path, **kw)
        raise RuntimeError("disk full")

    monkeypatch.setattr(ov, "save_model", half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_onnx_to_openvino(tiny_export / DECODER_ONNX, tmp_path / "d.xml")
    assert not list(tmp_path.iterdir())


def test_failed_target_leaves_no_folder(tiny_export, tmp_path):
    lm_dir = tmp_path / "lm_export"
    lm_dir.mkdir()
    shutil.copy2(tiny_export / LM_CONFIG, lm_dir / LM_CONFIG)  # config without its model
    with pytest.raises(ModelFileError, match=LM_ONNX):
        convert_target("openvino", "fp32", tiny_export, lm_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm_export"]


def test_bad_arguments(tiny_export, tmp_path):
    with pytest.raises(ValueError, match="weight_format"):
        convert_onnx_to_openvino(tiny_export / DECODER_ONNX, tmp_path / "d.xml", weight_format="int2")
    with pytest.raises(ValueError, match="int4"):
        convert_onnx_to_openvino(tiny_export / DECODER_ONNX, tmp_path / "d.xml", weight_format="int4",
                                 int4=("int4_sym", 0))
    with pytest.raises(ValueError, match=r"\.xml"):
        convert_onnx_to_openvino(tiny_export / DECODER_ONNX, tmp_path / "d.bin")
    with pytest.raises(ModelFileError, match="missing.onnx"):
        convert_onnx_to_openvino(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="unknown target"):
        convert_target("tensorrt", "fp32", tiny_export, tiny_export, tmp_path / "x")


# --- bf16 (OpenVINO) and int4 (ONNX Runtime, OpenVINO) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def new_targets(tiny_checkpoint: Path, tiny_export: Path, module_tmp) -> dict[str, Path]:
    """The targets beyond fp32 / int8 (registry: openvino-bf16, onnx-int4, openvino-int4), built as the convert stage does."""
    settings = ConvertSettings.from_params(_conf("convert"))
    root = module_tmp.mktemp("converted_new")
    out = {}
    for backend, precision in (("onnx", "int4"), ("openvino", "bf16"), ("openvino", "int4")):
        out[f"{backend}-{precision}"] = root / backend / precision
        convert_target(backend, precision, tiny_export, tiny_export, out[f"{backend}-{precision}"], settings,
                       tiny_checkpoint)
    return out


def _no_bf16_cpu(monkeypatch) -> None:
    import pipeline_lib.cpuinfo as cpuinfo

    monkeypatch.setattr(cpuinfo, "read_cpuinfo", lambda *a, **k: ("Old CPU", {"avx2", "fma", "avx512f"}))


def _quant_check(folder: Path, precision: str, tiny_export: Path, lm_config: dict, th: QuantParityThresholds | None = None):
    from pipeline_lib import registry

    inference = registry.precision(precision).inference
    th = th or QuantParityThresholds.from_mapping(_conf("parity")[f"convert_{precision}"])
    return check_quantized(
        ort_runner(tiny_export / LM_ONNX), runner_for(model_file(folder / "lm", "lm"), inference_precision=inference),
        ort_runner(tiny_export / DECODER_ONNX),
        runner_for(model_file(folder / "decoder", "decoder"), inference_precision=inference),
        lm_config, IstftConfig.from_json(tiny_export / DECODER_CONFIG), th,
    )


def test_int4_lm_is_matmul_nbits_and_within_its_limits(new_targets, tiny_export, lm_config):
    import onnx

    folder = new_targets["onnx-int4"]
    lm = model_file(folder / "lm", "lm")
    ops = {n.op_type for n in onnx.load(str(lm), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    dec_ops = {n.op_type for n in onnx.load(str(model_file(folder / "decoder", "decoder"))).graph.node}
    assert "MatMulNBits" not in dec_ops  # the decoder keeps int8 (conf/convert says why)
    conversion = json.loads((folder / "lm" / LM_CONFIG).read_text())["conversion"]
    assert conversion["settings"]["bits"] == 4 and conversion["precision"] == "int4"
    assert lm.stat().st_size < 0.4 * (tiny_export / LM_ONNX).stat().st_size  # the fp32 embedding is most of the rest
    report = _quant_check(folder, "int4", tiny_export, lm_config)
    assert report.passed, report.failures
    assert all(np.isfinite(v) for v in report.metrics.values()), report.metrics
    for key in ("lm_hidden_cosine_min", "lm_hidden_cosine_mean", "lm_token_agreement", "lm_free_running_agreement",
                "decoder_audio_snr_db", "audio_log_mel_distance_db"):
        assert key in report.metrics


def test_int4_settings_must_write_4_bits(tiny_export, tmp_path):
    settings = ConvertSettings.from_params(_conf("convert"))
    settings.onnx["int4"]["lm"] = {"method": "dynamic"}
    with pytest.raises(ValueError, match="int4"):
        convert_target("onnx", "int4", tiny_export, tiny_export, tmp_path / "out", settings)
    assert not (tmp_path / "out").exists()


def test_bf16_record_and_parity(new_targets, tiny_export, lm_config):
    from pipeline_lib.cpuinfo import missing_bf16

    folder = new_targets["openvino-bf16"]
    for which, cfg_name in (("lm", LM_CONFIG), ("decoder", DECODER_CONFIG)):
        cfg = json.loads((folder / which / cfg_name).read_text())
        conversion = cfg["conversion"] if which == "lm" else cfg["onnx"]["conversion"]
        assert conversion["inference_precision_hint"] == "bf16"
    assert "f32" in _const_types(model_file(folder / "lm", "lm"))  # the fp32 IR: bf16 is a compile setting
    why = missing_bf16()
    if why:
        pytest.skip(f"bf16 parity needs AVX512-BF16 / AMX-BF16: {why}")
    from pipeline_lib.runtime.backends import OpenVinoDecoder

    dec = OpenVinoDecoder(model_file(folder / "decoder", "decoder"), 1)
    assert dec.inference_precision == "bf16"
    assert str(dec.compiled.get_property("INFERENCE_PRECISION_HINT")).lower() in ("bf16", "<type: 'bfloat16'>")
    report = _quant_check(folder, "bf16", tiny_export, lm_config)
    assert report.passed, report.failures
    assert all(np.isfinite(v) for v in report.metrics.values()), report.metrics
    assert report.metrics["lm_hidden_cosine_min"] < 1.0  # it does compute in bf16


def test_bf16_model_is_refused_on_a_cpu_without_bf16(new_targets, monkeypatch):
    from pipeline_lib.errors import UnsupportedCpuError
    from pipeline_lib.runtime.backends import OpenVinoDecoder, OpenVinoLM

    _no_bf16_cpu(monkeypatch)
    folder = new_targets["openvino-bf16"]
    with pytest.raises(UnsupportedCpuError, match=r"avx512_bf16 / amx_bf16.*Old CPU|Old CPU.*avx512_bf16 / amx_bf16") as err:
        OpenVinoDecoder(model_file(folder / "decoder", "decoder"), 1)
    assert "openvino/fp32" in str(err.value)
    with pytest.raises(UnsupportedCpuError, match="bf16"):
        OpenVinoLM(_stateful(folder), 1)


def test_benchmark_skips_bf16_without_bf16_flags(tmp_path, monkeypatch):
    import math

    import pipeline_lib.bench.sweep as sweep
    from pipeline_lib.bench.sweep import Settings, artifact_configs, plan, run_job

    _no_bf16_cpu(monkeypatch)
    monkeypatch.setattr(sweep, "upstream_available", lambda: False)
    for base in ("artifacts/export", "artifacts/openvino/fp32", "artifacts/openvino/bf16", "artifacts/onnx/int4"):
        for part in ("lm", "decoder"):
            (tmp_path / base / part).mkdir(parents=True)
    targets = artifact_configs(["onnx", "openvino"], ["fp32", "bf16", "int4"])
    # no onnx-bf16
    assert targets == [("onnx", "fp32"), ("onnx", "int4"), ("openvino", "fp32"), ("openvino", "bf16"),
                       ("openvino", "int4")]
    jobs = plan(tmp_path, tmp_path / "ckpt", [1, 2], targets[:-1], backends=["onnx", "openvino"])
    # New precisions run at `threads` (the last count) only.
    assert [j.label for j in jobs] == ["onnx-fp32-t1", "onnx-fp32-t2", "onnx-int4-t2", "openvino-fp32-t1",
                                       "openvino-fp32-t2", "openvino-bf16-t2"]
    bf16 = jobs[-1]
    assert bf16.skip and "avx512_bf16" in bf16.skip and all(j.skip is None for j in jobs[:-1])
    row = run_job(bf16, Settings(), tmp_path)
    assert row["config"] == "openvino-bf16-t2" and math.isnan(row["xrt"]) and "skipped" in row["note"]


def test_headline_and_report_take_a_skipped_row():
    import math

    from pipeline_lib.bench import COLUMNS
    from pipeline_lib.bench.sweep import headline

    skipped = {c: math.nan for c in COLUMNS} | {"config": "openvino-bf16-t2", "backend": "openvino",
                                                  "precision": "bf16", "threads": 2, "note": "skipped: no bf16"}
    ok = {c: 1.0 for c in COLUMNS} | {"config": "onnx-fp32-t2", "backend": "onnx", "precision": "fp32", "threads": 2,
                                      "max_new_tokens": 64, "note": ""}
    m = headline([skipped, ok], 2)
    assert m["num_tokens"] == 64 and m["xrt"]["openvino_bf16"] is None and m["best_xrt"] == {"onnx": 1.0}


def test_openvino_int4_has_4bit_weights_and_is_within_its_limits(new_targets, tiny_export, lm_config):
    folder = new_targets["openvino-int4"]
    lm_types = _const_types(model_file(folder / "lm", "lm"))
    assert {"u4", "i4"} & lm_types, lm_types
    assert {"u4", "i4"} & _const_types(_stateful(folder))
    assert not {"u4", "i4"} & _const_types(model_file(folder / "decoder", "decoder"))  # decoder int8
    conversion = json.loads((folder / "lm" / LM_CONFIG).read_text())["conversion"]
    assert "int4_sym" in conversion["method"] and "group_size=128" in conversion["method"]
    report = _quant_check(folder, "int4", tiny_export, lm_config)
    assert report.passed, report.failures
    assert all(np.isfinite(v) for v in report.metrics.values()), report.metrics

"""`soprano-onnx convert` outside DVC: an export folder (flat, or with lm/ and decoder/) -> one target's folder.

Fast tests: the settings agree with conf/, every bad input is exit 2 with its message before any conversion
(a tripwire stands in for the conversion) and writes nothing, a failed conversion leaves OUT as it was,
files of OUT that the conversion does not write are kept (stand-in converters: no real conversion).
Slow tests (real conversions of the tiny export): the folders load with SopranoTTS.from_dir and equal what
the convert stage's code writes (byte for byte where the conversion is deterministic), and pass the
parity_convert stage's limits against the fp32 export.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline_lib import cli, registry
from pipeline_lib.convert import ConvertSettings, convert_target
from pipeline_lib.convert_command import planned_files
from pipeline_lib.errors import ExportError, MissingBackendError
from pipeline_lib.registry import (
    DECODER_CONFIG,
    DECODER_FILE,
    LM_CONFIG,
    LM_FILE,
    STATEFUL_CONFIG,
    STATEFUL_FILE,
    TOKENIZER_FILE,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
LM_ONNX, DECODER_ONNX = f"{LM_FILE}.onnx", f"{DECODER_FILE}.onnx"
TARGET_LIST = ", ".join(t.label for t in registry.TARGETS.values())
TEXT = "Hello there. How are you?"


def _conf(group: str) -> dict:
    return yaml.safe_load((REPO_ROOT / f"conf/{group}/default.yaml").read_text())


def _stage_settings() -> ConvertSettings:
    """What stages/convert.py converts with: params.yaml's convert group."""
    return ConvertSettings.from_params(yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["convert"])


def run_cli(*args) -> tuple[int, str, str]:
    """`soprano-onnx convert ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(["convert", *map(str, args)])
        except SystemExit as exc:  # argparse
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def _args(export: Path, out: Path, backend: str = "onnx", precision: str = "int8", *extra) -> list:
    return ["--export", export, "--backend", backend, "--precision", precision, "--out", out, *extra]


def _link_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """A copy of folder `src` made of hard links (files named in `skip` left out)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            os.link(f, dst / f.name)
    return dst


def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under root: relative path -> sha256 of its bytes ("dir" for a folder)."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def pipeline_export(tiny_export: Path, module_tmp) -> Path:
    """The tiny export laid out as artifacts/export: lm/ and decoder/ (hard links to the flat export's files)."""
    root = module_tmp.mktemp("pipeline_export") / "export"
    _link_tree(tiny_export, root / "lm", skip=(DECODER_ONNX, DECODER_CONFIG))
    _link_tree(tiny_export, root / "decoder", skip=(LM_ONNX, LM_CONFIG, *registry.TOKENIZER_FILES))
    return root


@pytest.fixture
def no_conversion(monkeypatch):
    """A tripwire: the test fails if the command gets as far as converting."""
    import pipeline_lib.convert as conv

    def tripwire(*a, **k):
        raise AssertionError("the conversion started although the input was bad")

    monkeypatch.setattr(conv, "convert_into", tripwire)


# --- settings and usage ---------------------------------------------------------------------------------------


def test_settings_are_conf_and_params():
    """ConvertSettings() (what the command converts with) is conf/convert/default.yaml and what the convert
    stage reads from params.yaml; a change to one without the other fails here."""
    conf = ConvertSettings.from_params(_conf("convert"))
    assert ConvertSettings() == conf, "pipeline_lib.convert DEFAULT_* differ from conf/convert/default.yaml"
    assert _stage_settings() == conf
    assert ConvertSettings.from_params({}) == ConvertSettings()
    a = ConvertSettings()
    a.onnx["int8"]["lm"]["weight_type"] = "qint8"  # a caller's edit does not leak into the next default
    assert ConvertSettings() == conf


def test_usage_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert", "--help"])
    assert exc.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())
    for part in ("--export DIR", "--backend {onnx,openvino}", "--precision {fp32,int8,bf16,int4}", "--out DIR",
                 "[--checkpoint DIR | --no-stateful]", "onnx-int8, openvino-fp32"):
        assert part in usage, part


# --- bad input: exit 2, the message, before any work, nothing written -----------------------------------------


def _refused(args: list, tmp_path: Path, *fragments: str, watch: tuple[Path, ...] = ()) -> str:
    """Run the command, expecting exit 2 with `fragments` in its error, and tmp_path (and `watch`) unchanged."""
    before = {p: _tree(p) for p in (tmp_path, *watch)}
    rc, out, err = run_cli(*args)
    assert rc == 2, (rc, out, err)
    assert err.startswith("error: ") or "error:" in err, err
    for f in fragments:
        assert f in err, (f, err)
    assert {p: _tree(p) for p in before} == before, "a refused command wrote files"
    return err


@pytest.mark.parametrize("backend, precision, message", [
    ("cuda", "int8", "unknown backend 'cuda'"),
    ("onnx", "int3", "unknown precision 'int3'"),
    ("onnx", "bf16", "unknown target onnx/bf16"),
])
def test_unknown_backend_precision_or_target_lists_the_targets(tiny_export, tmp_path, no_conversion, backend,
                                                               precision, message):
    _refused(_args(tiny_export, tmp_path / "out", backend, precision), tmp_path, message, TARGET_LIST)


def test_backend_aliases_are_accepted(tiny_export, tmp_path, no_conversion):
    """ort / ov / openvino_cpu name the registry's backends: the command gets as far as converting."""
    for backend in ("ort", "onnx_cpu", "ov", "openvino_cpu"):
        with pytest.raises(AssertionError, match="conversion started"):
            run_cli(*_args(tiny_export, tmp_path / "out", backend, "int8", "--no-stateful"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, fragments", [
    ("missing", ("does not exist", "soprano-onnx export --out DIR")),
    ("decoder_only", (LM_CONFIG, "export config not found", "soprano-onnx export")),
    ("lm_model_missing", (LM_ONNX, "missing")),
    ("no_tokenizer", (TOKENIZER_FILE, "tokenizer")),
    ("pipeline_decoder_missing", (DECODER_ONNX, "missing")),
    ("already_converted", ("already converted", "fp32 ONNX export")),
])
def test_missing_or_incomplete_export(tiny_export, tmp_path, no_conversion, case, fragments):
    src = tmp_path / "export"
    if case == "decoder_only":  # what `soprano-onnx export --decoder-only` writes
        _link_tree(tiny_export, src, skip=(LM_ONNX, LM_CONFIG, *registry.TOKENIZER_FILES))
    elif case == "lm_model_missing":
        _link_tree(tiny_export, src, skip=(LM_ONNX,))
    elif case == "no_tokenizer":
        _link_tree(tiny_export, src, skip=(TOKENIZER_FILE,))
    elif case == "pipeline_decoder_missing":
        _link_tree(tiny_export, src / "lm", skip=(DECODER_ONNX, DECODER_CONFIG))
        _link_tree(tiny_export, src / "decoder", skip=(DECODER_ONNX, LM_ONNX, LM_CONFIG))
    elif case == "already_converted":  # e.g. artifacts/onnx/int8 given as --export
        _link_tree(tiny_export, src, skip=(LM_CONFIG,))
        cfg = json.loads((tiny_export / LM_CONFIG).read_text())
        cfg["conversion"] = {"backend": "onnx", "precision": "int8", "file": LM_ONNX}
        (src / LM_CONFIG).write_text(json.dumps(cfg))
    err = _refused(_args(src, tmp_path / "out"), tmp_path, *fragments)
    assert f"--export {src}" in err


@pytest.mark.parametrize("case, fragments", [
    ("is_export", ("is the export folder",)),
    ("inside_export", ("inside the export folder",)),
    ("is_a_file", ("exists and is not a folder",)),
    ("under_a_file", ("is a file, so the folder cannot be created",)),
    ("lm_is_a_file", ("subfolder", "exists and is not a folder")),
    ("export_is_out_lm", ("is the export's folder",)),
])
def test_bad_out(tiny_export, tmp_path, no_conversion, case, fragments):
    export = _link_tree(tiny_export, tmp_path / "export")
    out = {"is_export": export, "inside_export": export / "int8", "is_a_file": tmp_path / "file",
           "under_a_file": tmp_path / "file" / "out", "lm_is_a_file": tmp_path / "out",
           "export_is_out_lm": tmp_path / "out"}[case]
    (tmp_path / "file").write_text("x")
    if case == "lm_is_a_file":
        out.mkdir()
        (out / "lm").write_text("not a folder")
    if case == "export_is_out_lm":  # a flat export in OUT/lm: the conversion would replace its files
        export = _link_tree(tiny_export, tmp_path / "out" / "lm")
    _refused(_args(export, out), tmp_path, "--out", *fragments)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_unwritable_out(tiny_export, tmp_path, no_conversion):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _refused(_args(tiny_export, locked / "out"), tmp_path, "not writable")
    finally:
        locked.chmod(0o700)


def test_checkpoint_only_for_openvino_and_a_real_one(tiny_export, tiny_checkpoint, tmp_path, no_conversion):
    _refused(_args(tiny_export, tmp_path / "out", "onnx", "int8", "--checkpoint", tiny_checkpoint), tmp_path,
             "--checkpoint", "leave --checkpoint out")
    _refused(_args(tiny_export, tmp_path / "out", "openvino", "int8", "--checkpoint", tmp_path / "none"), tmp_path,
             "--checkpoint", "does not exist", "leave --checkpoint out")
    rc, _, err = run_cli(*_args(tiny_export, tmp_path / "out", "openvino", "int8", "--checkpoint", tiny_checkpoint,
                                "--no-stateful"))
    assert rc == 2 and "not allowed with" in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_model(tiny_export, tiny_checkpoint, tmp_path, no_conversion):
    """The stateful LM must come from the export's own checkpoint: shapes that differ are refused."""
    export = _link_tree(tiny_export, tmp_path / "export", skip=(LM_CONFIG,))
    cfg = json.loads((tiny_export / LM_CONFIG).read_text())
    (export / LM_CONFIG).write_text(json.dumps(cfg | {"num_layers": cfg["num_layers"] + 1}))
    _refused(_args(export, tmp_path / "out", "openvino", "int8", "--checkpoint", tiny_checkpoint), tmp_path,
             "not the checkpoint the export was made from", f"num_layers {cfg['num_layers']} vs {cfg['num_layers'] + 1}")


@pytest.mark.parametrize("backend, stale", [
    ("openvino", f"{STATEFUL_FILE}.xml"),  # from_dir would load it instead of the new step IR
    ("onnx", f"{LM_FILE}.xml"),            # an OpenVINO conversion's IR beside a new ONNX model
])
def test_out_holding_another_conversion_is_refused(tiny_export, tmp_path, no_conversion, backend, stale):
    out = tmp_path / "out"
    (out / "lm").mkdir(parents=True)
    (out / "lm" / stale).write_text("<net/>")
    _refused(_args(tiny_export, out, backend, "int8"), tmp_path, "another conversion", stale, "Remove those files")


def test_missing_package_is_named_before_work(tiny_export, tmp_path, no_conversion, monkeypatch):
    import pipeline_lib.convert as conv

    def no_nncf():
        raise MissingBackendError("int8 OpenVINO conversion needs the nncf package: pip install 'soprano-onnx[export]'")

    monkeypatch.setattr(conv, "import_nncf", no_nncf)
    _refused(_args(tiny_export, tmp_path / "out", "openvino", "int8"), tmp_path, "nncf", "pip install")


# --- nothing lost (stand-in converters: the file handling without a real conversion) ---------------------------


def _fake_converter(fail_on: str | None = None):
    def convert(src: Path, dst: Path, model: str, precision, settings) -> dict:
        if model == fail_on:
            raise ExportError(f"simulated failure converting the {model}")
        from pipeline_lib.registry import MODELS

        name = f"{MODELS[model].file}.onnx"  # as the ONNX Runtime converters name it (the LM's source is its fused graph)
        (dst / name).write_bytes(b"converted " + model.encode())
        return {"method": "stand-in", "file": name}
    return convert


def test_failed_conversion_leaves_out_as_it_was(tiny_export, tmp_path, monkeypatch):
    import pipeline_lib.convert as conv

    monkeypatch.setattr(conv, "onnx_quantized", _fake_converter(fail_on="decoder"))  # after the LM was written
    out = tmp_path / "out"
    (out / "lm").mkdir(parents=True)
    (out / "lm" / LM_ONNX).write_bytes(b"an earlier conversion")
    (out / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    rc, _, err = run_cli(*_args(tiny_export, out))
    assert rc == 2 and "simulated failure converting the decoder" in err
    assert _tree(tmp_path) == before  # no replaced file, no temporary folder left


def test_only_the_written_files_are_replaced(tiny_export, tmp_path, monkeypatch):
    import pipeline_lib.convert as conv

    monkeypatch.setattr(conv, "onnx_quantized", _fake_converter())
    out = tmp_path / "out"
    (out / "lm").mkdir(parents=True)
    (out / "lm" / LM_ONNX).write_bytes(b"an earlier conversion")
    (out / "lm" / "mine.txt").write_text("kept")
    (out / "notes.txt").write_text("kept too")
    rc, stdout, err = run_cli(*_args(tiny_export, out))
    assert rc == 0, err
    assert (out / "lm" / LM_ONNX).read_bytes() == b"converted lm"
    assert (out / "decoder" / DECODER_ONNX).read_bytes() == b"converted decoder"
    assert (out / "lm" / "mine.txt").read_text() == "kept" and (out / "notes.txt").read_text() == "kept too"
    assert _files(out) == {"notes.txt"} and {p.name for p in out.iterdir() if p.is_dir()} == {"lm", "decoder"}
    planned = planned_files(registry.target("onnx", "int8"), False, tiny_export)
    assert _files(out / "lm") == planned["lm"] | {"mine.txt"} and _files(out / "decoder") == planned["decoder"]
    assert json.loads((out / "lm" / LM_CONFIG).read_text())["conversion"]["method"] == "stand-in"
    assert "convert onnx-int8 done" in stdout and "note:" not in stdout


def test_openvino_without_checkpoint_notes_the_step_ir(tiny_export, tmp_path, monkeypatch):
    import pipeline_lib.convert as conv

    monkeypatch.setattr(conv, "openvino_ir", _fake_converter())
    rc, stdout, err = run_cli(*_args(tiny_export, tmp_path / "a", "openvino", "fp32"))
    assert rc == 0, err
    assert "note: no --checkpoint" in stdout and "step IR only" in stdout and "--checkpoint DIR" in stdout
    rc, stdout, err = run_cli(*_args(tiny_export, tmp_path / "b", "openvino", "fp32", "--no-stateful"))
    assert rc == 0, err
    assert "note:" not in stdout
    assert not (tmp_path / "b" / "lm" / STATEFUL_CONFIG).exists()


def test_bf16_notes_a_cpu_without_bf16(tiny_export, tmp_path, monkeypatch):
    """bf16 converts on any CPU (the fp32 IR with a compile setting); where this CPU cannot run it, a note says so."""
    import pipeline_lib.convert as conv
    import pipeline_lib.cpuinfo as cpuinfo

    monkeypatch.setattr(conv, "openvino_ir", _fake_converter())
    monkeypatch.setattr(cpuinfo, "read_cpuinfo", lambda *a, **k: ("Old CPU", {"avx2", "avx512f"}))
    rc, stdout, err = run_cli(*_args(tiny_export, tmp_path / "out", "openvino", "bf16", "--no-stateful"))
    assert rc == 0, err
    assert "note: openvino-bf16" in stdout and "Old CPU" in stdout


# --- real conversions (slow) ------------------------------------------------------------------------------------


def _synth(folder: Path, backend: str, stateful: bool = True) -> tuple[dict, Path]:
    from pipeline_lib.runtime.tts import SopranoTTS

    tts = SopranoTTS.from_dir(folder, backend=backend, stateful=stateful, num_threads=1, warm_up=False)
    res = tts.synthesize(TEXT, max_new_tokens=32, temperature=0.0)
    assert res["audio"].size > 0 and np.isfinite(res["audio"]).all()
    return res, tts.lm_path


def _same_synthesis(a: dict, b: dict) -> None:
    assert a["num_tokens"] == b["num_tokens"] and a["hidden_lengths"] == b["hidden_lengths"]
    assert a["audio"].shape == b["audio"].shape
    assert float(np.abs(a["audio"] - b["audio"]).max()) < 1e-5


def _parity(folder: Path, tiny_export: Path, precision: str, lm_file: str | None = None):
    """The parity_convert stage's check of a quantised target: against the fp32 export, the limits of
    conf/parity convert_<precision>."""
    from pipeline_lib.audio.istft import IstftConfig
    from pipeline_lib.parity import model_file, runner_for
    from pipeline_lib.parity_quant import QuantParityThresholds, check_quantized

    th = QuantParityThresholds.from_mapping(_conf("parity")[f"convert_{precision}"])
    lm = folder / "lm" / lm_file if lm_file else model_file(folder / "lm", "lm")
    return check_quantized(runner_for(tiny_export / LM_ONNX), runner_for(lm), runner_for(tiny_export / DECODER_ONNX),
                           runner_for(model_file(folder / "decoder", "decoder")),
                           json.loads((tiny_export / LM_CONFIG).read_text()),
                           IstftConfig.from_json(tiny_export / DECODER_CONFIG), th)


def _config_without_times(path: Path) -> dict:
    cfg = json.loads(path.read_text())
    for block in (cfg, cfg.get("onnx") or {}):
        if "conversion" in block:
            block["conversion"].pop("seconds", None)
    return cfg


@pytest.fixture(scope="module")
def onnx_int8(tiny_export: Path, pipeline_export: Path, module_tmp) -> dict:
    """onnx-int8 three ways: the CLI in its own process from the flat export (into an OUT that holds files of
    its own), the CLI from the pipeline folder, and the convert stage's code (params.yaml settings)."""
    root = module_tmp.mktemp("onnx_int8")
    flat = root / "flat"
    (flat / "lm").mkdir(parents=True)
    (flat / "notes.txt").write_text("mine")
    (flat / "lm" / "mine.txt").write_text("mine too")
    proc = subprocess.run([sys.executable, "-m", "pipeline_lib.cli", "convert", *map(str, _args(tiny_export, flat))],
                          capture_output=True, text=True, timeout=600)
    rc, _, err = run_cli(*_args(pipeline_export, root / "pipe"))
    assert rc == 0, err
    convert_target("onnx", "int8", pipeline_export / "decoder", pipeline_export / "lm", root / "stage", _stage_settings())
    return {"flat": flat, "pipe": root / "pipe", "stage": root / "stage", "proc": proc}


@pytest.mark.slow
def test_onnx_int8_cli_progress_and_kept_files(onnx_int8):
    proc = onnx_int8["proc"]
    assert proc.returncode == 0, proc.stderr
    for line in ("lm onnx-int8: converting", "decoder onnx-int8: converting", "MB ->"):
        assert line in proc.stderr, line
    assert "convert onnx-int8 done in" in proc.stdout and "SopranoTTS.from_dir(" in proc.stdout
    flat = onnx_int8["flat"]
    assert (flat / "notes.txt").read_text() == "mine" and (flat / "lm" / "mine.txt").read_text() == "mine too"
    assert not [p for p in flat.rglob(".*")]  # no temporary folder left


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["flat", "pipe"])
def test_onnx_int8_is_the_stage_folder(onnx_int8, layout):
    """Same files as the convert stage writes, the models byte for byte, the configs but for the timings."""
    got, stage = onnx_int8[layout], onnx_int8["stage"]
    for sub in ("lm", "decoder"):
        assert _files(got / sub) - {"mine.txt"} == _files(stage / sub), sub
        for name in _files(stage / sub):
            if name in (LM_CONFIG, DECODER_CONFIG, STATEFUL_CONFIG):
                assert _config_without_times(got / sub / name) == _config_without_times(stage / sub / name), name
            else:
                assert (got / sub / name).read_bytes() == (stage / sub / name).read_bytes(), name
    lm = json.loads((got / "lm" / LM_CONFIG).read_text())
    assert lm["conversion"]["settings"] == _conf("convert")["onnx"]["int8"]["lm"]


@pytest.mark.slow
def test_onnx_int8_loads_and_speaks_as_the_stage_folder(onnx_int8, tiny_export):
    ours, lm_path = _synth(onnx_int8["flat"], "onnx")
    assert lm_path == onnx_int8["flat"] / "lm" / LM_ONNX
    stage, _ = _synth(onnx_int8["stage"], "onnx")
    _same_synthesis(ours, stage)
    report = _parity(onnx_int8["flat"], tiny_export, "int8")
    assert report.passed, report.failures


@pytest.fixture(scope="module")
def openvino_int8(tiny_checkpoint: Path, tiny_export: Path, pipeline_export: Path,
                  module_tmp) -> dict:
    """openvino-int8 by the CLI: from the pipeline folder with --checkpoint (step IR + stateful LM), and from
    the flat export without (step IR only)."""
    pytest.importorskip("openvino")
    root = module_tmp.mktemp("openvino_int8")
    rc, out_pipe, err = run_cli(*_args(pipeline_export, root / "pipe", "openvino", "int8", "--checkpoint", tiny_checkpoint))
    assert rc == 0, err
    rc, out_flat, err = run_cli(*_args(tiny_export, root / "flat", "openvino", "int8"))
    assert rc == 0, err
    return {"pipe": root / "pipe", "flat": root / "flat", "stdout_pipe": out_pipe, "stdout_flat": out_flat}


@pytest.mark.slow
def test_openvino_int8_folders(openvino_int8, tiny_export):
    pipe, flat = openvino_int8["pipe"], openvino_int8["flat"]
    target = registry.target("openvino", "int8")
    assert _files(pipe / "lm") == planned_files(target, True, tiny_export)["lm"]
    assert _files(flat / "lm") == planned_files(target, False, tiny_export)["lm"]
    decoder_files = {f"{DECODER_FILE}.xml", f"{DECODER_FILE}.bin", DECODER_CONFIG}
    assert _files(pipe / "decoder") == _files(flat / "decoder") == decoder_files
    for sub, stem in (("lm", LM_FILE), ("decoder", DECODER_FILE)):  # same weights whichever layout
        assert (pipe / sub / f"{stem}.bin").read_bytes() == (flat / sub / f"{stem}.bin").read_bytes()
    stateful_cfg = json.loads((pipe / "lm" / STATEFUL_CONFIG).read_text())
    assert stateful_cfg["kv_cache"] == registry.KV_CACHE_STATE
    assert "note: no --checkpoint" in openvino_int8["stdout_flat"]
    assert "note:" not in openvino_int8["stdout_pipe"] and "lm_stateful:" in openvino_int8["stdout_pipe"]


@pytest.mark.slow
def test_openvino_int8_loads_speaks_and_passes_parity(openvino_int8, tiny_export):
    pipe, flat = openvino_int8["pipe"], openvino_int8["flat"]
    _, lm_path = _synth(pipe, "openvino")
    assert lm_path == pipe / "lm" / f"{STATEFUL_FILE}.xml"  # what from_dir prefers
    step_pipe, _ = _synth(pipe, "openvino", stateful=False)
    step_flat, lm_path = _synth(flat, "openvino")
    assert lm_path == flat / "lm" / f"{LM_FILE}.xml"  # no stateful LM: the step IR
    _same_synthesis(step_pipe, step_flat)
    report = _parity(pipe, tiny_export, "int8")
    assert report.passed, report.failures
    stateful = _parity(pipe, tiny_export, "int8", f"{STATEFUL_FILE}.xml")
    assert stateful.passed, stateful.failures


@pytest.mark.slow
def test_onnx_int4_from_the_flat_export(tiny_export, tmp_path):
    out = tmp_path / "out"
    rc, _, err = run_cli(*_args(tiny_export, out, "onnx", "int4"))
    assert rc == 0, err
    conversion = json.loads((out / "lm" / LM_CONFIG).read_text())["conversion"]
    assert conversion["precision"] == "int4" and conversion["settings"] == _conf("convert")["onnx"]["int4"]["lm"]
    _synth(out, "onnx")
    report = _parity(out, tiny_export, "int4")
    assert report.passed, report.failures
    assert report.metrics["lm_hidden_cosine_mean"] < 0.999  # 4-bit weights: not the fp32 model

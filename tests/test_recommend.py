"""Model choices: registry.Choice, pipeline_lib.recommend (the rule behind precision="auto"), from_dir(ROOT,
precision=...) with an LM and a decoder from different backends, speak --precision, benchmark pairs, and
the report's recommendation."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib import recommend, registry
from pipeline_lib.errors import InputError, ModelFileError, UnsupportedCpuError

AVX2 = {"avx2", "fma"}
ZEN5 = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16"}
AMX = ZEN5 | {"amx_bf16", "amx_int8", "amx_tile"}


def certify(folder: Path, label: str, failures: tuple[str, ...] = ()) -> None:
    """A certificate for the files in `folder` (a stand-in for parity_convert's: no measurement)."""
    from pipeline_lib import certificate

    t = registry.choice(label).lm
    identity = {"name": "tiny", "source": "random", "random_weights": True}
    certificate.write(folder, certificate.build(t, identity, certificate.model_files(folder), reference="test",
                                                limits={}, metrics={}, failures=failures))


def _fake_root(root: Path, labels: list[str]) -> Path:
    """Empty model files laid out as artifacts/, each target with a passed certificate (enough for pick,
    which only looks at files and certificates)."""
    for label in labels:
        t = registry.choice(label).lm
        suffix = registry.backend(t.backend).suffix
        base = root / ("export" if (t.backend, t.precision) == registry.EXPORT_TARGET else f"{t.backend}/{t.precision}")
        for which in (registry.LM_DIR, registry.DECODER_DIR):
            (base / which).mkdir(parents=True, exist_ok=True)
            (base / which / f"{registry.MODELS[which].file}{suffix}").write_text("")
        certify(base, label)
    return root


# --- registry.Choice ------------------------------------------------------------------------------------------


def test_choice_labels_and_pairs():
    c = registry.choice("onnx-int4+openvino-bf16")
    assert (c.lm.label, c.decoder.label, c.label) == ("onnx-int4", "openvino-bf16", "onnx-int4+openvino-bf16")
    assert (c.backend, c.precision) == ("onnx+openvino", "int4+bf16")
    one = registry.choice("openvino-int8")
    assert one.lm == one.decoder and one.label == "openvino-int8" and one.targets == (one.lm,)
    for bad in ("onnx-bf16", "onnx-int4+", "a+b+c", "", "int8"):
        with pytest.raises(InputError, match="target|choice"):
            registry.choice(bad)


def test_folders_under_map_the_artifacts_layout(tmp_path):
    assert registry.folders_under(tmp_path, "onnx", "fp32") == (tmp_path / "export", tmp_path / "onnx/fp32")
    assert registry.folders_under(tmp_path, "openvino", "int8") == (tmp_path / "openvino/int8",)


# --- the rule --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, cls", [(AVX2, "avx2"), (ZEN5, "avx512_bf16"), (AMX, "amx"),
                                        ({"avx2", "avx_vnni"}, "vnni"), ({"sse4_2"}, "baseline"), (set(), "baseline")])
def test_cpu_class(flags, cls):
    assert recommend.cpu_class(flags) == cls


def test_every_rule_names_real_choices_for_every_objective():
    for cls, _ in recommend.CPU_CLASSES:
        assert set(recommend.RULES[cls]) == set(recommend.OBJECTIVES)
        for objective in recommend.OBJECTIVES:
            choices = recommend.rule(cls, objective)
            assert choices and choices[-1].label in ("onnx-fp32", "onnx-int8")  # always something to fall back on
            if cls not in ("amx", "avx512_bf16"):
                assert all(recommend.runnable(c, set()) is None or "bf16" not in c.label for c in choices)


def test_pick_takes_the_first_present_and_runnable(tmp_path):
    root = _fake_root(tmp_path, ["onnx-fp32", "onnx-int8", "openvino-int8", "openvino-bf16", "onnx-int4"])
    # AVX2: ONNX Runtime int4 first
    p = recommend.pick(root, "stream", AVX2, "Test CPU")
    assert p.choice.label == "onnx-int4" and p.cpu_class == "avx2" and "Test CPU" in p.reason
    # AMX, stream: the pair int4 LM + bf16 decoder, both present
    assert recommend.pick(root, "stream", AMX).choice.label == "onnx-int4+openvino-bf16"
    assert recommend.pick(root, "batch", AMX).choice.label == "openvino-int8"
    # without onnx-int4 on an AVX2 CPU: the next of the rule, and the reason says what was skipped
    root2 = _fake_root(tmp_path / "b", ["onnx-fp32", "onnx-int8", "openvino-bf16"])
    p2 = recommend.pick(root2, "stream", AVX2)
    assert p2.choice.label == "onnx-int8" and "onnx-int4 (not built" in p2.reason


def test_pick_never_picks_bf16_without_bf16_flags(tmp_path):
    root = _fake_root(tmp_path, ["openvino-bf16", "onnx-fp32"])
    c = registry.choice("onnx-fp32+openvino-bf16")
    assert "bf16" in recommend.runnable(c, AVX2) and recommend.runnable(c, AMX) is None
    for objective in recommend.OBJECTIVES:
        assert "bf16" not in recommend.pick(root, objective, ZEN5 - {"avx512_bf16"}).choice.label


def test_pick_without_models_names_what_it_looked_for(tmp_path):
    with pytest.raises(ModelFileError, match="onnx-int8 .not built under.*soprano-onnx convert"):
        recommend.pick(tmp_path, "stream", AVX2)
    with pytest.raises(InputError, match="objective 'speed'"):
        recommend.pick(tmp_path, "speed", AVX2)


def test_fastest_respects_quality_and_direction():
    rows = [{"choice": "onnx-int8", "xrt": 10.0, "first_chunk_ms": 50.0, "batch8_xrt": 30.0},
            {"choice": "onnx-int4", "xrt": 12.0, "first_chunk_ms": 40.0, "batch8_xrt": math.nan},
            {"choice": "openvino-int8", "xrt": 20.0, "first_chunk_ms": 30.0, "batch8_xrt": 60.0}]
    passed = ["onnx-int8", "onnx-int4"]
    assert recommend.fastest(rows, "stream", passed)["choice"] == "onnx-int4"
    assert recommend.fastest(rows, "first_chunk", passed)["choice"] == "onnx-int4"
    assert recommend.fastest(rows, "batch", passed)["choice"] == "onnx-int8"  # NaN is no figure
    assert recommend.fastest(rows, "stream", [])is None


# --- the runtime: from_dir(ROOT, precision=...) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tiny_export: Path, module_tmp) -> Path:
    """A ROOT as after dvc repro (tiny): export/ (= onnx-fp32), onnx/int8 and openvino/int8 (step IR only)."""
    pytest.importorskip("openvino")
    import shutil

    from pipeline_lib.convert import ConvertSettings, convert_target
    from pipeline_lib.config import compose

    settings = ConvertSettings.from_params(compose()["convert"])
    r = module_tmp.mktemp("root")
    for which in (registry.LM_DIR, registry.DECODER_DIR):
        shutil.copytree(tiny_export, r / "export" / which)
    for backend in ("onnx", "openvino"):
        convert_target(backend, "int8", tiny_export, tiny_export, r / backend / "int8", settings)
        certify(r / backend / "int8", f"{backend}-int8")
    certify(r / "export", "onnx-fp32")
    return r


def test_from_dir_loads_a_pair_across_backends(root):
    from pipeline_lib.runtime.tts import SopranoTTS

    pair = SopranoTTS.from_dir(root, precision="onnx-int8+openvino-int8", num_threads=1)
    assert pair.choice.label == "onnx-int8+openvino-int8"
    assert (pair.backend, pair.decoder_backend) == ("onnx_cpu", "openvino_cpu")
    assert pair.lm_path == root / "onnx/int8/lm/soprano_lm_step.onnx"
    assert pair.decoder_path == root / "openvino/int8/decoder/soprano_decoder_preistft.xml"
    onnx = SopranoTTS.from_dir(root, precision="onnx-int8", num_threads=1)
    ov = SopranoTTS.from_dir(root, precision="openvino-int8", num_threads=1, stateful=False)
    text = "Hello there, how are you?"
    a_pair = pair.synthesize(text, max_new_tokens=24)["audio"]
    a_onnx = onnx.synthesize(text, max_new_tokens=24)["audio"]
    a_ov = ov.synthesize(text, max_new_tokens=24)["audio"]
    assert len(a_pair) == len(a_onnx) == len(a_ov) > 0
    from pipeline_lib.runtime.backends import OpenVinoDecoder, OrtLM

    assert isinstance(pair.lm, OrtLM) and isinstance(pair.decoder, OpenVinoDecoder)
    # the pair's LM is ONNX Runtime's (the same tokens as onnx-int8), its decoder OpenVINO's int8: close to
    # onnx-int8's audio (two int8 decoders), not equal to it
    snr = 10 * np.log10(np.sum(a_onnx.astype(np.float64) ** 2) / np.sum((a_pair - a_onnx).astype(np.float64) ** 2))
    print(f"pair vs onnx-int8 audio SNR {snr:.1f} dB")
    assert 15.0 < snr < 200.0


def test_from_dir_auto_logs_what_it_picked_and_why(root, caplog):
    from pipeline_lib.runtime.tts import SopranoTTS

    with caplog.at_level(logging.INFO, logger="pipeline_lib.runtime.model_files"):
        tts = SopranoTTS.from_dir(root, precision="auto", num_threads=1, warm_up=False)
    expected = recommend.pick(root, "stream")
    assert tts.choice == expected.choice
    assert any("precision auto" in r.message and expected.choice.label in r.message and "class" in r.message
               for r in caplog.records)


def test_from_dir_precision_errors(root, tmp_path):
    from pipeline_lib.runtime.tts import SopranoTTS

    with pytest.raises(InputError, match="leave backend"):
        SopranoTTS.from_dir(root, precision="onnx-int8", backend="openvino_cpu")
    with pytest.raises(ModelFileError, match="no lm of onnx-int4.*convert@onnx-int4"):
        SopranoTTS.from_dir(root, precision="onnx-int4", num_threads=1)
    with pytest.raises(ModelFileError, match="model folder not found"):
        SopranoTTS.from_dir(tmp_path / "missing", precision="auto")
    with pytest.raises(InputError, match="objective"):
        SopranoTTS.from_dir(root, precision="onnx-int8", objective="fast")
    from pipeline_lib.cpuinfo import read_cpuinfo

    if recommend.runnable(registry.choice("openvino-bf16"), read_cpuinfo()[1]):
        with pytest.raises(UnsupportedCpuError, match="bf16"):
            SopranoTTS.from_dir(root, precision="onnx-int8+openvino-bf16", num_threads=1)


def test_speak_with_precision(root, tmp_path):
    import soundfile as sf

    from pipeline_lib.cli import main

    out = tmp_path / "o.wav"
    assert main(["speak", "Hello there.", "-o", str(out), "--model", str(root), "--precision",
                 "onnx-int8+openvino-int8", "--threads", "1", "--max-new-tokens", "16"]) == 0
    audio, sr = sf.read(out)
    assert sr == 32000 and len(audio) > 0 and np.max(np.abs(audio)) > 0
    assert main(["speak", "Hi.", "-o", str(tmp_path / "b.wav"), "--model", str(root), "--precision", "auto",
                 "--backend", "onnx"]) == 2
    assert not (tmp_path / "b.wav").exists()
    assert main(["speak", "Hi.", "-o", str(tmp_path / "c.wav"), "--model", str(root), "--objective", "batch"]) == 2


# --- the benchmark's pairs and the report -----------------------------------------------------------------------


def test_bench_plan_adds_pairs_at_the_last_thread_count(tmp_path):
    from pipeline_lib.bench.sweep import job_argv, plan, Settings

    root = tmp_path
    for label in ("onnx-int4", "openvino-int8"):
        t = registry.choice(label).lm
        for which in ("lm", "decoder"):
            (root / "artifacts" / t.backend / t.precision / which).mkdir(parents=True)
    for which in ("lm", "decoder"):
        (root / "artifacts/export" / which).mkdir(parents=True)
    jobs = plan(root, tmp_path, [1, 2], backends=["onnx"], pairs=["onnx-int4+openvino-int8"])
    pair = [j for j in jobs if j.pair]
    assert [j.label for j in pair] == ["onnx-int4+openvino-int8-t2"]
    assert pair[0].names[1:] == ("onnx+openvino", "int4+int8")
    argv = job_argv(pair[0], Settings(), tmp_path / "x.json")
    assert argv[argv.index("--decoder_backend") + 1] == "openvino"
    assert str(pair[0].decoder).endswith("openvino/int8/decoder") and str(pair[0].lm).endswith("onnx/int4/lm")
    with pytest.raises(Exception, match="onnx-int8.*not found"):
        plan(root, tmp_path, [2], backends=["onnx"], pairs=["onnx-int8+openvino-int8"])


def test_report_names_the_fastest_that_passed_and_the_rule():
    from pipeline_lib.environment import Environment
    from pipeline_lib.report import recommendation_lines

    rows = [dict(config="onnx-int8-t2", backend="onnx", precision="int8", threads=2, xrt=10.0, first_chunk_ms=40.0,
                 batch8_xrt=30.0),
            dict(config="onnx-int4-t2", backend="onnx", precision="int4", threads=2, xrt=14.0, first_chunk_ms=45.0,
                 batch8_xrt=28.0),
            dict(config="openvino-int8-t2", backend="openvino", precision="int8", threads=2, xrt=20.0,
                 first_chunk_ms=40.0, batch8_xrt=50.0),
            dict(config="onnx-int8-t1", backend="onnx", precision="int8", threads=1, xrt=99.0, first_chunk_ms=1.0,
                 batch8_xrt=99.0)]
    parity = {"onnx_int8": {"lm_hidden_cosine_min": 0.99}, "onnx_int4": {"lm_hidden_cosine_min": 0.9},
              "openvino_int8": {"skipped_no_bf16_cpu": 1.0}}
    env = Environment(cpu="Test CPU (avx2)", logical_cpus=2, physical_cores=2, python="3", libraries={}, date="d",
                      origin="benchmark", cpu_flags=["avx2"])
    text = "\n".join(recommendation_lines(rows, parity, env, 2))
    # openvino-int8 is fastest but did not pass quality here; the t1 row is at another thread count
    assert "| single stream (x real time) | onnx-int4 | 14 | onnx-int4 | agree |" in text
    assert "| streaming first chunk (ms) | onnx-int8 | 40 | onnx-int4 | differ: the rule's pick measured 45 |" in text
    assert "| batch of 8 (x real time) | onnx-int8 | 30 | onnx-int8 | agree |" in text
    assert "openvino-int8 (not checked on this CPU" in text and "class `avx2`" in text


def test_server_loads_a_pair_for_batching(root):
    """serve --precision: the server's loader takes the pair from ROOT with OpenVINO's step IR (not the stateful
    LM, which the batching scheduler cannot use), and batched greedy audio equals the pair's own synthesis."""
    from pipeline_lib.runtime.scheduler import BatchScheduler, SpeechRequest
    from pipeline_lib.server.app import _load_tts
    from pipeline_lib.server.settings import Settings

    tts = _load_tts(Settings(model=root, precision="openvino-int8+onnx-fp32", threads=1))
    assert tts.choice.label == "openvino-int8+onnx-fp32"
    assert tts.lm_path.name == "soprano_lm_step.xml" and tts.decoder_path.suffix == ".onnx"
    sched = BatchScheduler(tts, max_batch=4).start()
    try:
        jobs = [sched.submit(SpeechRequest(text, max_new_tokens=20)) for text in ("Hello there.", "Good morning.")]
        for job, text in zip(jobs, ("Hello there.", "Good morning.")):
            got = np.concatenate(list(job))
            want = tts.synthesize(text, max_new_tokens=20)["audio"]
            assert len(got) == len(want) > 0
            assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    finally:
        sched.close()
    from pipeline_lib.cli import main

    assert main(["serve", "--model", str(root), "--precision", "auto", "--backend", "onnx"]) == 2
    assert main(["serve", "--model", str(root), "--precision", "onnx-int3"]) == 2


def test_params_check_pairs_against_what_the_run_builds():
    from pipeline_lib.config import compose, validate_params

    params = compose()
    validate_params(params)  # the committed composition is fine
    narrowed = compose(["convert.precisions=[fp32,int8]", "bench.backends=[onnx,torch]"])
    narrowed["convert"]["targets"] = {k: v for k, v in narrowed["convert"]["targets"].items()
                                      if k.endswith(("fp32", "int8"))}
    with pytest.raises(InputError) as e:
        validate_params(narrowed)
    assert "not built: onnx-int4" in str(e.value) and "not there: openvino" in str(e.value)
    twice = compose(["bench.pairs=[onnx-int4+openvino-int8,onnx-int4+openvino-int8]"])
    with pytest.raises(InputError, match="each pair once"):
        validate_params(twice)


def test_fp32_certificate_covers_the_export_the_runtime_loads(tmp_path):
    """onnx-fp32 loads from ROOT/export (first of its folders) while parity_convert certifies ROOT/onnx/fp32:
    an export rebuilt after the certificate leaves it stale, not passed."""
    t = registry.choice("onnx-fp32").lm
    for base in (tmp_path / "export", tmp_path / "onnx/fp32"):
        for which in (registry.LM_DIR, registry.DECODER_DIR):
            (base / which).mkdir(parents=True)
            (base / which / f"{registry.MODELS[which].file}.onnx").write_text(f"{which} graph")
            (base / which / "config.json").write_text(base.name)  # configs differ by design (conversion record)
    certify(tmp_path / "onnx/fp32", "onnx-fp32")
    assert registry.model_dir_under(tmp_path, "onnx", "fp32", registry.LM_DIR) == tmp_path / "export/lm"
    assert recommend.certificate_of(tmp_path, t).state == "passed"
    (tmp_path / "export/lm" / f"{registry.LM_FILE}.onnx").write_text("rebuilt graph")
    status = recommend.certificate_of(tmp_path, t)
    assert status.state == "stale" and "export/lm" in status.why
    with pytest.raises(ModelFileError, match="stale"):
        recommend.pick(tmp_path, "stream", AVX2)

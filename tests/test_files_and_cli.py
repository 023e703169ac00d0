"""Nothing lost, nothing corrupted: what the CLI and the atomic-output helpers do to files around them,
the modes of what they write, and bad arguments and params failing before any work (tiny checkpoint)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline_lib.cli import main as cli_main
from pipeline_lib.errors import InputError
from pipeline_lib.export.decoder import DECODER_CONFIG, DECODER_ONNX
from pipeline_lib.export.lm import LM_CONFIG, LM_ONNX

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hello there, this is a test. And a second sentence."


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root: (bytes, mode), by relative path."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _user_files(root: Path) -> dict[str, tuple[bytes, int]]:
    (root / "sub").mkdir(parents=True)
    (root / "thesis.txt").write_text("my thesis, not a model\n")
    (root / "sub" / "rec.wav").write_bytes(b"RIFF not really a wav")
    return _snapshot(root)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# 1. `soprano-onnx export --out DIR` replaces only the files it writes.

def test_export_into_a_folder_keeps_its_other_files(tiny_checkpoint, tmp_path, umask_022):
    out = tmp_path / "mine"
    before = _user_files(out)
    assert cli_main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--lm-only"]) == 0
    after = _snapshot(out)
    assert {k: after[k] for k in before} == before  # byte-identical, same modes
    assert {LM_ONNX, LM_CONFIG, "tokenizer.json"} <= set(after)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_decoder_only_then_lm_only_gives_a_loadable_folder(tiny_checkpoint, tmp_path):
    from pipeline_lib.runtime.tts import SopranoTTS

    out = tmp_path / "onnx"
    assert cli_main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--decoder-only"]) == 0
    decoder = (out / DECODER_ONNX).read_bytes()
    assert cli_main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--lm-only"]) == 0
    assert (out / DECODER_ONNX).read_bytes() == decoder and (out / DECODER_CONFIG).is_file()
    tts = SopranoTTS.from_dir(out, num_threads=1)
    assert len(tts.synthesize("Hello there.", max_new_tokens=4)["audio"]) > 0


def test_export_to_the_current_directory_keeps_its_files(tiny_checkpoint, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_bytes(b"\x00keep me\n")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["export", "--checkpoint", str(tiny_checkpoint), "--out", ".", "--decoder-only"]) == 0
    assert (tmp_path / "notes.txt").read_bytes() == b"\x00keep me\n"
    assert (tmp_path / DECODER_ONNX).is_file()


def test_failed_export_into_a_folder_changes_nothing(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "model.safetensors").write_bytes(b"broken")
    out = tmp_path / "mine"
    _user_files(out)
    (out / LM_ONNX).write_bytes(b"an older export")
    before = _snapshot(out)
    assert cli_main(["export", "--checkpoint", str(bad), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(["sub", "thesis.txt", LM_ONNX])


def test_export_out_is_a_file(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert cli_main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "f") in err and "not a folder" in err
    assert (tmp_path / "f").read_text() == "x"


def test_atomic_files_merges_subfolders_and_keeps_the_rest(tmp_path):
    from pipeline_lib.fsutil import atomic_files

    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "old.txt").write_text("old")
    (out / "a" / "same.txt").write_text("to be replaced")
    with atomic_files(out) as tmp:
        (tmp / "a").mkdir()
        (tmp / "a" / "same.txt").write_text("new")
        (tmp / "b").mkdir()
        (tmp / "b" / "c.txt").write_text("c")
    assert (out / "a" / "old.txt").read_text() == "old"
    assert (out / "a" / "same.txt").read_text() == "new"
    assert (out / "b" / "c.txt").read_text() == "c"
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    with pytest.raises(RuntimeError), atomic_files(out) as tmp:
        (tmp / "a").mkdir()
        (tmp / "a" / "same.txt").write_text("never")
        raise RuntimeError("fails mid-way")
    assert (out / "a" / "same.txt").read_text() == "new" and sorted(p.name for p in out.iterdir()) == ["a", "b"]


def test_atomic_dir_still_replaces_the_whole_folder(tmp_path):
    """Stage outs are the stage's own: atomic_dir keeps replacing the folder as a whole."""
    from pipeline_lib.fsutil import atomic_dir

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("stale")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "fresh.txt").write_text("fresh")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fresh.txt"]


# 2. Modes follow the umask, not tempfile's private 0600 / 0700.

@pytest.mark.parametrize("umask, fmode, dmode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_written_files_and_folders_get_the_umask_modes(tmp_path, umask, fmode, dmode):
    import tempfile

    from pipeline_lib.fsutil import atomic_dir, atomic_file, atomic_files, write_json

    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "f.bin") as tmp:
            tmp.write_bytes(b"x")
        write_json(tmp_path / "m.json", {"a": 1})
        with atomic_dir(tmp_path / "stage_out") as tmp:
            (tmp / "plain.txt").write_text("x")
            fd, name = tempfile.mkstemp(dir=tmp)  # 0600, as a library writing through a temp file leaves it
            os.close(fd)
            os.replace(name, tmp / "via_mkstemp.txt")
        with atomic_files(tmp_path / "cli_out") as tmp:
            (tmp / "a.txt").write_text("x")
        (tmp_path / "existing").mkdir()
        with atomic_files(tmp_path / "existing") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "b.txt").write_text("x")
    finally:
        os.umask(old)
    def mode(relative: str) -> int:
        return (tmp_path / relative).stat().st_mode & 0o777

    for f in ("f.bin", "m.json", "stage_out/plain.txt", "stage_out/via_mkstemp.txt", "cli_out/a.txt",
              "existing/sub/b.txt"):
        assert mode(f) == fmode, (f, oct(mode(f)))
    for d in ("stage_out", "cli_out", "existing/sub"):
        assert mode(d) == dmode, (d, oct(mode(d)))


def test_exported_model_files_are_readable_by_all_under_umask_022(tiny_checkpoint, tmp_path, umask_022):
    out = tmp_path / "new"
    assert cli_main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--decoder-only"]) == 0
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        name: 0o644 for name in (DECODER_ONNX, DECODER_CONFIG, "tokenizer.json", "tokenizer_config.json",
                                 "special_tokens_map.json") if (out / name).exists()}


# 3. Output paths are checked before synthesis; WAVs are written atomically.

@pytest.fixture(scope="module")
def tts(tiny_export):
    from pipeline_lib.runtime.tts import SopranoTTS

    return SopranoTTS.from_dir(tiny_export, num_threads=1)


@pytest.fixture
def no_synthesis(monkeypatch):
    """Synthesis raises: a check that must come first shows it did."""
    from pipeline_lib.runtime.tts import SopranoTTS

    def fail(*_a, **_k):
        raise AssertionError("synthesis ran before the output was checked")

    for name in ("synthesize", "infer_stream", "_run"):
        monkeypatch.setattr(SopranoTTS, name, fail)


def _speak(tiny_export, out, *extra):
    return cli_main(["speak", TEXT, "-o", str(out), "--model", str(tiny_export), "--threads", "1", *extra])


@pytest.mark.parametrize("stream", [False, True])
def test_speak_into_a_missing_folder_fails_before_synthesis(tiny_export, tmp_path, capsys, no_synthesis, stream):
    out = tmp_path / "nodir" / "o.wav"
    assert _speak(tiny_export, out, *(["--stream"] if stream else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(out) in err and "mkdir -p" in err
    assert not (tmp_path / "nodir").exists()


def test_speak_onto_a_folder_fails_before_synthesis(tiny_export, tmp_path, capsys, no_synthesis):
    assert _speak(tiny_export, tmp_path) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "is a folder" in err


def test_infer_checks_out_path_and_infer_batch_out_dir_first(tts, tmp_path, no_synthesis):
    with pytest.raises(InputError, match="nodir"):
        tts.infer(TEXT, out_path=tmp_path / "nodir" / "x.wav")
    with pytest.raises(InputError, match="is a folder"):
        tts.infer(TEXT, out_path=tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        tts.infer_batch([TEXT, TEXT], out_dir=tmp_path / "file")
    with pytest.raises(InputError, match="is a file"):
        tts.infer_batch([TEXT], out_dir=tmp_path / "file" / "below")
    (tmp_path / "wavs" / "1.wav").mkdir(parents=True)
    with pytest.raises(InputError, match="1.wav"):
        tts.infer_batch([TEXT, TEXT], out_dir=tmp_path / "wavs")


def test_infer_batch_creates_a_missing_out_dir(tts, tmp_path):
    tts.infer_batch(["Hello there.", TEXT], out_dir=tmp_path / "a" / "b", max_new_tokens=4)
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["0.wav", "1.wav"]


def test_write_wav_failure_leaves_the_old_file(tmp_path, monkeypatch):
    from pipeline_lib.runtime.tts import write_wav

    out = tmp_path / "o.wav"
    write_wav(out, np.zeros(100, np.float32), 32000)
    old = out.read_bytes()

    def broken(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wave.Wave_write, "writeframes", broken)
    with pytest.raises(OSError):
        write_wav(out, np.ones(200, np.float32), 32000)
    assert out.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.wav"]


def test_speak_stream_failure_leaves_the_old_file(tiny_export, tmp_path, monkeypatch):
    from pipeline_lib.runtime.tts import SopranoTTS

    out = tmp_path / "o.wav"
    out.write_bytes(b"yesterday's recording")

    def chunks(self, *_a, **_k):
        yield np.zeros(2048, np.float32)
        raise RuntimeError("the backend died mid-stream")

    monkeypatch.setattr(SopranoTTS, "infer_stream", chunks)
    with pytest.raises(RuntimeError):
        _speak(tiny_export, out, "--stream")
    assert out.read_bytes() == b"yesterday's recording"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.wav"]


def test_speak_stream_writes_the_wav(tiny_export, tmp_path, umask_022):
    out = tmp_path / "s.wav"
    assert _speak(tiny_export, out, "--stream", "--max-new-tokens", "4") == 0
    with wave.open(str(out)) as w:
        assert w.getnframes() > 0 and w.getframerate() == 32000
    assert out.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("ext, fmt, subtype, rate", [(".wav", "WAV", "PCM_16", 32000), (".flac", "FLAC", "PCM_16", 32000),
                                                    (".mp3", "MP3", "MPEG_LAYER_III", 32000),
                                                    (".ogg", "OGG", "OPUS", 48000), (".opus", "OGG", "OPUS", 48000)])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_speak_writes_the_format_its_extension_names(tiny_export, tmp_path, ext, fmt, subtype, rate, stream):
    """The file is the format its name says (read back by libsndfile), as long as the WAV of the same
    synthesis; the lossless ones hold the same samples."""
    sf = pytest.importorskip("soundfile")
    pytest.importorskip("soxr")
    out, ref = tmp_path / f"o{ext}", tmp_path / "ref.wav"
    extra = ["--max-new-tokens", "6", *(["--stream"] if stream else [])]
    assert _speak(tiny_export, out, *extra) == 0 and _speak(tiny_export, ref, *extra) == 0
    info = sf.info(str(out))
    assert (info.format, info.subtype, info.samplerate, info.channels) == (fmt, subtype, rate, 1)
    got, _ = sf.read(str(out), dtype="int16")
    want, _ = sf.read(str(ref), dtype="int16")
    assert abs(len(got) * 32000 / rate - len(want)) <= 0.06 * 32000  # codec padding / resampler delay at most
    if ext in (".wav", ".flac"):
        assert np.array_equal(got, want)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# 4. Bad numbers and bad config choices are `error: ...` with exit 2, not tracebacks.

@pytest.mark.parametrize("option, value", [("--threads", "0"), ("--threads", "-2"), ("--chunk-size", "0"),
                                           ("--batch-size", "0"), ("--threads", "two")])
def test_speak_rejects_non_positive_counts(tiny_export, tmp_path, capsys, no_synthesis, option, value):
    with pytest.raises(SystemExit) as exc:
        _speak(tiny_export, tmp_path / "o.wav", option, value)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected a whole number >= 1, got" in err and value in err
    assert not (tmp_path / "o.wav").exists()


def test_speak_threads_zero_in_a_fresh_process_has_no_traceback(tiny_export, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline_lib.cli", "speak", "hi", "-o", str(tmp_path / "o.wav"),
                           "--model", str(tiny_export), "--threads", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--threads" in proc.stderr


@pytest.mark.parametrize("override, expected", [
    ("checkpoint=nonexistent", ("checkpoint=nonexistent", "local", "random-80m", "soprano-1.1-80m", "tiny")),
    ("bench.threads=[0]", ("bench.threads[0]: expected an int >= 1, found 0",)),
])
def test_config_module_bad_override_is_an_error_and_keeps_params_yaml(tmp_path, override, expected):
    params = tmp_path / "params.yaml"
    params.write_bytes((REPO_ROOT / "params.yaml").read_bytes())
    before = params.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "pipeline_lib.config", override], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    for text in expected:
        assert text in proc.stderr
    assert params.read_bytes() == before


# 5. Bad params fail before anything is written or run.

@pytest.mark.parametrize("override, key", [
    ("bench.threads=[0]", "bench.threads[0]"),
    ("threads=0", "threads"),
    ("bench.num_tokens=1", "bench.num_tokens"),
    ("bench.repeats=0", "bench.repeats"),
    ("bench.passes=0", "bench.passes"),
    ("bench.backends=[onnx,tensorrt]", "bench.backends"),
    ("convert.backends=[onnx,tensorrt]", "convert.backends"),
    ("convert.precisions=[fp16]", "convert.precisions"),
    ("convert.openvino.int8_mode=int4", "convert.openvino.int8_mode"),
    ("parity.decode_steps=0", "parity.decode_steps"),
    ("checkpoint.name=../elsewhere", "checkpoint.name"),
    ("checkpoint=local", "checkpoint.path"),
    ("nosuchkey=1", "nosuchkey"),
    ("bench.threads=[1", "bench.threads=[1"),
])
def test_config_rejects_bad_params_and_keeps_params_yaml(tmp_path, capsys, override, key):
    from pipeline_lib.config import main

    params = tmp_path / "params.yaml"
    params.write_bytes(b"# the previous params\nthreads: 2\n")
    assert main([override], path=params) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err, err
    assert params.read_bytes() == b"# the previous params\nthreads: 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_config_good_override_writes_the_composition(tmp_path):
    from pipeline_lib.config import compose, main

    params = tmp_path / "params.yaml"
    assert main(["threads=4"], path=params) == 0
    assert yaml.safe_load(params.read_text()) == compose(["threads=4"])
    assert yaml.safe_load(params.read_text())["bench"]["threads"] == [1, 4]


def test_committed_params_are_valid():
    from pipeline_lib.stage import load_params

    load_params(REPO_ROOT / "params.yaml")  # raises when the committed file is bad


def _params_with(tmp_path: Path, edit) -> Path:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.parametrize("edit, key", [
    (lambda p: p["bench"].update(threads=[0]), "bench.threads[0]"),
    (lambda p: p["bench"].update(threads=[1, "${threads}"]) or p.update(threads=-1), "bench.threads[1]"),
    (lambda p: p["bench"].update(num_tokens="many"), "bench.num_tokens"),
    (lambda p: p["bench"].update(batch_size=True), "bench.batch_size"),
    (lambda p: p["convert"].update(precisions=["int4"]), "convert.precisions"),
    (lambda p: p["parity"]["convert_int8"].update(lm_hidden_cosine_min="high"), "parity.convert_int8.lm_hidden_cosine_min"),
    (lambda p: p["checkpoint"].update(source="ftp"), "source must be one of"),
    (lambda p: p.pop("bench"), "bench"),
    (lambda p: p["bench"].update(threads="${nosuch}"), "cannot be resolved"),
])
def test_load_params_rejects_bad_params(tmp_path, edit, key):
    from pipeline_lib.stage import load_params

    path = _params_with(tmp_path, edit)
    with pytest.raises(InputError) as exc:
        load_params(path)
    assert str(path) in str(exc.value) and key in str(exc.value)


def test_load_params_resolves_interpolations_as_dvc_writes_them(tmp_path):
    from pipeline_lib.stage import load_params

    path = _params_with(tmp_path, lambda p: p["bench"].update(threads=[1, "${threads}"]) or p.update(threads=3))
    assert list(load_params(path).bench.threads) == [1, 3]


def test_a_stage_with_bad_params_fails_before_touching_its_outputs(tmp_path):
    _params_with(tmp_path, lambda p: p["bench"].update(threads=[0]))
    (tmp_path / "bench.csv").write_text("previous results\n")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "stages/benchmark.py"), "ckpt", "bench.csv", "bench.json",
                           "env.json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "bench.threads[0]: expected an int >= 1, found 0" in proc.stderr
    assert (tmp_path / "bench.csv").read_text() == "previous results\n"


# 6. A result without audio is an error, and nothing is written.

def test_speak_one_token_is_an_error_without_a_file(tiny_export, tmp_path, capsys, no_synthesis):
    out = tmp_path / "o.wav"
    assert _speak(tiny_export, out, "--max-new-tokens", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--max-new-tokens" in err and "two" in err
    assert not out.exists()


@pytest.mark.parametrize("stream", [False, True])
def test_speak_empty_audio_is_an_error_without_a_file(tiny_export, tmp_path, capsys, monkeypatch, stream):
    from pipeline_lib.runtime.tts import SopranoTTS

    monkeypatch.setattr(SopranoTTS, "synthesize", lambda self, *a, **k: {"audio": np.zeros(0, np.float32),
                                                                          "hidden_lengths": [1, 1]})
    monkeypatch.setattr(SopranoTTS, "infer_stream", lambda self, *a, **k: iter(()))
    out = tmp_path / "o.wav"
    assert _speak(tiny_export, out, "--max-new-tokens", "8", *(["--stream"] if stream else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no audio") and "--max-new-tokens" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_benchmark_outs_survive_a_failed_run(tmp_path, monkeypatch):
    """The benchmark's outs are `persist: true` (DVC leaves them in place while the stage runs) and the
    stage keeps them on failure: the previous results are still there, byte for byte."""
    import yaml

    from pipeline_lib.errors import SopranoOnnxError
    from pipeline_lib.stage import stage_outputs

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    outs = stages["benchmark"]["outs"] + stages["benchmark"]["metrics"]
    assert all(next(iter(o.values())).get("persist") is True for o in outs), outs
    old = tmp_path / "bench.csv"
    old.write_text("previous results\n")
    with pytest.raises(SystemExit):
        with stage_outputs("benchmark", old, keep_previous=True):
            raise SopranoOnnxError("a crash midway")
    assert old.read_text() == "previous results\n"
    with pytest.raises(SystemExit):  # the other stages still remove what a failed run leaves
        with stage_outputs("parity", old):
            raise SopranoOnnxError("a crash midway")
    assert not old.exists()

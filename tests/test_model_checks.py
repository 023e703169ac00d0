"""Load-time checks of a model folder and of the runtime's arguments (issue 16, items 8, 9, 10b, 10c):
a tokenizer of another LM, swapped LM and decoder files or paths, a seed of the wrong type under greedy
decoding, more threads than CPUs. Uses the session fixture `tiny_export` (tests/conftest.py); tampered
copies live under tmp_path."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from pipeline_lib import cpuinfo
from pipeline_lib.errors import InputError, ModelFileError
from pipeline_lib.runtime import model_files
from pipeline_lib.runtime import tts as tts_module
from pipeline_lib.runtime.generate import LMSpec
from pipeline_lib.runtime.sampling import row_generators, validate_seed

LM_ONNX = "soprano_lm_step.onnx"
DEC_ONNX = "soprano_decoder_preistft.onnx"
LM_JSON = "soprano_lm_step_config.json"
DEC_JSON = "soprano_decoder_preistft_istft_config.json"
TOKENIZER = "tokenizer.json"
FIX = "copy the checkpoint's tokenizer.json beside the LM"


def _shadow(src: Path, dst: Path, links: dict[str, str] | None = None, copy: tuple[str, ...] = ()) -> Path:
    """A copy of an export folder made of symlinks to `src`'s files; `links` maps a name to another of
    src's files to point it at; the files in `copy` are real copies (to edit)."""
    dst.mkdir(parents=True, exist_ok=True)
    links = links or {}
    for f in src.iterdir():
        if f.name in copy:
            shutil.copy2(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(src / links.get(f.name, f.name))
    return dst


@pytest.fixture(scope="module")
def tts(tiny_export):
    from pipeline_lib import SopranoTTS

    return SopranoTTS.from_dir(tiny_export, num_threads=1)


def _no_load(*args, **kwargs):
    raise AssertionError("the models were loaded before the check")


# --- 8: the tokenizer must belong to the LM ---------------------------------------------------------------


def _with_tokenizer(tiny_export: Path, tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    d = _shadow(tiny_export, tmp_path / "tok", copy=(TOKENIZER,))
    data = json.loads((d / TOKENIZER).read_text())
    edit(data)
    (d / TOKENIZER).write_text(json.dumps(data))
    return d


def _swap_audio_tokens(data: dict) -> None:
    """[0] and [7999] trade ids: same special tokens, same size, another audio layout."""
    v = data["model"]["vocab"]
    v["[0]"], v["[7999]"] = v["[7999]"], v["[0]"]


def _fewer_audio_tokens(data: dict) -> None:
    """A model with 4000 audio tokens: [4000]..[7999] dropped, the text ids after them moved down."""
    dropped = {f"[{k}]" for k in range(4000, 8000)}
    renumber = {tok: i - 4000 if i >= 8004 else i for tok, i in data["model"]["vocab"].items() if tok not in dropped}
    data["model"]["vocab"] = renumber
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in dropped]


def _text_token_as_audio(data: dict) -> None:
    """Id 4 holds a text token, [0] moves to that token's id."""
    v = data["model"]["vocab"]
    v["[0]"], v["the"] = v["the"], v["[0]"]


@pytest.mark.parametrize("edit, found", [
    (_swap_audio_tokens, "'[7999]' at id 4 where [0] belongs (2 of 8000 ids differ)"),
    (_fewer_audio_tokens, "at id 4004 where [4000] belongs (4000 of 8000 ids differ)"),
    (_text_token_as_audio, "'the' at id 4 where [0] belongs"),
])
def test_tokenizer_of_another_vocabulary_is_rejected_at_load(tiny_export, tmp_path, edit, found):
    from pipeline_lib import SopranoTTS

    d = _with_tokenizer(tiny_export, tmp_path, edit)
    with pytest.raises(ModelFileError) as e:
        SopranoTTS.from_dir(d, num_threads=1, warm_up=False)
    msg = str(e.value)
    assert str(d / TOKENIZER) in msg
    assert "expected the audio tokens [0]..[7999] at ids 4..8003" in msg
    assert f"{LM_JSON}: audio_token_first_id 4, audio_token_count 8000" in msg
    assert found in msg and FIX in msg


def _id_beyond(data: dict) -> None:
    data["model"]["vocab"]["the"] = 9000


def _extra_token(data: dict) -> None:
    data["model"]["vocab"]["zzq"] = 8192


@pytest.mark.parametrize("edit, found", [(_id_beyond, "found 1 beyond, up to 9000 ('the'"),
                                         (_extra_token, "found 1 beyond, up to 8192 ('zzq'; 8193 ids in all)")])
def test_tokenizer_ids_beyond_the_lm_vocab_are_rejected_at_load(tiny_export, tmp_path, edit, found):
    """Before: the tokenizer loaded and synthesize failed with an IndexError from the embedding lookup."""
    from pipeline_lib import SopranoTTS

    d = _with_tokenizer(tiny_export, tmp_path, edit)
    with pytest.raises(ModelFileError) as e:
        SopranoTTS.from_dir(d, num_threads=1, warm_up=False)
    msg = str(e.value)
    assert str(d / TOKENIZER) in msg and "expected token ids 0..8191 (the LM's vocab_size 8192" in msg
    assert LM_JSON in msg and found in msg and FIX in msg


def _spec(tiny_export: Path, tmp_path: Path, drop: tuple[str, ...] = (), **fields: object) -> LMSpec:
    cfg = json.loads((tiny_export / LM_JSON).read_text())
    for k in drop:
        del cfg[k]
    cfg.update(fields)
    path = tmp_path / LM_JSON
    path.write_text(json.dumps(cfg))
    return LMSpec.from_json(path)


def test_audio_token_range_is_read_from_the_lm_config(tiny_export, tmp_path):
    spec = _spec(tiny_export, tmp_path)
    assert (spec.audio_token_first_id, spec.audio_token_count) == (4, 8000)
    tok = model_files.load_tokenizer(tiny_export / TOKENIZER, spec)
    assert tok.token_to_id("[7999]") == 8003
    # An LM config that expects another count of audio tokens: the tokenizer is not its own.
    with pytest.raises(ModelFileError, match=r"expected the audio tokens \[0\]\.\.\[3999\] at ids 4\.\.4003 .*"
                                             r"audio_token_count 4000\); found audio tokens outside that range"):
        model_files.load_tokenizer(tiny_export / TOKENIZER, _spec(tiny_export, tmp_path, audio_token_count=4000))


def test_lm_config_without_audio_fields_takes_the_range_from_the_tokenizer(tiny_export, tmp_path):
    spec = _spec(tiny_export, tmp_path, drop=("audio_token_first_id", "audio_token_count"))
    assert spec.audio_token_first_id is None and spec.audio_token_count is None
    model_files.load_tokenizer(tiny_export / TOKENIZER, spec)
    bad = _with_tokenizer(tiny_export, tmp_path, _swap_audio_tokens) / TOKENIZER
    with pytest.raises(ModelFileError, match=r"\[0\]\.\.\[7999\] at ids 4\.\.8003 \(.*has no audio_token_\* fields"):
        model_files.load_tokenizer(bad, spec)


# --- 9: swapped LM and decoder ----------------------------------------------------------------------------


def test_from_dir_with_the_model_files_swapped(tiny_export, tmp_path):
    """The LM and decoder ONNX files renamed onto each other (configs in place). Before: "the model and its
    config come from different exports"."""
    from pipeline_lib import SopranoTTS

    d = _shadow(tiny_export, tmp_path / "sw", links={LM_ONNX: DEC_ONNX, DEC_ONNX: LM_ONNX})
    with pytest.raises(ModelFileError) as e:
        SopranoTTS.from_dir(d, num_threads=1, warm_up=False)
    msg = str(e.value)
    assert msg.startswith(f"{d / LM_ONNX}: holds a decoder (inputs ['hidden_states']), not the LM step model")
    assert "look swapped" in msg and "different exports" not in msg
    assert f"pass the LM step model as lm_path and the decoder as decoder_path (in an export folder: {LM_ONNX}" in msg


def test_from_dir_with_the_lm_in_the_decoders_place(tiny_export, tmp_path):
    from pipeline_lib import SopranoTTS

    d = _shadow(tiny_export, tmp_path / "two_lms", links={DEC_ONNX: LM_ONNX})
    with pytest.raises(ModelFileError) as e:
        SopranoTTS.from_dir(d, num_threads=1, warm_up=False)
    msg = str(e.value)
    assert msg.startswith(f"{d / DEC_ONNX}: holds an LM step model (inputs ['input_ids', 'attention_mask', "
                          "'position_ids'] and 4 more), not the decoder")
    assert "look swapped" in msg and "decoder_path" in msg


@pytest.mark.parametrize("nested", [False, True], ids=["export_folder", "pipeline_folder"])
def test_constructor_with_lm_and_decoder_paths_swapped(tiny_export, tmp_path, monkeypatch, nested):
    """SopranoTTS(decoder, lm): "swapped" before any model is loaded. Before: "come from different exports"
    after loading both (export folder), "LM config JSON not found" (pipeline folder: lm/ and decoder/)."""
    from pipeline_lib import SopranoTTS

    if nested:
        lm_dir, dec_dir = tmp_path / "lm", tmp_path / "decoder"
        _shadow(tiny_export, lm_dir), _shadow(tiny_export, dec_dir)
        for f in (DEC_ONNX, DEC_JSON):
            (lm_dir / f).unlink()
        for f in (LM_ONNX, LM_JSON):
            (dec_dir / f).unlink()
    else:
        lm_dir = dec_dir = tiny_export
    monkeypatch.setattr(tts_module, "load_backends", _no_load)
    with pytest.raises(ModelFileError) as e:
        SopranoTTS(dec_dir / DEC_ONNX, lm_dir / LM_ONNX, num_threads=1)
    msg = str(e.value)
    assert f"lm_path {dec_dir / DEC_ONNX} is a decoder ({DEC_JSON} beside it)" in msg
    assert f"decoder_path {lm_dir / LM_ONNX} is an LM step model ({LM_JSON} beside it)" in msg
    assert "lm_path and decoder_path are swapped" in msg
    assert f"SopranoTTS(lm_path={str(lm_dir / LM_ONNX)!r}, decoder_path={str(dec_dir / DEC_ONNX)!r})" in msg


def test_constructor_with_the_decoder_as_both_models(tiny_export, monkeypatch):
    from pipeline_lib import SopranoTTS

    monkeypatch.setattr(tts_module, "load_backends", _no_load)
    with pytest.raises(ModelFileError) as e:
        SopranoTTS(tiny_export / DEC_ONNX, tiny_export / DEC_ONNX, num_threads=1)
    msg = str(e.value)
    assert msg.startswith(f"lm_path {tiny_export / DEC_ONNX} is a decoder ({DEC_JSON} beside it)")
    assert "swapped" not in msg and "pass the LM step model as lm_path" in msg


# --- 10b: the seed is checked whatever the temperature ----------------------------------------------------


@pytest.mark.parametrize("seed", ["abc", True, -1, 1.5, np.float64(2.0)])
def test_validate_seed_rejects(seed):
    with pytest.raises(InputError, match=r"seed must be an int >= 0 or None .*got " + re.escape(repr(seed))):
        validate_seed(seed)
    with pytest.raises(InputError, match="seed must be an int >= 0 or None"):
        row_generators(seed, [0])


def test_validate_seed_accepts():
    assert validate_seed(None) is None
    assert validate_seed(0) == 0 and validate_seed(np.int64(7)) == 7 and type(validate_seed(np.int64(7))) is int


# --- 10c: more threads than CPUs ----------------------------------------------------------------------------


def test_available_cpus_prefers_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cpuinfo.available_cpus() == 3
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert cpuinfo.available_cpus() == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert cpuinfo.available_cpus() == 1


def _thread_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "available to this process" in r.getMessage()]


def test_more_threads_than_cpus_warns_once_per_count(tiny_export, monkeypatch, caplog):
    """Before: num_threads=64 on 2 cores ran about 10x slower, with no word."""
    from pipeline_lib import SopranoTTS

    monkeypatch.setattr(cpuinfo, "available_cpus", lambda: 1)
    monkeypatch.setattr(cpuinfo, "_OVERSUBSCRIBED_WARNED", set())
    caplog.set_level(logging.WARNING)
    SopranoTTS.from_dir(tiny_export, num_threads=2, warm_up=False)
    assert _thread_warnings(caplog) == [
        "num_threads=2 exceeds the 1 CPU available to this process: the threads compete for cores and run "
        "slower than 1 would; set num_threads to at most 1."
    ]
    caplog.clear()
    SopranoTTS.from_dir(tiny_export, num_threads=2, warm_up=False)
    SopranoTTS.from_dir(tiny_export, num_threads=1, warm_up=False)
    assert _thread_warnings(caplog) == []


def test_threads_within_the_cpus_do_not_warn(monkeypatch, caplog):
    monkeypatch.setattr(cpuinfo, "available_cpus", lambda: 4)
    monkeypatch.setattr(cpuinfo, "_OVERSUBSCRIBED_WARNED", set())
    caplog.set_level(logging.WARNING)
    assert not cpuinfo.warn_if_oversubscribed(4) and not cpuinfo.warn_if_oversubscribed("4")
    assert cpuinfo.warn_if_oversubscribed(64) and not cpuinfo.warn_if_oversubscribed(64)
    assert len(_thread_warnings(caplog)) == 1 and "num_threads=64 exceeds the 4 CPUs" in _thread_warnings(caplog)[0]


# --- 10b, through every public entry point ----------------------------------------------------------------


@pytest.mark.parametrize("entry", ["synthesize", "infer", "infer_batch", "infer_stream"])
@pytest.mark.parametrize("seed", ["abc", True, -2])
def test_bad_seed_is_rejected_under_greedy_decoding(tts, entry, seed):
    """temperature 0 never draws, but a bad seed is still the caller's error. Before: accepted silently."""
    call = {
        "synthesize": lambda: tts.synthesize("Hello there.", max_new_tokens=2, seed=seed),
        "infer": lambda: tts.infer("Hello there.", max_new_tokens=2, seed=seed),
        "infer_batch": lambda: tts.infer_batch(["Hello there."], max_new_tokens=2, seed=seed),
        "infer_stream": lambda: tts.infer_stream("Hello there.", max_new_tokens=2, seed=seed),  # before next()
    }[entry]
    with pytest.raises(InputError, match=r"seed must be an int >= 0 or None .*got " + re.escape(repr(seed))):
        call()

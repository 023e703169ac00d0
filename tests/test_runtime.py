"""The CPU runtime (pipeline_lib.runtime) on the tiny export, plus the LM loop on a fake LM.

Uses the session fixture `tiny_export` (tests/conftest.py): decoder + LM step + tokenizer of the
tiny checkpoint in one folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib.errors import InputError, MissingBackendError, ModelFileError
from pipeline_lib.runtime.backends import LMBackend
from pipeline_lib.runtime.generate import (
    KVCache,
    LMSpec,
    generate,
)
from pipeline_lib.runtime.rules import HALLUCINATION_MAX_RUNLENGTH, RowRules
from pipeline_lib.runtime.sampling import SamplingParams, row_generators

REPO_ROOT = Path(__file__).resolve().parents[1]
LM_ONNX = "soprano_lm_step.onnx"
DEC_ONNX = "soprano_decoder_preistft.onnx"
LM_JSON = "soprano_lm_step_config.json"
TWO_SENTENCES = "Dr. Smith paid $12.50 for 3 apples on Jan. 5th. Then he left at 10:30 AM!"
FOUR_SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river. "
    "A second sentence follows here, a little longer than the first one was. "
    "Short one now, but long enough to stay alone! "
    "And finally the fourth sentence closes this small paragraph of text?"
)


@pytest.fixture(scope="module")
def tts(tiny_export):
    from pipeline_lib import SopranoTTS

    return SopranoTTS.from_dir(tiny_export, num_threads=2)


def _shadow(src: Path, dst: Path, replace: tuple[str, ...] = ()) -> Path:
    """A copy of an export folder: symlinks, except real copies of the files in `replace`."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name in replace:
            shutil.copy2(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f)
    return dst


def _peak_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_synthesize_output(tts):
    r = tts.synthesize(TWO_SENTENCES, max_new_tokens=24)
    audio = r["audio"]
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert r["sample_rate"] == 32000
    assert r["sentences"] == 2 == len(r["finish_reasons"]) == len(r["hidden_lengths"])
    assert len(audio) == sum((n - 1) * 2048 for n in r["hidden_lengths"])
    assert r["num_tokens"] == sum(r["hidden_lengths"])
    assert set(r["finish_reasons"]) <= {"stop", "length", "hallucination"}
    assert np.isfinite(audio).all() and audio.std() > 0
    assert set(r["timings"]) == {"prefill", "per_token", "lm_total", "decoder", "istft", "total"}
    assert all(v >= 0 for v in r["timings"].values())


def test_synthesize_follows_the_hidden_state_convention(tts):
    # The random tiny LM never emits [STOP]: every sentence runs to max_new_tokens, one hidden vector each.
    r = tts.synthesize(TWO_SENTENCES, max_new_tokens=9)
    assert r["hidden_lengths"] == [9, 9] and r["finish_reasons"] == ["length", "length"]
    assert len(r["audio"]) == 2 * 8 * 2048


def test_batched_equals_unbatched(tts):
    a = tts.synthesize(FOUR_SENTENCES, max_new_tokens=24, batch_size=8)
    b = tts.synthesize(FOUR_SENTENCES, max_new_tokens=24, batch_size=1)
    c = tts.synthesize(FOUR_SENTENCES, max_new_tokens=24, batch_size=3)
    assert a["sentences"] == 4
    assert _peak_diff(a["audio"], b["audio"]) <= 1e-4
    assert _peak_diff(c["audio"], b["audio"]) <= 1e-4


def test_batched_decoder_equals_one_by_one(tiny_export):
    """Equal-length sentences (always, at a fixed token count with random weights) share one decoder
    call when decoder_batch_size allows; the audio is the one-by-one decode's."""
    from pipeline_lib import SopranoTTS

    batched = SopranoTTS.from_dir(tiny_export, num_threads=2, decoder_batch_size=8)
    calls: list[int] = []
    run = batched.decoder.run
    batched.decoder.run = lambda h: (calls.append(h.shape[0]), run(h))[1]
    a = batched.synthesize(FOUR_SENTENCES, max_new_tokens=24)
    assert a["sentences"] == 4 and len(set(a["hidden_lengths"])) == 1 and calls == [4]
    lean = SopranoTTS.from_dir(tiny_export, num_threads=2)  # low_memory: one sentence per call
    assert lean.low_memory and lean.decoder_batch_size == 1
    b = lean.synthesize(FOUR_SENTENCES, max_new_tokens=24)
    assert _peak_diff(a["audio"], b["audio"]) <= 1e-4
    c = SopranoTTS.from_dir(tiny_export, num_threads=2, low_memory=False)  # ORT defaults, batched decoder
    assert c.decoder_batch_size == c.batch_size
    assert _peak_diff(c.synthesize(FOUR_SENTENCES, max_new_tokens=24)["audio"], b["audio"]) <= 1e-4


def test_seed_makes_sampling_reproducible(tts):
    kw = dict(max_new_tokens=16, temperature=0.8, top_p=0.9, top_k=50)
    a = tts.synthesize(TWO_SENTENCES, seed=5, **kw)["audio"]
    b = tts.synthesize(TWO_SENTENCES, seed=5, **kw)["audio"]
    c = tts.synthesize(TWO_SENTENCES, seed=6, **kw)["audio"]
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)
    # Rows sample from their own generators: batching does not change a seeded result.
    d = tts.synthesize(TWO_SENTENCES, seed=5, batch_size=1, **kw)["audio"]
    assert _peak_diff(d, a) <= 1e-4


def test_infer_and_infer_batch_write_wavs(tts, tmp_path):
    texts = ["Hello world, this is the first text.", TWO_SENTENCES]
    single = [tts.infer(t, out_path=tmp_path / f"s{i}.wav", max_new_tokens=12) for i, t in enumerate(texts)]
    batch = tts.infer_batch(texts, out_dir=tmp_path / "batch", max_new_tokens=12)
    for i, (s, b) in enumerate(zip(single, batch)):
        assert _peak_diff(b, s) <= 1e-4
        for path in (tmp_path / f"s{i}.wav", tmp_path / "batch" / f"{i}.wav"):
            with wave.open(str(path)) as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (32000, 1, 2, len(s))
                pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2") / 32767.0
            assert np.abs(pcm - s).max() < 1e-4


def test_long_text_is_spoken_sentence_by_sentence(tts):
    words = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")
    rng = np.random.default_rng(0)
    parts = []
    while sum(len(p) + 1 for p in parts) < 20_000:
        n = int(rng.integers(3, 60))
        sentence = " ".join(rng.choice(words, size=n)).capitalize()
        parts.append(sentence + str(rng.choice([".", "!", "?", ",", ";"])))
    parts.append(" ".join(["unbroken"] * 120))  # one very long run without any sentence mark
    text = " ".join(parts)
    assert len(text) >= 20_000
    prompts, ids = tts.prepare([text])
    assert max(len(i) for i in ids) <= tts.max_prompt_tokens == tts.spec.max_position_embeddings // 2
    r = tts.synthesize(text, max_new_tokens=4)
    assert r["sentences"] == len(prompts) > 50
    assert len(r["audio"]) == r["sentences"] * 3 * 2048
    assert np.isfinite(r["audio"]).all()


def test_small_prompt_budget_splits_sentences(tiny_export):
    from pipeline_lib import SopranoTTS

    small = SopranoTTS.from_dir(tiny_export, num_threads=1, max_prompt_tokens=24)
    prompts, ids = small.prepare([FOUR_SENTENCES])
    assert len(prompts) > 4 and max(len(i) for i in ids) <= 24
    assert len(small.synthesize(FOUR_SENTENCES, max_new_tokens=3)["audio"]) == len(prompts) * 2 * 2048


class _CountingLM(LMBackend):
    def __init__(self, inner: LMBackend) -> None:
        self.inner, self.calls = inner, 0
        self.path, self.input_names, self.output_names = inner.path, inner.input_names, inner.output_names

    def run(self, feed):
        self.calls += 1
        return self.inner.run(feed)


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_stream_equals_infer(tts, chunk_size):
    full = tts.infer(TWO_SENTENCES, max_new_tokens=20)
    chunks = list(tts.infer_stream(TWO_SENTENCES, chunk_size=chunk_size, max_new_tokens=20))
    assert all(c.dtype == np.float32 for c in chunks)
    streamed = np.concatenate(chunks)
    assert streamed.shape == full.shape
    assert np.abs(streamed - full).max() <= 1e-5
    # Regular chunks hold chunk_size tokens of audio; only a sentence's last chunk may differ.
    assert sum(len(c) == chunk_size * 2048 for c in chunks) >= len(chunks) - 2


def test_stream_equals_infer_when_sampling_with_a_seed(tts):
    kw = dict(max_new_tokens=14, temperature=0.9, top_p=0.9, seed=21)
    full = tts.infer(TWO_SENTENCES, **kw)
    streamed = np.concatenate(list(tts.infer_stream(TWO_SENTENCES, chunk_size=2, **kw)))
    assert np.abs(streamed - full).max() <= 1e-5


def test_first_chunk_arrives_before_generation_ends(tts, monkeypatch):
    counting = _CountingLM(tts.lm)
    monkeypatch.setattr(tts, "lm", counting)
    stream = tts.infer_stream("Hello there, this is a single sentence to stream.", chunk_size=1, max_new_tokens=40)
    first = next(stream)
    calls_at_first = counting.calls
    rest = list(stream)
    # 1 prefill + 39 decode steps in all; the first chunk needs tokens 0 .. 1 + stream_context.
    assert counting.calls == 40
    assert calls_at_first == 2 + tts.stream_context
    assert len(first) == 2048 and len(first) + sum(len(c) for c in rest) == 39 * 2048
    # One chunk per step after the first; the tokens held back as right context come out at the end.
    assert [len(c) for c in rest] == [2048] * (39 - 1 - (tts.stream_context + 1)) + [(tts.stream_context + 1) * 2048]


def test_stream_context_is_lossless_for_the_decoder(tts):
    """Decoding a window with stream_context tokens on each side reproduces the full decode."""
    ctx, spt = tts.stream_context, tts.samples_per_token
    assert ctx == 3
    hidden = np.random.default_rng(0).standard_normal((1, 30, 512)).astype(np.float32)
    full = tts._decode(hidden)[0][0]
    peak = np.abs(full).max()
    for start, end in [(0, 1), (5, 6), (12, 16), (25, 29)]:
        a, b = max(0, start - ctx), min(29, end + ctx)
        window = tts._decode(hidden[:, a:b + 1])[0][0]
        got = window[(start - a) * spt:(end - a) * spt]
        assert np.abs(got - full[start * spt:end * spt]).max() <= 1e-6 * max(1.0, peak)


def test_stream_rejects_bad_input_before_iterating(tts):
    with pytest.raises(InputError):
        tts.infer_stream("   ")
    with pytest.raises(InputError):
        tts.infer_stream("hello there", chunk_size=0)


@pytest.mark.parametrize("text", ["", "   \n\t ", "!!! ??? ...", "\U0001F600 \U0001F680"])
def test_empty_or_unspeakable_text(tts, text):
    with pytest.raises(InputError):
        tts.synthesize(text)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(max_new_tokens=0), "1..512"), (dict(max_new_tokens=513), "1..512"), (dict(max_new_tokens=2.5), "1..512"),
     (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
     (dict(top_k=-2), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(batch_size=0), "batch_size"),
     (dict(seed=-3, temperature=0.5), "seed")],
)
def test_bad_parameters(tts, kwargs, match):
    with pytest.raises(InputError, match=match):
        tts.synthesize("Hello there, general Kenobi.", **kwargs)


def test_non_string_text(tts):
    with pytest.raises(InputError):
        tts.synthesize(b"bytes are not text")
    with pytest.raises(InputError):
        tts.infer_batch("a single string")


def test_unknown_backend(tiny_export):
    from pipeline_lib import SopranoTTS

    with pytest.raises(ValueError, match="onnx_cpu"):
        SopranoTTS.from_dir(tiny_export, backend="cuda")


@pytest.mark.parametrize("name", [LM_ONNX, DEC_ONNX, LM_JSON, "soprano_decoder_preistft_istft_config.json", "tokenizer.json"])
def test_missing_file(tiny_export, tmp_path, name):
    from pipeline_lib import SopranoTTS

    d = _shadow(tiny_export, tmp_path / "m")
    (d / name).unlink()
    with pytest.raises(ModelFileError, match=name.replace(".", r"\.")) as e:
        SopranoTTS.from_dir(d)
    if name.endswith(".onnx"):
        assert "soprano-onnx export" in str(e.value) and "dvc repro" in str(e.value)


def test_missing_model_dir(tmp_path):
    from pipeline_lib import SopranoTTS

    with pytest.raises(ModelFileError, match="soprano-onnx export"):
        SopranoTTS.from_dir(tmp_path / "nothing")


@pytest.mark.parametrize("name", [LM_ONNX, DEC_ONNX])
def test_corrupted_onnx(tiny_export, tmp_path, name):
    from pipeline_lib import SopranoTTS

    d = _shadow(tiny_export, tmp_path / "c")
    (d / name).unlink()
    (d / name).write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelFileError, match=name.replace(".", r"\.")):
        SopranoTTS.from_dir(d)


def test_truncated_onnx(tiny_export, tmp_path):
    from pipeline_lib import SopranoTTS

    d = _shadow(tiny_export, tmp_path / "t")
    data = (tiny_export / LM_ONNX).read_bytes()
    (d / LM_ONNX).unlink()
    (d / LM_ONNX).write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError, match=LM_ONNX.replace(".", r"\.")):
        SopranoTTS.from_dir(d)


def test_config_names_do_not_match_the_model(tiny_export, tmp_path):
    from pipeline_lib import SopranoTTS

    d = _shadow(tiny_export, tmp_path / "n", replace=(LM_JSON,))
    cfg = json.loads((d / LM_JSON).read_text())
    cfg["inputs"][2]["name"] = "position_idx"
    (d / LM_JSON).write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError) as e:
        SopranoTTS.from_dir(d)
    msg = str(e.value)
    assert LM_ONNX in msg and "expected" in msg and "found" in msg and "position_idx" in msg and "position_ids" in msg


def test_decoder_config_names_do_not_match_the_model(tiny_export, tmp_path):
    from pipeline_lib import SopranoTTS

    name = "soprano_decoder_preistft_istft_config.json"
    d = _shadow(tiny_export, tmp_path / "dn", replace=(name,))
    cfg = json.loads((d / name).read_text())
    cfg["onnx"]["output"]["name"] = "spectrogram"
    (d / name).write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="spectrogram"):
        SopranoTTS.from_dir(d)


def test_tokenizer_with_other_special_ids(tiny_export, tmp_path):
    from pipeline_lib import SopranoTTS

    d = _shadow(tiny_export, tmp_path / "k", replace=("tokenizer.json",))
    tok = json.loads((d / "tokenizer.json").read_text())
    swap = {"[START]": "[STOP]", "[STOP]": "[START]"}
    for t in tok["added_tokens"]:
        t["content"] = swap.get(t["content"], t["content"])
    vocab = tok["model"]["vocab"]
    vocab["[START]"], vocab["[STOP]"] = vocab["[STOP]"], vocab["[START]"]
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelFileError, match="special token ids"):
        SopranoTTS.from_dir(d)


def test_unreadable_tokenizer(tiny_export, tmp_path):
    from pipeline_lib import SopranoTTS

    d = _shadow(tiny_export, tmp_path / "u")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        SopranoTTS.from_dir(d)


def test_tokenizer_found_beside_the_decoder(tiny_export, tmp_path):
    from pipeline_lib import SopranoTTS

    lm_dir, dec_dir = tmp_path / "lm", tmp_path / "dec"
    lm_dir.mkdir(), dec_dir.mkdir()
    for f in (LM_ONNX, LM_JSON):
        (lm_dir / f).symlink_to(tiny_export / f)
    for f in (DEC_ONNX, "soprano_decoder_preistft_istft_config.json", "tokenizer.json"):
        (dec_dir / f).symlink_to(tiny_export / f)
    tts = SopranoTTS(lm_dir / LM_ONNX, dec_dir / DEC_ONNX, num_threads=1)
    assert tts.tokenizer_path == dec_dir / "tokenizer.json"


def test_missing_backend_packages(tiny_export, monkeypatch):
    from pipeline_lib import SopranoTTS

    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingBackendError, match=r"pip install 'soprano-onnx\[openvino\]'"):
        SopranoTTS.from_dir(tiny_export, backend="openvino_cpu")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingBackendError, match="pip install onnxruntime"):
        SopranoTTS.from_dir(tiny_export, backend="onnx_cpu")


def test_openvino_backend_matches_onnx(tiny_export, tts):
    pytest.importorskip("openvino")
    from pipeline_lib import SopranoTTS

    ov = SopranoTTS.from_dir(tiny_export, backend="openvino_cpu", num_threads=2)
    a = ov.synthesize(TWO_SENTENCES, max_new_tokens=16)["audio"]
    b = tts.synthesize(TWO_SENTENCES, max_new_tokens=16)["audio"]
    assert _peak_diff(a, b) <= 1e-3


def test_runtime_does_not_import_torch_or_transformers(tiny_export):
    code = (
        "import sys\n"
        "from pipeline_lib import SopranoTTS\n"
        f"tts = SopranoTTS.from_dir({str(tiny_export)!r}, num_threads=1)\n"
        "r = tts.synthesize('Hello world, no torch here.', max_new_tokens=6)\n"
        "chunks = list(tts.infer_stream('Hello world, no torch here.', max_new_tokens=6))\n"
        "assert len(r['audio']) > 0 and chunks\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def _speak(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline_lib.cli", "speak", *args], input=stdin,
                          capture_output=True, cwd=REPO_ROOT, env=env, timeout=300)


def _wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (32000, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def test_cli_speak_writes_wav(tiny_export, tts, tmp_path):
    expected = tts.synthesize(TWO_SENTENCES, max_new_tokens=10)["audio"]
    out = _speak(TWO_SENTENCES, "-o", str(tmp_path / "a.wav"), "--model", str(tiny_export), "--threads", "1",
                 "--max-new-tokens", "10")
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    assert "x-real-time" in text and "wall time" in text and f"{len(expected) / 32000:.2f} s" in text
    pcm = _wav(tmp_path / "a.wav")
    assert len(pcm) == len(expected)
    assert np.abs(pcm / 32767.0 - expected).max() < 1e-4


def test_cli_speak_stream_from_stdin_and_file(tiny_export, tmp_path):
    n = 2 * 7 * 2048
    out = _speak("-", "-o", str(tmp_path / "s.wav"), "--model", str(tiny_export), "--stream", "--max-new-tokens", "8",
                 "--threads", "1", stdin=TWO_SENTENCES.encode())
    assert out.returncode == 0, out.stderr.decode()
    assert len(_wav(tmp_path / "s.wav")) == n and "first chunk" in out.stdout.decode()
    (tmp_path / "t.txt").write_text(TWO_SENTENCES, encoding="utf-8")
    out = _speak("--text-file", str(tmp_path / "t.txt"), "-o", str(tmp_path / "f.wav"), "--model", str(tiny_export),
                 "--backend", "onnx", "--max-new-tokens", "8", "--temperature", "0.5", "--top-p", "0.9",
                 "--repetition-penalty", "1.1", "--seed", "3", "--threads", "1")
    assert out.returncode == 0, out.stderr.decode()
    assert len(_wav(tmp_path / "f.wav")) == n


def test_cli_non_utf8_file(tiny_export, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("caf\u00e9 ok. ".encode() + b"then \xff\xfe broken")
    out = _speak("--text-file", str(bad), "-o", str(tmp_path / "x.wav"), "--model", str(tiny_export))
    assert out.returncode == 2
    err = out.stderr.decode()
    assert str(bad) in err and "UTF-8" in err and "offset 15" in err
    assert not (tmp_path / "x.wav").exists()


def test_cli_errors(tiny_export, tmp_path):
    out = _speak("   ", "-o", str(tmp_path / "x.wav"), "--model", str(tiny_export))
    assert out.returncode == 2 and "empty" in out.stderr.decode()
    out = _speak("hello there", "-o", str(tmp_path / "x.wav"), "--model", str(tmp_path / "missing"))
    assert out.returncode == 2 and "soprano-onnx export" in out.stderr.decode()
    out = _speak("hello there", "-o", str(tmp_path / "x.wav"), "--model", str(tiny_export), "--max-new-tokens", "0")
    assert out.returncode == 2 and "1..512" in out.stderr.decode()


FAKE_SPEC = LMSpec(
    path=Path("fake.json"),
    input_names=("input_ids", "attention_mask", "position_ids", "past_key_0", "past_value_0"),
    output_names=("logits", "hidden_states", "new_key_0", "new_value_0"),
    special_tokens={"unk": 0, "text": 1, "start": 2, "stop": 3},
    num_layers=1, num_kv_heads=1, head_dim=4, hidden_size=3, vocab_size=32, max_position_embeddings=64,
)


class FakeLM(LMBackend):
    """Deterministic per row: the cache stores (token, position) per real token; the row emits
    [STOP] once it reaches the position given by its first prompt token; otherwise token
    4 + (7 * input + position) % 28. Hidden state = (input token, position, first prompt token).
    It checks that the cache the loop feeds back is consistent (real tokens at positions 0..n-1)."""

    def __init__(self) -> None:
        self.path, self.input_names, self.output_names = Path("fake"), list(FAKE_SPEC.input_names), list(FAKE_SPEC.output_names)
        self.batch_sizes: list[int] = []  # decode steps
        self.prefill_sizes: list[int] = []

    def run(self, feed):
        ids, mask, pos = feed["input_ids"], feed["attention_mask"], feed["position_ids"]
        past_k, past_v = feed["past_key_0"], feed["past_value_0"]
        b, s = ids.shape
        assert mask.shape == (b, past_k.shape[2] + s) and past_k.shape == past_v.shape
        assert mask[:, 0].any()  # no column that no row attends to is left at the front
        assert past_k.flags.c_contiguous
        (self.batch_sizes if past_k.shape[2] else self.prefill_sizes).append(b)
        new = np.zeros((b, 1, s, 4), np.float32)
        new[:, 0, :, 0], new[:, 0, :, 1] = ids, pos
        key = np.concatenate([past_k, new], axis=2)
        logits = np.zeros((b, s, FAKE_SPEC.vocab_size), np.float32)
        hidden = np.zeros((b, s, 3), np.float32)
        for r in range(b):
            real = key[r, 0, mask[r] == 1]
            np.testing.assert_array_equal(real[:, 1], np.arange(len(real)))  # positions 0..n-1, in order
            first = real[0, 0]
            for j in range(s):
                nxt = 3 if pos[r, j] >= first else 4 + (7 * ids[r, j] + pos[r, j]) % 28
                logits[r, j, nxt] = 10.0
                hidden[r, j] = (ids[r, j], pos[r, j], first)
        return {"logits": logits, "hidden_states": hidden, "new_key_0": new, "new_value_0": new.copy()}


FAKE_PROMPTS = [[9, 1, 5, 6, 2], [6, 1, 2], [20, 1, 7, 7, 7, 7, 2], [12, 1, 2], [4, 1, 8, 2]]


def test_loop_stops_rows_independently_and_drops_them():
    lm = FakeLM()
    out = generate(lm, FAKE_SPEC, FAKE_PROMPTS, max_new_tokens=12, params=SamplingParams(repetition_penalty=1.0))
    assert lm.batch_sizes == sorted(lm.batch_sizes, reverse=True) and lm.batch_sizes[-1] < len(FAKE_PROMPTS)
    assert lm.prefill_sizes == [1] * len(FAKE_PROMPTS)  # one prompt per prefill call, no padding
    for r, prompt in enumerate(FAKE_PROMPTS):
        first, n_prompt = prompt[0], len(prompt)
        produced = first - (n_prompt - 1)  # tokens before [STOP], from the prompt's last position on
        if produced < 12:
            assert out.finish_reasons[r] == "stop" and out.tokens[r][-1] == 3 and len(out.tokens[r]) == produced + 1
        else:
            assert out.finish_reasons[r] == "length" and len(out.tokens[r]) == 12 and 3 not in out.tokens[r]
        h = out.hidden[r]
        assert len(h) == len(out.tokens[r]) - (out.finish_reasons[r] == "stop")
        # Hidden k comes from the step that produced token k: input = prompt's last token, then token k-1.
        inputs = [prompt[-1], *out.tokens[r][: len(h) - 1]]
        np.testing.assert_array_equal(h[:, 0], inputs)
        np.testing.assert_array_equal(h[:, 1], np.arange(n_prompt - 1, n_prompt - 1 + len(h)))


def test_loop_batched_equals_one_by_one():
    params = SamplingParams(repetition_penalty=1.3)
    batched = generate(FakeLM(), FAKE_SPEC, FAKE_PROMPTS, max_new_tokens=20, params=params)
    for r, prompt in enumerate(FAKE_PROMPTS):
        alone = generate(FakeLM(), FAKE_SPEC, [prompt], max_new_tokens=20, params=params)
        np.testing.assert_array_equal(alone.tokens[0], batched.tokens[r])
        np.testing.assert_array_equal(alone.hidden[0], batched.hidden[r])
        assert alone.finish_reasons[0] == batched.finish_reasons[r]


def test_loop_sampling_batched_equals_one_by_one():
    params = SamplingParams(temperature=1.5, top_p=0.99, repetition_penalty=1.0)
    gens = row_generators(4, range(len(FAKE_PROMPTS)))
    batched = generate(FakeLM(), FAKE_SPEC, FAKE_PROMPTS, max_new_tokens=10, params=params, generators=gens)
    for r, prompt in enumerate(FAKE_PROMPTS):
        alone = generate(FakeLM(), FAKE_SPEC, [prompt], max_new_tokens=10, params=params,
                         generators=row_generators(4, [r]))
        np.testing.assert_array_equal(alone.tokens[0], batched.tokens[r])


@pytest.mark.parametrize("bucket", [1, 2, 5, 64])
def test_loop_kv_bucket_sizes_agree(bucket):
    """The fake LM checks every feed (real tokens at positions 0..n-1, in mask order) whatever the
    cache's padding; the results must not depend on the bucket size."""
    params = SamplingParams(repetition_penalty=1.3)
    ref = generate(FakeLM(), FAKE_SPEC, FAKE_PROMPTS, max_new_tokens=20, params=params, kv_bucket=1)
    got = generate(FakeLM(), FAKE_SPEC, FAKE_PROMPTS, max_new_tokens=20, params=params, kv_bucket=bucket)
    for a, b in zip(ref.tokens, got.tokens):
        np.testing.assert_array_equal(a, b)
    assert ref.finish_reasons == got.finish_reasons


def test_kv_cache_grows_by_bucket_and_trims_rows():
    """Rows of different lengths (each row's tokens in its columns [0, len)), the traced model's mask
    (the new token last) and the new_* append into each row's own column; the width grows by the bucket
    when the longest row fills it and narrows when it leaves."""
    names = ["past_key_0", "past_value_0"]
    present = [np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 1, 3, 2) + 100 * k for k in range(2)]
    cache = KVCache(names, present, [1, 3], bucket=4)
    assert cache.width == 4 and cache.used == 3
    feed = cache.feed()
    assert feed["past_key_0"].shape == (2, 1, 4, 2) and feed["attention_mask"].tolist() == [[1, 0, 0, 0, 1], [1, 1, 1, 0, 1]]
    assert not cache.arrays[0][0, :, 1:].any()  # row 0 holds its one token only
    old = cache.arrays[0]
    step = [np.full((2, 1, 1, 2), 7.0 + k, np.float32) for k in range(2)]
    cache.append(step)  # row 1's column 3 filled: the cache is full, so it grows by one bucket
    assert cache.width == 8 and cache.lens.tolist() == [2, 4] and cache.arrays[0] is not old
    np.testing.assert_array_equal(cache.arrays[0][1, :, :3], present[0][1])
    np.testing.assert_array_equal(cache.arrays[1][:, :, [1, 3]][[0, 1], :, [0, 1]], np.full((2, 1, 2), 8.0))
    assert cache.mask.tolist() == [[1, 1, 0, 0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 0, 0, 0, 0, 1]]
    cache.select(np.array([0]))  # row 0 alone: 2 tokens, the width narrows to one bucket
    assert cache.width == 4 and cache.lens.tolist() == [2] and cache.mask[0].tolist() == [1, 1, 0, 0, 1]
    np.testing.assert_array_equal(cache.arrays[0][0, :, 0], present[0][0, :, 0])
    with pytest.raises(ValueError, match="kv_bucket"):
        KVCache(names, present, [1, 3], bucket=0)


def test_kv_cache_in_place_leaves_the_append_to_the_model():
    """The fused model's contract: the mask has no extra column, ones over each row's tokens and its new
    column; append writes nothing (the model did) and moves each row's new column on."""
    cache = KVCache(["k"], [np.ones((2, 1, 3, 1), np.float32)], [3, 1], bucket=4, in_place=True)
    assert cache.feed()["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    cache.arrays[0][[0, 1], 0, [3, 1], 0] = 5.0  # what the model writes
    cache.append()  # row 0 is full: the width grows, the model's column is kept
    assert cache.width == 8 and cache.lens.tolist() == [4, 2]
    assert cache.mask.tolist() == [[1] * 5 + [0] * 3, [1, 1, 1] + [0] * 5]
    assert cache.arrays[0][0, 0, :4, 0].tolist() == [1, 1, 1, 5] and cache.arrays[0][1, 0, :2, 0].tolist() == [1, 5]


@pytest.mark.parametrize("in_place", [False, True])
def test_kv_cache_growth(in_place):
    """The traced model's cache grows a bucket at a time (every column costs attention time); the
    in-place one by half its width, rounded up to the bucket: each width a multiple of the bucket with
    room for the next column, the rows' columns kept."""
    bucket = 64
    cache = KVCache(["k"], [np.arange(60, dtype=np.float32).reshape(1, 1, 60, 1)], [60], bucket=bucket, in_place=in_place)
    widths = [cache.width]
    for _ in range(700):
        if in_place:
            cache.arrays[0][0, 0, cache.lens[0], 0] = cache.lens[0]  # what the model writes
        cache.append([np.full((1, 1, 1, 1), cache.lens[0], np.float32)])
        assert cache.width % bucket == 0 and cache.width > cache.used
        if cache.width != widths[-1]:
            widths.append(cache.width)
    assert widths == ([64, 128, 192, 320, 512, 768] if in_place else list(range(64, 769, 64)))
    assert cache.arrays[0][0, 0, :760, 0].tolist() == list(range(760))


@pytest.mark.parametrize("bucket", [1, 3])
def test_kv_bucket_does_not_change_the_real_model(tts, bucket):
    """Masked padding columns in the cache leave the exported LM's results unchanged (float rounding aside)."""
    _, ids = tts.prepare([FOUR_SENTENCES])
    params = SamplingParams(repetition_penalty=1.2)
    ref = generate(tts.lm, tts.spec, ids, max_new_tokens=24, params=params)
    got = generate(tts.lm, tts.spec, ids, max_new_tokens=24, params=params, kv_bucket=bucket)
    for r in range(len(ids)):
        np.testing.assert_array_equal(ref.tokens[r], got.tokens[r])
        np.testing.assert_allclose(ref.hidden[r], got.hidden[r], atol=1e-4)


def test_hallucination_guard_matches_upstream_rule():
    torch = pytest.importorskip("torch")
    soprano_tts = pytest.importorskip("soprano.tts")
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(5, 60))
        # Mix of near-repeats (L1 < 300) and jumps over 512 dims.
        steps = np.where(rng.random((n, 1)) < 0.8, rng.normal(0, 0.1, (n, 512)), rng.normal(0, 3.0, (n, 512)))
        states = np.cumsum(steps, axis=0).astype(np.float32)
        guard = RowRules(1, 512, stop_id=-1, max_new_tokens=10_000, guard=True)
        flagged_at = None
        for i in range(n):
            if guard.take(np.array([7]), states[i:i + 1])[1][0] == "hallucination" and flagged_at is None:
                flagged_at = i
        expected = soprano_tts.SopranoTTS.hallucination_detector(None, torch.from_numpy(states))
        assert (flagged_at is not None) == expected, trial
        if flagged_at is not None:
            assert not soprano_tts.SopranoTTS.hallucination_detector(None, torch.from_numpy(states[:flagged_at]))
            assert flagged_at > HALLUCINATION_MAX_RUNLENGTH


class _RepeatingLM(FakeLM):
    """Emits the same hidden state forever after the prompt: a 'hallucinating' row."""

    def run(self, feed):
        out = super().run(feed)
        out["hidden_states"] = np.zeros_like(out["hidden_states"])
        out["logits"][..., 3] = -100.0  # never stop
        return out


def test_hallucination_guard_stops_the_row():
    prompts = [[30, 1, 2]]
    off = generate(_RepeatingLM(), FAKE_SPEC, prompts, max_new_tokens=40, params=SamplingParams(repetition_penalty=1.0))
    assert off.finish_reasons == ["length"] and len(off.hidden[0]) == 40
    on = generate(_RepeatingLM(), FAKE_SPEC, prompts, max_new_tokens=40, params=SamplingParams(repetition_penalty=1.0),
                  hallucination_guard=True)
    assert on.finish_reasons == ["hallucination"] and len(on.hidden[0]) == HALLUCINATION_MAX_RUNLENGTH + 2


def test_synthesize_with_hallucination_guard(tts):
    r = tts.synthesize(TWO_SENTENCES, max_new_tokens=30, hallucination_guard=True)
    assert set(r["finish_reasons"]) <= {"length", "hallucination"}
    assert len(r["audio"]) == sum((n - 1) * 2048 for n in r["hidden_lengths"])


def test_torch_istft_cross_check(tiny_export, tts):
    pytest.importorskip("torch")
    from pipeline_lib import SopranoTTS

    with_torch = SopranoTTS.from_dir(tiny_export, num_threads=2, use_torch_istft=True)
    a = with_torch.synthesize(TWO_SENTENCES, max_new_tokens=12)["audio"]
    b = tts.synthesize(TWO_SENTENCES, max_new_tokens=12)["audio"]
    assert _peak_diff(a, b) <= 1e-5


def test_openvino_backend_rejects_bin_of_another_model(tiny_export, tmp_path):
    import shutil

    from pipeline_lib.convert import convert_onnx_to_openvino
    from pipeline_lib.errors import ModelFileError
    from pipeline_lib.runtime.tts import SopranoTTS

    model = tmp_path / "m"
    shutil.copytree(tiny_export, model)
    lm_xml = convert_onnx_to_openvino(model / "soprano_lm_step.onnx", model / "soprano_lm_step.xml", "fp32")
    dec_xml = convert_onnx_to_openvino(model / "soprano_decoder_preistft.onnx", model / "soprano_decoder_preistft.xml", "fp32")
    shutil.copy(dec_xml.with_suffix(".bin"), lm_xml.with_suffix(".bin"))
    with pytest.raises(ModelFileError, match=r"soprano_lm_step\.bin.*another model"):
        SopranoTTS.from_dir(model, backend="openvino_cpu", num_threads=1)
    lm_xml.with_suffix(".bin").unlink()
    with pytest.raises(ModelFileError, match=r"soprano_lm_step\.bin.*missing"):
        SopranoTTS.from_dir(model, backend="openvino_cpu", num_threads=1)


def test_openvino_compiles_with_f32_precision_and_our_dynamic_quant_group(tiny_export):
    """OpenVINO compiles in f32 (never bf16) with the dynamic quantisation group we measured fastest."""
    pytest.importorskip("openvino")
    from pipeline_lib.openvino_ir import OV_DYNAMIC_QUANT_GROUP
    from pipeline_lib.runtime.backends import OpenVinoDecoder, OpenVinoLM

    for backend in (OpenVinoLM(tiny_export / LM_ONNX, 1), OpenVinoDecoder(tiny_export / "soprano_decoder_preistft.onnx", 1)):
        assert int(backend.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) == OV_DYNAMIC_QUANT_GROUP == 256
        assert str(backend.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")
        assert int(backend.compiled.get_property("INFERENCE_NUM_THREADS")) == 1


def test_openvino_int8_note_only_for_int8_weights_without_vnni(tmp_path, monkeypatch, caplog):
    """The performance note names the missing instructions and the faster backend; only for int8
    weights on a CPU without VNNI / AMX, and once per process."""
    ov = pytest.importorskip("openvino")
    import openvino.opset13 as ops

    from pipeline_lib.runtime import openvino_backend as backends

    def model(weight_dtype):
        x = ops.parameter([1, 4], np.float32, name="x")
        w = ops.constant(np.ones((3, 4), dtype=weight_dtype))
        if weight_dtype != np.float32:
            w = ops.multiply(ops.convert(w, "f32"), ops.constant(np.full((3, 1), 0.5, np.float32)))
        return ov.Model([ops.matmul(x, w, False, True)], [x], "m")

    int8, fp32 = model(np.int8), model(np.float32)
    avx2 = {"sse2", "avx", "avx2", "fma"}
    note = backends.openvino_int8_note(int8, avx2)
    assert note and "avx512_vnni, avx_vnni, amx_int8" in note and "onnx_cpu" in note
    assert backends.openvino_int8_note(model(np.uint8), avx2) == note
    assert backends.openvino_int8_note(fp32, avx2) is None
    assert backends.openvino_int8_note(int8, avx2 | {"avx512_vnni"}) is None
    assert backends.openvino_int8_note(int8, avx2 | {"avx_vnni"}) is None
    assert backends.openvino_int8_note(int8, set()) is None  # flags unknown (not Linux): no claim

    path = tmp_path / "m.xml"
    ov.save_model(int8, path, compress_to_fp16=False)
    monkeypatch.setattr(backends, "read_cpuinfo", lambda: ("AVX2 CPU", avx2))
    monkeypatch.setattr(backends, "_NOTED", set())
    with caplog.at_level("WARNING", logger=backends.log.name):
        backends.OpenVinoDecoder(path, 1)
        backends.OpenVinoDecoder(path, 1)
    assert [r.getMessage() for r in caplog.records] == [f"{path}: {note}"]


def test_ort_decoder_threads_do_not_spin_lm_threads_do(tiny_export):
    """The decoder's worker threads must not busy-wait after a run (they would take a core from the
    LM that runs next); the LM's keep ONNX Runtime's default (spinning)."""
    from pipeline_lib.runtime.backends import OrtDecoder, OrtLM

    key = "session.intra_op.allow_spinning"
    dec = OrtDecoder(tiny_export / "soprano_decoder_preistft.onnx", 2)
    assert dec.session.get_session_options().get_session_config_entry(key) == "0"
    lm = OrtLM(tiny_export / LM_ONNX, 2)
    with pytest.raises(Exception):  # not set: ONNX Runtime's default (spin)
        lm.session.get_session_options().get_session_config_entry(key)


def test_ort_lm_io_binding_matches_plain_run(tiny_export):
    """OrtLM writes outputs into reused buffers and binds inputs by address, re-binding only arrays it
    has not seen: results must equal a plain session.run, also after in-place changes, new arrays,
    converted (int32) inputs and new shapes; a replaced input array is not kept alive."""
    import gc
    import weakref

    from pipeline_lib.runtime.backends import OrtLM

    spec = LMSpec.from_json(tiny_export / LM_JSON)
    lm = OrtLM(tiny_export / LM_ONNX, 1)
    rng = np.random.default_rng(0)

    def check(feed):
        ref = dict(zip(lm.output_names, lm.session.run(lm.output_names, {k: np.asarray(v, dtype=np.float32 if
                   k.startswith("past") else np.int64) for k, v in feed.items()})))
        out = lm.run(feed)
        assert set(out) == set(ref)
        for name, want in ref.items():
            np.testing.assert_allclose(out[name], want, rtol=0, atol=1e-5, err_msg=name)
        return out

    for b, s, p in [(2, 5, 0), (3, 1, 7), (1, 1, 9)]:
        feed = {"input_ids": rng.integers(4, 200, (b, s)), "attention_mask": np.ones((b, p + s), np.int64),
                "position_ids": np.tile(np.arange(p, p + s), (b, 1))}
        kv = (b, spec.num_kv_heads, p, spec.head_dim)
        feed.update((n, rng.standard_normal(kv, dtype=np.float32)) for n in spec.past_names)
        kept = check(feed)["new_key_0"]
        assert lm.run(feed)["new_key_0"] is kept  # same shapes: the same buffer, no new allocation
        if p:
            feed["past_key_0"] *= 0.5  # in place: the same object, new contents
            feed["attention_mask"][-1, 0] = 0
            check(feed)
        feed["input_ids"] = feed["input_ids"] + 1  # a new array object
        check(feed)
        check(dict(feed, input_ids=feed["input_ids"].astype(np.int32)))  # converted, bound as a copy
        feed["input_ids"][:] = 5  # then the original again, changed in place
        check(feed)
    last = spec.past_names[-1]
    old = weakref.ref(feed[last])
    feed[last] = feed[last].copy()
    check(feed)
    gc.collect()
    assert old() is None  # the binding does not keep a replaced array alive
    partial = {k: v for k, v in feed.items() if k != last}
    with pytest.raises(Exception, match=last):  # a missing input is an error, never a stale binding
        lm.run(partial)


def test_ort_lm_staged_inputs_and_the_repeat_path_match_plain_run(tiny_export):
    """Small inputs are copied into buffers bound once (ort_backend.STAGED_INPUT_BYTES) and a feed that
    repeats the last binding skips re-binding: results must equal a plain session.run through a
    generation's shape sequence (a prompt with empty caches, steps, a new prompt, caches replaced),
    with the step's small inputs new objects each call and the mask changed in place."""
    from pipeline_lib.runtime.backends import OrtLM
    from pipeline_lib.runtime.ort_backend import STAGED_INPUT_BYTES

    spec = LMSpec.from_json(tiny_export / LM_JSON)
    lm = OrtLM(tiny_export / LM_ONNX, 1)
    rng = np.random.default_rng(1)

    def check(feed):
        ref = lm.session.run(lm.output_names, feed)
        for name, got in zip(lm.output_names, map(lm.run(feed).get, lm.output_names)):
            np.testing.assert_allclose(got, ref[lm.output_names.index(name)], rtol=0, atol=1e-5, err_msg=name)

    def feed_for(s, p):
        feed = {"input_ids": rng.integers(4, 200, (1, s)), "attention_mask": np.ones((1, p + s), np.int64),
                "position_ids": np.arange(p, p + s)[None]}
        feed.update((n, rng.standard_normal((1, spec.num_kv_heads, p, spec.head_dim), dtype=np.float32))
                    for n in spec.past_names)
        return feed

    big = 1 + STAGED_INPUT_BYTES // (4 * spec.num_kv_heads * spec.head_dim)  # past arrays bound by address
    for s, p in [(6, 0), (1, big), (6, 0), (1, big)]:
        feed = feed_for(s, p)
        check(feed)
        for _ in range(3):  # the repeat path: same caches and mask object, new small arrays
            feed["input_ids"] = rng.integers(4, 200, (1, 1)) if s == 1 else feed["input_ids"] + 1
            feed["position_ids"] = feed["position_ids"] + 1
            feed["attention_mask"][0, 0] ^= 1  # in place
            check(feed)
        feed[spec.past_names[0]] = feed[spec.past_names[0]] + 1.0  # one cache array replaced
        check(feed)
        lm._default.release()  # as a leased stream is given back between generations
        check(feed)  # the stages outlive the release: refilled, not re-bound


def test_openvino_lm_shared_inputs_follow_in_place_changes(tiny_export):
    """OpenVinoLM binds fed arrays by memory: the same array object, changed in place and fed again,
    must give the new result; other integer types are converted (not rejected)."""
    pytest.importorskip("openvino")
    from pipeline_lib.runtime.backends import OpenVinoLM, OrtLM

    spec = LMSpec.from_json(tiny_export / LM_JSON)
    ov_lm, ort_lm = OpenVinoLM(tiny_export / LM_ONNX, 1), OrtLM(tiny_export / LM_ONNX, 1)
    rng = np.random.default_rng(3)
    kv = (2, spec.num_kv_heads, 6, spec.head_dim)
    feed = {"input_ids": np.array([[11], [12]], np.int64), "attention_mask": np.ones((2, 7), np.int64),
            "position_ids": np.array([[6], [6]], np.int64)}
    feed.update((n, rng.standard_normal(kv, dtype=np.float32)) for n in spec.past_names)
    for _ in range(2):
        want = ort_lm.run(feed)["logits"].copy()
        np.testing.assert_allclose(ov_lm.run(feed)["logits"], want, rtol=0, atol=1e-3)
        feed["past_key_0"] *= 0.5  # in place: the same object, new contents
        feed["attention_mask"][1, 2] = 0
    feed32 = dict(feed, input_ids=feed["input_ids"].astype(np.int32))
    np.testing.assert_allclose(ov_lm.run(feed32)["logits"], ort_lm.run(feed)["logits"], rtol=0, atol=1e-3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_free_heap_returns_freed_pages():
    """Freed heap blocks (under the mmap threshold) stay resident until release_free_heap trims them."""
    from pipeline_lib.runtime.backends import fix_malloc_mmap_threshold, release_free_heap

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    fix_malloc_mmap_threshold()
    blocks = [bytearray(256 * 1024) for _ in range(400)]  # 100 MiB of heap blocks, each page touched
    keep = blocks[-1]  # a live block at the top: the heap cannot simply shrink from its end
    del blocks
    before = rss_mib()
    assert release_free_heap() is True
    assert before - rss_mib() > 50, (before, rss_mib())
    assert keep[0] == 0


class _FixedWidthLM(FakeLM):
    """A FakeLM that asks for a fixed one-row cache width (as OpenVINO's static decode model does)."""

    WIDTH = 16

    def __init__(self) -> None:
        super().__init__()
        self.widths: list[tuple[int, int]] = []  # (rows, past width) of each decode step

    def static_kv_width(self, batch):
        return self.WIDTH if batch == 1 else None

    def run(self, feed):
        if feed["past_key_0"].shape[2]:
            self.widths.append((feed["input_ids"].shape[0], feed["past_key_0"].shape[2]))
        return super().run(feed)


def test_loop_keeps_one_row_cache_at_the_backends_static_width():
    params = SamplingParams(repetition_penalty=1.3)
    ref = generate(FakeLM(), FAKE_SPEC, FAKE_PROMPTS, max_new_tokens=20, params=params, kv_bucket=4)
    lm = _FixedWidthLM()
    got = generate(lm, FAKE_SPEC, FAKE_PROMPTS, max_new_tokens=20, params=params, kv_bucket=4)
    assert got.finish_reasons == ref.finish_reasons
    for a, b in [*zip(got.hidden, ref.hidden), *zip(got.tokens, ref.tokens)]:
        np.testing.assert_array_equal(a, b)
    one_row = [w for rows, w in lm.widths if rows == 1]
    assert one_row and all(w % lm.WIDTH == 0 for w in one_row)  # 16, then 32 once full: grows by the width
    assert {w for rows, w in lm.widths if rows > 1} <= set(range(4, 200, 4))  # kv_bucket elsewhere
    single = _FixedWidthLM()
    generate(single, FAKE_SPEC, [FAKE_PROMPTS[2]], max_new_tokens=20, params=params, kv_bucket=4)
    assert [w for _, w in single.widths][:9] == [16] * 9 and max(w for _, w in single.widths) == 32


def test_openvino_static_decode_model_equals_dynamic(tiny_export):
    """One-row decode steps at the static width run on OpenVINO's fixed-shape compilation, with the
    same results as the dynamic model; other shapes stay on the dynamic model."""
    pytest.importorskip("openvino")
    from pipeline_lib.runtime.backends import OpenVinoLM

    spec = LMSpec.from_json(tiny_export / LM_JSON)
    static, dynamic = OpenVinoLM(tiny_export / LM_ONNX, 1, static_decode_width=8), OpenVinoLM(tiny_export / LM_ONNX, 1, None)
    reads = []
    static._core.read_model = lambda *a, **k: reads.append(a)  # the static model must reuse the model read at load
    assert static.static_kv_width(1) == 8 and static.static_kv_width(2) is None and dynamic.static_kv_width(1) is None
    rng = np.random.default_rng(5)
    mask = np.ones((1, 9), np.int64)
    mask[0, 5:8] = 0  # unused cache columns, masked
    feed = {"input_ids": np.array([[17]], np.int64), "attention_mask": mask, "position_ids": np.array([[5]], np.int64)}
    feed.update((n, rng.standard_normal((1, spec.num_kv_heads, 8, spec.head_dim), dtype=np.float32)) for n in spec.past_names)
    got = {k: v.copy() for k, v in static.run(feed).items()}
    assert static._static is not None and reads == []
    assert static.model.get_parameters()[0].get_partial_shape().is_dynamic  # reshaped a clone, not the model itself
    want = dynamic.run(feed)
    for name in ("logits", "hidden_states", "new_key_0", "new_value_1"):
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4, err_msg=name)
    other = dict(feed, attention_mask=np.ones((1, 7), np.int64), **{n: feed[n][:, :, :6] for n in spec.past_names})
    np.testing.assert_allclose(static.run(other)["logits"], dynamic.run(other)["logits"], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="static_decode_width"):
        OpenVinoLM(tiny_export / LM_ONNX, 1, static_decode_width=0)


# --- the stateful OpenVINO LM (KV cache in OpenVINO state) ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_stateful(tiny_checkpoint, tiny_export, module_tmp):
    """A copy of the tiny export with OpenVINO IRs: the decoder, and the stateful LM with its config."""
    pytest.importorskip("openvino")
    from pipeline_lib.convert import convert_lm_to_openvino_stateful, convert_onnx_to_openvino
    from pipeline_lib.openvino_stateful import stateful_config
    from pipeline_lib.registry import STATEFUL_CONFIG

    d = module_tmp.mktemp("stateful") / "m"
    shutil.copytree(tiny_export, d)
    convert_onnx_to_openvino(d / "soprano_decoder_preistft.onnx", d / "soprano_decoder_preistft.xml")
    xml = convert_lm_to_openvino_stateful(tiny_checkpoint, d / "soprano_lm_stateful.xml")
    step_cfg = json.loads((d / "soprano_lm_step_config.json").read_text())
    (d / STATEFUL_CONFIG).write_text(json.dumps(stateful_config(step_cfg, {"file": xml.name})))
    return d


class _ForceStop:
    """Wraps an LM backend: on its n-th decode call (prefill calls are not counted: ONNX Runtime's loop
    prefills row by row), the row at batch index r gets [STOP] as its greedy choice (random weights
    never emit it), so that rows finish at different steps."""

    def __init__(self, lm, stop_id: int, at: dict[int, int]) -> None:
        self.lm, self.stop_id, self.at, self.calls = lm, stop_id, at, 0

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def run(self, feed):
        out = dict(self.lm.run(feed))
        self.calls += feed["attention_mask"].shape[1] > feed["input_ids"].shape[1]
        if self.calls in self.at:
            out["logits"] = np.array(out["logits"])
            out["logits"][self.at[self.calls], -1, self.stop_id] = 1e6
        return out


def test_stateful_generation_equals_onnx_runtime_as_rows_finish(tiny_export, tiny_stateful):
    """Three prompts of different lengths (left-padded prefill in one call), rows finishing at steps 3
    and 6 (beam_idx then drops them from OpenVINO's state): the same tokens, hidden states and finish
    reasons as ONNX Runtime with the explicit cache."""
    from pipeline_lib.runtime.backends import load_backends

    sf_spec = LMSpec.from_json(tiny_stateful / "soprano_lm_stateful_config.json")
    ort_spec = LMSpec.from_json(tiny_export / LM_JSON)
    assert sf_spec.stateful and not ort_spec.stateful
    sf, _ = load_backends("openvino_cpu", tiny_stateful / "soprano_lm_stateful.xml",
                          tiny_stateful / "soprano_decoder_preistft.xml", 1)
    ort, _ = load_backends("onnx_cpu", tiny_export / LM_ONNX, tiny_export / "soprano_decoder_preistft.onnx", 1)
    assert sf.stateful and sf.static_kv_width(1) is None
    prompts = [[3, 1, *range(7000, 7012), 2], [3, 1, 7050, 2], [3, 1, *range(7100, 7106), 2]]
    params = SamplingParams(0.0, 1.0, 0, 1.2)
    at = {3: 1, 6: 0}  # decode call k gives step k's token: row 1 stops at step 3, then row 0 at step 6
    outs = [generate(_ForceStop(lm, 3, at), spec, prompts, max_new_tokens=12, params=params)
            for lm, spec in ((sf, sf_spec), (ort, ort_spec))]
    got, ref = outs
    assert got.finish_reasons == ref.finish_reasons == ["stop", "stop", "length"]
    assert [len(t) for t in ref.tokens] == [7, 4, 12]
    for r in range(3):
        np.testing.assert_array_equal(got.tokens[r], ref.tokens[r])
        assert got.hidden[r].shape == ref.hidden[r].shape
        assert np.abs(got.hidden[r] - ref.hidden[r]).max() < 1e-3, r
    # A second generation starts from an empty state (reset), not from the first one's cache.
    again = generate(sf, sf_spec, prompts[2:], max_new_tokens=12, params=params)
    np.testing.assert_array_equal(again.tokens[0], ref.tokens[2])


def test_stateful_model_with_a_plain_config_is_an_error(tiny_export, tiny_stateful):
    from pipeline_lib.runtime.backends import load_backends

    sf, _ = load_backends("openvino_cpu", tiny_stateful / "soprano_lm_stateful.xml",
                          tiny_stateful / "soprano_decoder_preistft.xml", 1)
    with pytest.raises(ModelFileError, match="do not belong together"):
        generate(sf, LMSpec.from_json(tiny_export / LM_JSON), [[3, 1, 7000, 2]], max_new_tokens=2,
                 params=SamplingParams(0.0, 1.0, 0, 1.2))


def test_from_dir_prefers_the_stateful_lm_for_openvino(tiny_stateful, tts):
    """from_dir picks the stateful LM for OpenVINO; its audio equals ONNX Runtime's (two sentences, greedy)."""
    from pipeline_lib import SopranoTTS
    from pipeline_lib.parity import audio_metrics

    ov = SopranoTTS.from_dir(tiny_stateful, backend="openvino_cpu", num_threads=1)
    assert ov.lm_path.name == "soprano_lm_stateful.xml" and ov.lm.stateful and ov.spec.stateful
    got, ref = (t.synthesize(TWO_SENTENCES, max_new_tokens=20) for t in (ov, tts))
    assert got["sample_rate"] == 32000 and got["sentences"] == 2
    assert len(got["audio"]) == len(ref["audio"]) == 2 * 19 * 2048  # 20 tokens each, no [STOP]: random weights
    assert np.isfinite(got["audio"]).all() and np.abs(got["audio"]).max() > 0
    snr, rel = audio_metrics(ref["audio"], got["audio"])
    assert snr >= 60.0 and rel <= 1e-3, (snr, rel)  # the export's audio parity limits
    assert SopranoTTS.from_dir(tiny_stateful, num_threads=1).lm_path.name == "soprano_lm_step.onnx"

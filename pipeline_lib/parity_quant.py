"""Parity of a quantised (or lower-precision) target against the fp32 export, and the limits of stage
parity_convert.

`check_quantized` runs the fp32 reference and the target on the same inputs (a prompt shaped like a real
one, then greedy tokens chosen by the reference, teacher-forced into the target) and records in a
`pipeline_lib.parity.ParityReport`: the LM's hidden-state cosine (min, mean), top-1 agreement,
free-running agreement, the decoder's audio SNR, and end to end the log-mel distance (`log_mel_distance`)
and SNR; each figure is checked against `QuantParityThresholds`. `convert_thresholds` picks a target's
limits from params `parity.convert_<precision>` by the kind of check its precision names
(registry.Precision.parity: `ParityThresholds` for "reference", `QuantParityThresholds` for "quantized";
THRESHOLDS), with the `trained` block's values for a trained checkpoint; `has_quality_limits` says
whether a miss there is a quality verdict. The runners, the report and the reference checks
(check_decoder, check_lm) are pipeline_lib.parity's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from pipeline_lib import registry
from pipeline_lib.parity import (
    TRAINED_KEY,
    ParityReport,
    ParityThresholds,
    Runner,
    _extend_kv,
    audio_metrics,
)


@dataclass(frozen=True)
class QuantParityThresholds:
    """A quantised (or lower-precision) target against fp32 on the same inputs (conf/parity/default.yaml
    ``convert_<precision>`` says why these values)."""

    seed: int = 0
    prompt_tokens: int = 24
    decode_steps: int = 64
    lm_hidden_cosine_min: float = 0.99
    lm_token_agreement_min: float = 0.95
    decoder_audio_snr_db_min: float = 20.0
    # Optional limits (defaults that nothing misses); conf/parity sets them per precision.
    lm_hidden_cosine_mean_min: float = 0.0
    lm_free_running_agreement_min: float = 0.0   # share of the greedy sequence identical before the first departure
    audio_log_mel_distance_max: float = 1.0e9    # dB, end to end: test LM + test decoder vs fp32 LM + fp32 decoder

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "QuantParityThresholds":
        m = {k: v for k, v in m.items() if k != TRAINED_KEY}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(m) - known)
        if unknown:
            raise ValueError(f"unknown int8 parity params {unknown}; known: {sorted(known)}")
        return cls(**dict(m))


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64).reshape(-1, a.shape[-1]), b.astype(np.float64).reshape(-1, b.shape[-1])
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def lm_prompt(lm_config: Mapping[str, Any], prompt_tokens: int, seed: int) -> np.ndarray:
    """A prompt shaped like a real one, ``[STOP][TEXT] <text ids> [START]``, with random text-vocabulary ids."""
    sp = lm_config["special_tokens"]
    vocab = int(lm_config["vocab_size"])
    text_first = int(lm_config.get("audio_token_first_id", -1)) + int(lm_config.get("audio_token_count", 0))
    low = text_first if 0 < text_first < vocab else int(sp["stop"]) + 1
    body = np.random.default_rng(seed).integers(low, vocab, max(prompt_tokens - 3, 1))
    return np.array([[sp["stop"], sp["text"], *body, sp["start"]]], dtype=np.int64)


class _LMStepper:
    """Greedy KV-cache stepping over a Runner of the exported LM step model (batch 1)."""

    def __init__(self, run: Runner, lm_config: Mapping[str, Any]) -> None:
        self.run, self.layers = run, int(lm_config["num_layers"])
        self.kv_shape = (1, int(lm_config["num_kv_heads"]), 0, int(lm_config["head_dim"]))

    def prefill(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        self.length = ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(self.length)[None]}
        self.cache = [np.zeros(self.kv_shape, np.float32)] * (2 * self.layers)
        for i in range(self.layers):
            feed[f"past_key_{i}"], feed[f"past_value_{i}"] = self.cache[2 * i], self.cache[2 * i + 1]
        return self._run(feed)

    def step(self, token: int) -> dict[str, np.ndarray]:
        self.length += 1
        feed = {"input_ids": np.array([[token]], np.int64), "attention_mask": np.ones((1, self.length), np.int64),
                "position_ids": np.array([[self.length - 1]], np.int64)}
        for i in range(self.layers):
            feed[f"past_key_{i}"], feed[f"past_value_{i}"] = self.cache[2 * i], self.cache[2 * i + 1]
        return self._run(feed)

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.run(feed)
        self.cache = _extend_kv(self.cache, out, self.layers)
        return out


def check_quantized(
    ref_lm: Runner,
    test_lm: Runner,
    ref_decoder: Runner | None,
    test_decoder: Runner | None,
    lm_config: Mapping[str, Any],
    istft_config: Any,
    th: QuantParityThresholds,
    report: ParityReport | None = None,
) -> ParityReport:
    """A quantised LM + decoder against their fp32 reference, on the same inputs.

    LM: a prompt, then ``decode_steps`` greedy tokens chosen by the reference; the test model is fed the
    same tokens (teacher forcing, so one early disagreement cannot cascade). Metrics: cosine similarity of
    the final hidden states (prefill positions and every step; min and mean), agreement of the test's greedy
    choice with the reference's, and - for information - how many tokens the test model's own free-running
    greedy decode shares with the reference before it first departs.
    Free-running agreement: that count over ``decode_steps``.
    Decoder: the reference LM's hidden states of those tokens (the upstream convention: one per token)
    through both decoders, NumPy ISTFT, audio SNR; then end to end, the test LM's hidden states of the
    same tokens through the test decoder against the reference audio: log-mel distance (dB,
    `log_mel_distance`) and SNR. Skipped where the decoders are None (an LM checked beside one whose
    decoder was).
    """
    from pipeline_lib.audio.istft import istft

    report = report or ParityReport()
    ids = lm_prompt(lm_config, th.prompt_tokens, th.seed)
    ref, test = _LMStepper(ref_lm, lm_config), _LMStepper(test_lm, lm_config)
    r, t = ref.prefill(ids), test.prefill(ids)
    cos = [_cosine_rows(r["hidden_states"][0], t["hidden_states"][0])]
    ref_tokens, agree, hidden, test_hidden = [], [], [], []
    for step in range(th.decode_steps):
        token = int(r["logits"][0, -1].argmax())
        ref_tokens.append(token)
        agree.append(token == int(t["logits"][0, -1].argmax()))
        hidden.append(r["hidden_states"][0, -1])
        test_hidden.append(np.array(t["hidden_states"][0, -1]))
        if step + 1 < th.decode_steps:
            r, t = ref.step(token), test.step(token)
            cos.append(_cosine_rows(r["hidden_states"][0], t["hidden_states"][0]))
    cosines = np.concatenate(cos)
    report.check_min("lm_hidden_cosine_min", float(cosines.min()), th.lm_hidden_cosine_min)
    report.check_min("lm_hidden_cosine_mean", float(cosines.mean()), th.lm_hidden_cosine_mean_min)
    report.check_min("lm_token_agreement", float(np.mean(agree)), th.lm_token_agreement_min)
    report.metrics["lm_greedy_steps"] = float(th.decode_steps)

    # Free running: the test model's own greedy sequence, compared with the reference's.
    free = _LMStepper(test_lm, lm_config)
    out, same = free.prefill(ids), 0
    for step in range(th.decode_steps):
        token = int(out["logits"][0, -1].argmax())
        if token != ref_tokens[step]:
            break
        same += 1
        if step + 1 < th.decode_steps:
            out = free.step(token)
    report.metrics["lm_free_running_identical_tokens"] = float(same)
    report.check_min("lm_free_running_agreement", same / max(th.decode_steps, 1), th.lm_free_running_agreement_min)

    # Decoder: the same hidden states through both.
    if ref_decoder is None or test_decoder is None:
        return report
    feed = {"hidden_states": np.stack(hidden, -1)[None].astype(np.float32)}
    ref_audio = istft(ref_decoder(feed)["spectrum"], istft_config)
    test_audio = istft(test_decoder(feed)["spectrum"], istft_config)
    snr, rel = audio_metrics(ref_audio, test_audio)
    report.check_min("decoder_audio_snr_db", snr, th.decoder_audio_snr_db_min)
    report.metrics["decoder_audio_rel_max_abs"] = rel
    # End to end on the same token sequence: the test LM's hidden states (teacher-forced on the reference's
    # tokens) through the test decoder, against the reference's audio.
    e2e = istft(test_decoder({"hidden_states": np.stack(test_hidden, -1)[None].astype(np.float32)})["spectrum"],
                istft_config)
    report.check_max("audio_log_mel_distance_db", log_mel_distance(ref_audio, e2e), th.audio_log_mel_distance_max)
    report.metrics["audio_e2e_snr_db"] = float(audio_metrics(ref_audio, e2e)[0])
    return report


def _mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-style triangular mel filters (HTK mel scale), shape (n_mels, n_fft // 2 + 1)."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = hz(np.linspace(mel(0.0), mel(sample_rate / 2), n_mels + 2))
    lower = (freqs[None] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    upper = (edges[2:, None] - freqs[None]) / (edges[2:, None] - edges[1:-1, None])
    return np.maximum(0.0, np.minimum(lower, upper))


def log_mel_distance(reference: np.ndarray, test: np.ndarray, sample_rate: int = 32000, n_fft: int = 1024,
                     hop: int = 256, n_mels: int = 80, floor_db: float = -80.0) -> float:
    """Mean absolute difference in dB of two signals' log-mel spectrograms (Hann window, power, floored
    `floor_db` below the reference's peak): 0 for identical audio; ~1 dB is hard to hear, a broken model
    lands at 10+."""
    reference = np.asarray(reference, np.float64).reshape(-1)
    test = np.asarray(test, np.float64).reshape(-1)
    if reference.shape != test.shape:
        raise ValueError(f"audio shapes differ: reference {reference.shape}, test {test.shape}")
    if reference.size < n_fft:
        pad = n_fft - reference.size
        reference, test = np.pad(reference, (0, pad)), np.pad(test, (0, pad))
    window = np.hanning(n_fft + 1)[:-1]
    fb = _mel_filters(sample_rate, n_fft, n_mels)

    def logmel(x: np.ndarray) -> np.ndarray:
        frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * window
        power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
        return 10.0 * np.log10(power @ fb.T + 1e-20)

    a, b = logmel(reference), logmel(test)
    floor = a.max() + floor_db
    return float(np.mean(np.abs(np.maximum(a, floor) - np.maximum(b, floor))))


# The limits each kind of check reads (registry.Precision.parity), from params parity.convert_<precision>.
THRESHOLDS: dict[str, type] = {registry.PARITY_REFERENCE: ParityThresholds, registry.PARITY_QUANTIZED: QuantParityThresholds}


def convert_thresholds(precision: str, parity_params: Mapping[str, Any],
                       trained: bool = False) -> ParityThresholds | QuantParityThresholds:
    """The limits of stage parity_convert for a target of `precision` (params `parity.convert_<precision>`);
    with ``trained`` (the checkpoint's weights are not random), its ``trained`` block's values replace the
    guards'."""
    p = registry.precision(precision)
    if p.parity_key not in parity_params:
        raise ValueError(f"params parity.{p.parity_key} missing: the limits of parity_convert for {precision} "
                         "(conf/parity/default.yaml)")
    limits = dict(parity_params[p.parity_key])
    override = dict(limits.pop(TRAINED_KEY, None) or {})
    if trained:
        limits.update(override)
    return THRESHOLDS[p.parity].from_mapping(limits)


def has_quality_limits(precision: str, parity_params: Mapping[str, Any]) -> bool:
    """Whether `precision`'s limits have a ``trained`` block: only then is a trained checkpoint's miss a quality
    verdict (certificate "fail"); without one (fp32, checked against the torch reference) the limits stay
    guards, and a miss is a broken conversion on any checkpoint."""
    block = parity_params.get(registry.precision(precision).parity_key) or {}
    return bool(block.get(TRAINED_KEY))

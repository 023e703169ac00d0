"""Parity of the exported models against the torch reference: metrics, thresholds, verdicts.

Every check runs both sides on the same inputs and reports the difference (optimum's habit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

log = logging.getLogger(__name__)

# A runner maps named numpy inputs to named numpy outputs: an ORT session, an OpenVINO compiled model...
Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class ParityThresholds:
    seed: int = 0
    decoder_tokens: int = 48
    decoder_batch: int = 2
    spectral_max_abs: float = 1e-3
    audio_snr_db_min: float = 60.0
    audio_rel_max_abs: float = 1e-3
    prompt_tokens: int = 24
    lm_batch: int = 2
    lm_logits_max_abs: float = 1e-3
    lm_hidden_max_abs: float = 1e-3
    decode_steps: int = 64

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "ParityThresholds":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(m) - known)
        if unknown:
            raise ValueError(f"unknown parity params {unknown}; known: {sorted(known)}")
        return cls(**dict(m))


@dataclass
class ParityReport:
    metrics: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def check_max(self, name: str, value: float, limit: float) -> None:
        self.metrics[name] = float(value)
        if not value <= limit:  # also catches NaN
            self.failures.append(f"{name} = {value:.3g} exceeds {limit:.3g}")

    def check_min(self, name: str, value: float, limit: float) -> None:
        self.metrics[name] = float(value)
        if not value >= limit:
            self.failures.append(f"{name} = {value:.3g} is below {limit:.3g}")

    def merge(self, other: "ParityReport", prefix: str = "") -> None:
        self.metrics.update({prefix + k: v for k, v in other.metrics.items()})
        self.failures += [prefix + f for f in other.failures]

    @property
    def passed(self) -> bool:
        return not self.failures


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - test) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)


def audio_metrics(reference: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """(SNR in dB, max abs error relative to the reference's peak)."""
    if reference.shape != test.shape:
        raise ValueError(f"audio shapes differ: reference {reference.shape}, test {test.shape}")
    peak = float(np.abs(reference).max()) or 1.0
    return snr_db(reference, test), float(np.abs(reference - test).max()) / peak


def check_decoder(
    torch_decoder: Any,
    run_decoder: Runner,
    istft_config: Any,
    th: ParityThresholds,
    report: ParityReport | None = None,
) -> ParityReport:
    """Decoder spectrum and audio (exported model + NumPy ISTFT) against the torch decoder + torch.istft."""
    import torch

    from pipeline_lib.audio.istft import istft
    from pipeline_lib.model.decoder import spectrum_to_audio

    report = report or ParityReport()
    gen = torch.Generator().manual_seed(th.seed)
    hidden = torch.randn(th.decoder_batch, torch_decoder.dims.input_channels, th.decoder_tokens, generator=gen)
    with torch.no_grad():
        ref_spec = torch_decoder(hidden)
        ref_audio = spectrum_to_audio(ref_spec, torch_decoder.dims.n_fft, torch_decoder.dims.hop_length).numpy()
    spec = run_decoder({"hidden_states": hidden.numpy()})["spectrum"]
    if spec.shape != tuple(ref_spec.shape):
        raise ValueError(f"decoder output shape {spec.shape} differs from the reference {tuple(ref_spec.shape)}")
    report.check_max("decoder_spectral_max_abs", float(np.abs(spec - ref_spec.numpy()).max()), th.spectral_max_abs)
    audio = istft(spec, istft_config)
    snr, rel = audio_metrics(ref_audio, audio)
    report.check_min("decoder_audio_snr_db", snr, th.audio_snr_db_min)
    report.check_max("decoder_audio_rel_max_abs", rel, th.audio_rel_max_abs)
    return report


def _lm_feed(names: list[str], values: tuple[Any, ...]) -> dict[str, np.ndarray]:
    return {n: (v.numpy() if hasattr(v, "numpy") else v) for n, v in zip(names, values)}


def check_lm(
    torch_lm: Any,
    run_lm: Runner,
    stop_id: int,
    th: ParityThresholds,
    report: ParityReport | None = None,
) -> ParityReport:
    """Prefill logits / hidden against torch; a greedy KV-cache decode against full forwards without cache."""
    import torch

    report = report or ParityReport()
    cfg = torch_lm.cfg
    names = torch_lm.input_names()
    gen = torch.Generator().manual_seed(th.seed)
    b, s = th.lm_batch, th.prompt_tokens
    # Text-like prompt ids: anything but [STOP], so generation is free to run all steps.
    ids = torch.randint(stop_id + 1, cfg.vocab_size, (b, s), generator=gen)
    mask = torch.ones(b, s, dtype=torch.int64)
    if b > 1:
        mask[1, : s // 3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    empty = torch_lm.empty_cache(b)
    with torch.no_grad():
        ref = torch_lm(ids, mask, pos, *empty)
    out = run_lm(_lm_feed(names, (ids, mask, pos, *empty)))
    keep = mask.bool().numpy()
    report.check_max("lm_prefill_logits_max_abs", float(np.abs(out["logits"] - ref[0].numpy())[keep].max()), th.lm_logits_max_abs)
    report.check_max("lm_prefill_hidden_max_abs", float(np.abs(out["hidden_states"] - ref[1].numpy())[keep].max()), th.lm_hidden_max_abs)

    # Greedy decode on the exported model with its KV cache.
    present = [out[f"present_{k}_{i}"] for i in range(cfg.num_layers) for k in ("key", "value")]
    logits = out["logits"][:, -1]
    seq_ids, seq_mask = ids.numpy(), mask.numpy()
    step_logits, step_hidden = [], []
    for _ in range(th.decode_steps):
        nxt = logits.argmax(-1)[:, None].astype(np.int64)
        seq_ids = np.concatenate([seq_ids, nxt], 1)
        seq_mask = np.concatenate([seq_mask, np.ones((b, 1), np.int64)], 1)
        step_pos = seq_mask.sum(-1, keepdims=True) - 1
        o = run_lm(_lm_feed(names, (nxt, seq_mask, step_pos, *present)))
        present = [o[f"present_{k}_{i}"] for i in range(cfg.num_layers) for k in ("key", "value")]
        logits = o["logits"][:, -1]
        step_logits.append(logits)
        step_hidden.append(o["hidden_states"][:, -1])
    # The same sequence in one full forward without cache: logits at each decode position.
    full_mask = torch.from_numpy(seq_mask)
    full_pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = torch_lm(torch.from_numpy(seq_ids), full_mask, full_pos, *empty)
    full_logits = full[0].numpy()[:, s:]
    full_hidden = full[1].numpy()[:, s:]
    report.check_max("lm_decode_logits_max_abs", float(np.abs(np.stack(step_logits, 1) - full_logits).max()), th.lm_logits_max_abs)
    report.check_max("lm_decode_hidden_max_abs", float(np.abs(np.stack(step_hidden, 1) - full_hidden).max()), th.lm_hidden_max_abs)
    # Greedy choices of the full forward: the token after each prefix must be the one the cache loop chose.
    ref_tokens = np.concatenate([ref[0].numpy()[:, -1:].argmax(-1), full_logits[:, :-1].argmax(-1)], 1)
    agree = float((ref_tokens == seq_ids[:, s:]).mean())
    report.metrics["lm_greedy_steps"] = float(th.decode_steps)
    report.check_min("lm_greedy_token_agreement", agree, 1.0)
    return report


def ort_runner(path: Path, num_threads: int = 1) -> Runner:
    from pipeline_lib.export.onnx_io import ort_session

    sess = ort_session(path, num_threads)
    outputs = [o.name for o in sess.get_outputs()]

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, sess.run(outputs, feed)))

    return run


def format_report(report: ParityReport) -> str:
    lines = [f"  {k:32s} {v:.6g}" for k, v in report.metrics.items()]
    lines += [f"  FAIL {f}" for f in report.failures]
    lines.append("  parity: " + ("PASS" if report.passed else f"FAIL ({len(report.failures)} metric(s) missed)"))
    return "\n".join(lines)

"""Parity of the exported models against the torch reference: metrics, thresholds, verdicts.

Every check runs both sides on the same inputs and reports the difference (optimum's habit).
Here: the report (`ParityReport`), the reference checks (`check_decoder`, `check_lm`) and their limits
(`ParityThresholds`), and the runners of an exported or converted model (`runner_for`, `model_file`).
A quantised target against the fp32 export (`check_quantized`) and the choice of each target's limits
for stage parity_convert (`convert_thresholds`) are pipeline_lib.parity_quant's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from pipeline_lib import registry
from pipeline_lib.errors import ModelFileError

log = logging.getLogger(__name__)

# A runner maps named numpy inputs to named numpy outputs: an ORT session, an OpenVINO compiled model...
Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


# Inside parity.convert_<precision>: the limits that replace the guards when the checkpoint is trained
# (conf/parity/default.yaml gives the reasons; parity_quant.convert_thresholds applies them, from_mapping ignores them).
TRAINED_KEY = "trained"


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
        m = {k: v for k, v in m.items() if k != TRAINED_KEY}
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
    """Prefill logits / hidden against torch (the logits of every position, or of the last where the model
    computes only those); a greedy KV-cache decode against full forwards without cache."""
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
    # The fused graph computes the last position's logits only (export/lm_fused.py): compare those it has.
    # Anything else (a graph that lost positions) is an error, not a smaller comparison.
    n = out["logits"].shape[1]
    if n not in (1, s) or (n == 1 and not keep[:, -1].all()):
        raise ValueError(f"the LM returned logits for {n} of {s} prompt positions; expected all {s}, or the last "
                         "(the fused graph) with every row's last token kept")
    report.check_max("lm_prefill_logits_max_abs", float(np.abs(out["logits"] - ref[0].numpy()[:, -n:])[keep[:, -n:]].max()),
                     th.lm_logits_max_abs)
    report.check_max("lm_prefill_hidden_max_abs", float(np.abs(out["hidden_states"] - ref[1].numpy())[keep].max()), th.lm_hidden_max_abs)

    # Greedy decode on the exported model with its KV cache (past joined with each call's new_*).
    past = _extend_kv([e.numpy() for e in empty], out, cfg.num_layers)
    logits = out["logits"][:, -1]
    seq_ids, seq_mask = ids.numpy(), mask.numpy()
    step_logits, step_hidden = [], []
    for _ in range(th.decode_steps):
        nxt = logits.argmax(-1)[:, None].astype(np.int64)
        seq_ids = np.concatenate([seq_ids, nxt], 1)
        seq_mask = np.concatenate([seq_mask, np.ones((b, 1), np.int64)], 1)
        step_pos = seq_mask.sum(-1, keepdims=True) - 1
        o = run_lm(_lm_feed(names, (nxt, seq_mask, step_pos, *past)))
        past = _extend_kv(past, o, cfg.num_layers)
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
    """A Runner of an ONNX file. The fused LM graph (in-place KV buffers: present_* outputs for past_*
    inputs) is run through `_buffer_runner`, so that every check here feeds it the traced step's interface."""
    from pipeline_lib.export.onnx_io import ort_session

    sess = ort_session(path, num_threads)
    outputs = [o.name for o in sess.get_outputs()]

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, sess.run(outputs, feed)))

    if "present_key_0" in outputs and "past_key_0" in (i.name for i in sess.get_inputs()):
        return _buffer_runner(run, [o for o in outputs if o.startswith("present_")])
    return run


def _buffer_runner(run: Runner, present: list[str]) -> Runner:
    """The traced step's interface (attention_mask [B, P + S] over the past and the new tokens, rows with any
    masked columns; new_* outputs) on a model with in-place KV buffers (runtime.kv_cache's contract: row
    b's tokens in columns [0, len_b)): each row's kept past columns are packed into a buffer, each row's
    kept new tokens run (row by row where S > 1, which ONNX Runtime's GroupQueryAttention needs), and the
    outputs go back to the tokens' places (masked tokens' outputs are zeros; nothing reads them). The
    logits stay the fused graph's: [B, 1, vocab], each row's last kept token's."""

    def call(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask, ids = np.asarray(feed["attention_mask"]), np.asarray(feed["input_ids"])
        batch, seq = ids.shape
        names = [n.replace("present_", "past_") for n in present]
        past_len = mask.shape[1] - seq
        groups = [[b] for b in range(batch)] if seq > 1 else [list(range(batch))]
        out: dict[str, np.ndarray] = {}
        for rows in groups:
            cols = [np.flatnonzero(mask[b, :past_len]) for b in rows]
            new = [np.flatnonzero(mask[b, past_len:]) for b in rows]
            n_new = len(new[0])
            if any(len(x) != n_new for x in new) or n_new == 0:
                raise ValueError("the rows of one call must have the same number of kept new tokens")
            width = max(len(c) for c in cols) + n_new
            f = {"input_ids": np.stack([ids[b, x] for b, x in zip(rows, new)]),
                 "position_ids": np.stack([np.asarray(feed["position_ids"])[b, x] for b, x in zip(rows, new)]),
                 "attention_mask": np.zeros((len(rows), width), np.int64)}
            for i, c in enumerate(cols):
                f["attention_mask"][i, : len(c) + n_new] = 1
            for name in names:
                p = np.asarray(feed[name])
                buf = np.zeros((len(rows), p.shape[1], width, p.shape[3]), np.float32)
                for i, (b, c) in enumerate(zip(rows, cols)):
                    buf[i, :, : len(c)] = p[b][:, c]
                f[name] = buf
            o = run(f)
            logits = out.setdefault("logits", np.zeros((batch, 1, o["logits"].shape[-1]), np.float32))
            hidden = out.setdefault("hidden_states", np.zeros((batch, seq, o["hidden_states"].shape[-1]), np.float32))
            for i, (b, x) in enumerate(zip(rows, new)):
                logits[b, 0] = o["logits"][i, -1]
                hidden[b, x] = o["hidden_states"][i]
            for name, pres in zip(names, present):
                key = pres.replace("present_", "new_")
                shape = (batch, o[pres].shape[1], seq, o[pres].shape[3])
                dst = out.setdefault(key, np.zeros(shape, np.float32))
                for i, (b, c, x) in enumerate(zip(rows, cols, new)):
                    dst[b][:, x] = o[pres][i, :, len(c): len(c) + n_new]
        return out

    return call


def format_report(report: ParityReport) -> str:
    lines = [f"  {k:32s} {v:.6g}" for k, v in report.metrics.items()]
    lines += [f"  FAIL {f}" for f in report.failures]
    lines.append("  parity: " + ("PASS" if report.passed else f"FAIL ({len(report.failures)} metric(s) missed)"))
    return "\n".join(lines)


def openvino_runner(xml_path: Path, num_threads: int = 1, inference_precision: str = "f32") -> Runner:
    """A Runner over an OpenVINO IR compiled for CPU as the runtime does (openvino_ir.ov_cpu_config), in
    `inference_precision` (the target's registry.Precision.inference: f32 unless a precision says otherwise)."""
    from pipeline_lib.openvino_ir import compile_openvino, load_openvino_model

    model = load_openvino_model(xml_path)
    compiled = compile_openvino(model, num_threads, inference_precision=inference_precision)
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)
    if model.get_sinks():
        return _stateful_runner(request, outputs)

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # share_inputs: no copy of the (KV cache) inputs into the request; they are not touched meanwhile.
        result = request.infer(feed, share_inputs=True)
        # Copies: the request reuses its output buffers on the next call (the KV cache goes back in).
        arrays = [np.array(result[o], copy=True) for o in outputs]
        return {name: a for o, a in zip(outputs, arrays) for name in o.get_names()}

    return run


def _stateful_runner(request: Any, outputs: list[Any]) -> Runner:
    """A Runner over the stateful LM (pipeline_lib.openvino_stateful) that takes the step model's feeds:
    the past_* inputs are ignored (the model holds the cache; the checks here always feed the whole
    cache so far, i.e. what the state holds), a call without past columns starts afresh
    (reset_state), every row continues (beam_idx = 0..B-1). Outputs have no new_*: `_extend_kv` then
    leaves the (ignored) past as it is."""

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, mask = feed["input_ids"], feed["attention_mask"]
        if mask.shape[1] == ids.shape[1]:
            request.reset_state()
        f = {"input_ids": ids, "attention_mask": mask, "position_ids": feed["position_ids"],
             "beam_idx": np.arange(ids.shape[0], dtype=np.int32)}
        result = request.infer(f)
        return {name: np.array(result[o], copy=True) for o in outputs for name in o.get_names()}

    return run


def _extend_kv(past: list[np.ndarray], out: Mapping[str, np.ndarray], layers: int) -> list[np.ndarray]:
    """The next past_* inputs: each layer's past joined with the step's new_* outputs (copied, since a
    runner may reuse its output buffers). A stateful runner returns no new_*: it keeps the cache itself."""
    if "new_key_0" not in out:
        return past
    new = [out[f"new_{k}_{i}"] for i in range(layers) for k in ("key", "value")]
    return [np.concatenate((p, np.asarray(n)), axis=2) for p, n in zip(past, new, strict=True)]


def runner_for(path: Path, num_threads: int = 1, inference_precision: str = "f32") -> Runner:
    """ONNX Runtime for a .onnx file, OpenVINO (in `inference_precision`) for a .xml IR."""
    path = Path(path)
    if path.suffix == ".xml":
        return openvino_runner(path, num_threads, inference_precision)
    return ort_runner(path, num_threads)


def model_file(folder: Path | str, which: str) -> Path:
    """The model file (.onnx or .xml) in an ``lm`` or ``decoder`` folder (export or target), as its
    config names it (registry.MODELS)."""
    spec = registry.MODELS[which]
    folder = Path(folder)
    cfg_path = folder / spec.config
    if not cfg_path.is_file():
        raise ModelFileError(f"{cfg_path}: config not found; expected an exported or converted {which} folder.")
    return folder / spec.block(json.loads(cfg_path.read_text()))["file"]

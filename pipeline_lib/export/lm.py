"""Export the LM as one ONNX step model with an explicit KV cache, and its JSON description."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline_lib.errors import ExportError
from pipeline_lib.export.onnx_io import DEFAULT_OPSET, constant_reshape_shapes, export_to_onnx, ort_session
from pipeline_lib.fsutil import write_json
from pipeline_lib.export.lm_fused import fused_interface
from pipeline_lib.model.lm import LMConfig, SopranoLMStep, load_lm
from pipeline_lib.registry import FUSED_FILE, LM_CONFIG, LM_FILE, TOKENIZER_FILE, TOKENIZER_FILES

log = logging.getLogger(__name__)
LM_ONNX = f"{LM_FILE}.onnx"
FUSED_ONNX = f"{FUSED_FILE}.onnx"
SPECIAL_TOKENS = ("[UNK]", "[TEXT]", "[START]", "[STOP]")
KV_LAYOUT = ["batch", "num_kv_heads", "past_sequence", "head_dim"]


@dataclass(frozen=True)
class LMExport:
    onnx_path: Path
    config_path: Path
    max_abs_error: float  # logits, ONNX vs torch, the largest over the export check inputs
    fused_path: Path  # the same step model as ONNX Runtime's fused graph (export/lm_fused.py)
    fused_max_abs_error: float  # its logits (last position) and hidden states vs torch, same check inputs


def special_token_ids(tokenizer_json: Path) -> dict[str, int]:
    """Ids of the special tokens and of the audio tokens, read from tokenizer.json."""
    data = json.loads(tokenizer_json.read_text())
    vocab = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab.update(data.get("model", {}).get("vocab", {}))
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ExportError(f"{tokenizer_json}: special tokens {missing} not found; expected {list(SPECIAL_TOKENS)}.")
    ids = {t.strip("[]").lower(): vocab[t] for t in SPECIAL_TOKENS}
    audio = sorted(i for tok, i in vocab.items() if tok[1:-1].isdigit() and tok.startswith("["))
    ids["audio_first"] = audio[0] if audio else -1
    ids["audio_count"] = len(audio)
    return ids


def lm_config_dict(model: SopranoLMStep, tokens: dict[str, int]) -> dict:
    c = model.cfg
    inputs = [
        {"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
        {"name": "attention_mask", "shape": ["batch", "past_sequence + sequence"], "dtype": "int64"},
        {"name": "position_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
    ]
    outputs = [
        {"name": "logits", "shape": ["batch", "sequence", c.vocab_size], "dtype": "float32"},
        {"name": "hidden_states", "shape": ["batch", "sequence", c.hidden_size], "dtype": "float32"},
    ]
    for i in range(c.num_layers):
        for kind in ("key", "value"):
            inputs.append({"name": f"past_{kind}_{i}", "shape": KV_LAYOUT, "dtype": "float32"})
    for i in range(c.num_layers):
        for kind in ("key", "value"):
            outputs.append(
                {"name": f"new_{kind}_{i}", "shape": [*KV_LAYOUT[:2], "sequence", KV_LAYOUT[3]], "dtype": "float32"}
            )
    return {
        "file": LM_ONNX,
        # The same step as ONNX Runtime's fused graph (export/lm_fused.py): the file that the ONNX Runtime
        # targets are converted from (pipeline_lib.convert), with its own interface (in-place KV buffers,
        # "ort_interface" replaces kv_cache / inputs / outputs / kv_note there); OpenVINO converts `file`.
        "ort_file": FUSED_ONNX,
        "ort_interface": fused_interface(c),
        "inputs": inputs,
        "outputs": outputs,
        "kv_layout": KV_LAYOUT,
        "kv_note": (
            "new_* are this call's tokens only: the next past_* is past_* and new_* joined on the sequence axis; "
            "keys are stored after k-norm and rotary embedding; attention_mask marks each row's tokens and the "
            "new ones last (pipeline_lib.runtime.kv_cache)"
        ),
        "hidden_states": "final-norm last-layer hidden state",
        "special_tokens": {k: tokens[k] for k in ("unk", "text", "start", "stop")},
        "audio_token_first_id": tokens["audio_first"],
        "audio_token_count": tokens["audio_count"],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
    }


def example_inputs(model: SopranoLMStep, batch: int, past: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the given sizes: left padding on row 1 when batch > 1, random cache."""
    c = model.cfg
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, c.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    if batch > 1:
        mask[1, : min(2, past + seq - 1)] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    cache = [torch.randn(batch, c.num_kv_heads, past, c.head_dim, generator=gen) for _ in range(2 * c.num_layers)]
    return (ids, mask, pos, *cache)


def export_lm(ckpt_dir: Path | str, out_dir: Path | str, opset: int = DEFAULT_OPSET) -> LMExport:
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_lm(ckpt_dir)
    tokens = special_token_ids(ckpt_dir / TOKENIZER_FILE)
    if tokens["stop"] >= model.cfg.vocab_size:
        raise ExportError(f"{ckpt_dir / TOKENIZER_FILE}: [STOP] id {tokens['stop']} >= vocab size {model.cfg.vocab_size}.")
    dyn: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
        "hidden_states": {0: "batch", 1: "sequence"},
    }
    for i in range(model.cfg.num_layers):
        for kind in ("key", "value"):
            dyn[f"past_{kind}_{i}"] = {0: "batch", 2: "past_sequence"}
            dyn[f"new_{kind}_{i}"] = {0: "batch", 2: "sequence"}
    onnx_path = export_to_onnx(
        model,
        example_inputs(model, batch=2, past=3, seq=4),
        out_dir / LM_ONNX,
        input_names=model.input_names(),
        output_names=model.output_names(),
        dynamic_axes=dyn,
        opset=opset,
        # The cache may be empty (prefill): -1 must not stand for a dimension that can be 0.
        postprocess=lambda graph: constant_reshape_shapes(graph, may_be_zero=["past_sequence"]),
    )
    fused_path = write_fused_lm(model, out_dir / FUSED_ONNX, opset)
    err = _check_against_torch(model, onnx_path)
    fused_err = _check_fused_against_torch(model, fused_path)
    config_path = out_dir / LM_CONFIG
    write_json(config_path, lm_config_dict(model, tokens))
    log.info("LM export check: logits max abs error %.3g (fused graph: %.3g)", err, fused_err)
    return LMExport(onnx_path, config_path, err, fused_path, fused_err)


def write_fused_lm(model: SopranoLMStep, path: Path, opset: int = DEFAULT_OPSET) -> Path:
    """ONNX Runtime's fused graph of `model` (export/lm_fused.py), written atomically."""
    import onnx

    from pipeline_lib.export.lm_fused import build_fused_lm
    from pipeline_lib.fsutil import atomic_file

    with atomic_file(path) as tmp:
        try:
            onnx.save(build_fused_lm(model, opset), str(tmp))
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise ExportError(f"writing {path.name} failed: {exc}") from exc
    return path


def _check_against_torch(model: SopranoLMStep, onnx_path: Path) -> float:
    """The largest logits error of the ONNX file against torch over the real tokens of check inputs of
    sizes that differ from each other, so that a constant Reshape shape taking the wrong dimension shows
    here: prefill with and without padding, decode steps of one and of several rows, a masked gap."""
    sess = ort_session(onnx_path)
    err = 0.0
    for seed, (batch, past, seq) in enumerate([(1, 5, 2), (3, 7, 1), (2, 0, 4)], start=1):
        check = list(example_inputs(model, batch=batch, past=past, seq=seq, seed=seed))
        if batch > 2:  # a gap inside row 2's cache, as a row that joined a running batch has
            check[1][2, 3] = 0
            check[2] = (check[1].cumsum(-1) - 1).clamp(min=0)[:, past:]
        with torch.no_grad():
            ref = model(*check)[0].numpy()
        got = sess.run(["logits"], dict(zip(model.input_names(), (t.numpy() for t in check))))[0]
        if got.shape != ref.shape:
            raise ExportError(f"{onnx_path}: ONNX logits shape {got.shape} differs from torch's {ref.shape}.")
        real = check[1][:, past:].numpy() > 0  # a padding position's output is never read
        err = max(err, float(np.abs(got - ref)[real].max()))
    return err


def fused_example(model: SopranoLMStep, lens: list[int], seq: int, width: int, seed: int = 0):
    """One step on rows with `lens` cached tokens each and `seq` new ones, both ways: the torch reference's
    inputs (each row's past then the new tokens, the others masked) and the fused graph's feed (buffers of
    `width` columns, row b's past in [0, lens[b]), export/lm_fused.py)."""
    c = model.cfg
    gen = torch.Generator().manual_seed(seed)
    batch, past = len(lens), max(lens)
    ids = torch.randint(0, c.vocab_size, (batch, seq), generator=gen)
    cache = [torch.randn(batch, c.num_kv_heads, past, c.head_dim, generator=gen) for _ in range(2 * c.num_layers)]
    mask = torch.zeros(batch, past + seq, dtype=torch.int64)
    mask[:, past:] = 1
    pos = torch.zeros(batch, seq, dtype=torch.int64)
    feed_mask = np.zeros((batch, width), np.int64)
    bufs = [np.zeros((batch, c.num_kv_heads, width, c.head_dim), np.float32) for _ in cache]
    for b, n in enumerate(lens):
        mask[b, :n] = 1
        pos[b] = torch.arange(n, n + seq)
        feed_mask[b, : n + seq] = 1
        for buf, t in zip(bufs, cache):
            buf[b, :, :n] = t[b, :, :n].numpy()
    feed = {"input_ids": ids.numpy(), "attention_mask": feed_mask, "position_ids": pos.numpy()}
    feed.update(zip([n for n in model.input_names() if n.startswith("past_")], bufs))
    return (ids, mask, pos, *cache), feed


def _check_fused_against_torch(model: SopranoLMStep, onnx_path: Path) -> float:
    """The largest error of the fused graph against torch, its logits (the last position's), its hidden
    states (every position's) and the keys / values it writes into the buffers: a prompt alone, a prompt
    after a cached part, a decode step of rows of different lengths."""
    sess = ort_session(onnx_path)
    err = 0.0
    for seed, (lens, seq, width) in enumerate([([0], 4, 8), ([5], 2, 8), ([7, 3, 5], 1, 12)], start=1):
        x, feed = fused_example(model, lens, seq, width, seed)
        with torch.no_grad():
            ref = [t.numpy() for t in model(*x)]
        present = [n.replace("new_", "present_") for n in model.output_names()[2:]]
        got = sess.run(["logits", "hidden_states", *present], feed)  # no binding: present_* are copies
        if got[0].shape != ref[0][:, -1:].shape:
            raise ExportError(f"{onnx_path}: fused logits shape {got[0].shape}, expected the last position's "
                              f"{ref[0][:, -1:].shape}.")
        err = max(err, float(np.abs(got[0] - ref[0][:, -1:]).max()), float(np.abs(got[1] - ref[1]).max()))
        for b, n in enumerate(lens):
            for p, new in zip(got[2:], ref[2:]):
                err = max(err, float(np.abs(p[b, :, n: n + seq] - new[b]).max()))
    return err


def copy_tokenizer_files(ckpt_dir: Path | str, out_dir: Path | str) -> list[Path]:
    """Copy the tokenizer beside the LM so the export folder is self-contained for the runtime."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        src = Path(ckpt_dir) / name
        if src.is_file():
            copied.append(Path(shutil.copy2(src, Path(out_dir) / name)))
        elif name == TOKENIZER_FILE:
            raise ExportError(f"{src}: not found; the runtime needs the checkpoint's {TOKENIZER_FILE}.")
    return copied

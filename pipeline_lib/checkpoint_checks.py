"""Check a Soprano checkpoint folder: the upstream layout, and the shapes and ids read from its files.

A checkpoint folder holds the upstream files (``CHECKPOINT_FILES``). ``validate_checkpoint`` reads every
shape from them (config.json, model.safetensors, decoder.pth, tokenizer.json), so later stages never rely
on hard-coded dimensions, and returns them as a ``CheckpointInfo``; a bad folder raises one
``CheckpointError`` naming the offending file. Nothing here writes: making or fetching a checkpoint is
``pipeline_lib.checkpoint``'s job.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_lib.errors import CheckpointError

CHECKPOINT_FILES: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "decoder.pth",
)
OFFLINE_CHOICES = "`checkpoint=random-80m`, `checkpoint=tiny`, or `checkpoint=local checkpoint.path=DIR`"

# Upstream SopranoDecoder() defaults; the ones not stored in decoder.pth are fixed by upstream code.
DECODER_DEFAULTS: dict[str, int] = {
    "input_channels": 512,
    "dim": 768,
    "intermediate_dim": 2304,
    "num_layers": 8,
    "n_fft": 2048,
    "dw_kernel": 3,
}
HOP_LENGTH = 512
UPSCALE = 4
SAMPLE_RATE = 32000
SPECIAL_TOKENS: tuple[str, ...] = ("[UNK]", "[TEXT]", "[START]", "[STOP]")
NUM_AUDIO_TOKENS = 8000


@dataclass
class CheckpointInfo:
    """Shapes and ids read from a validated checkpoint directory."""

    path: Path
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    intermediate_size: int
    tie_word_embeddings: bool
    decoder_input_channels: int
    decoder_dim: int
    decoder_intermediate_dim: int
    decoder_num_layers: int
    n_fft: int
    dw_kernel: int
    unk_id: int
    text_id: int
    start_id: int
    stop_id: int
    audio_token_offset: int
    num_audio_tokens: int
    tokenizer_vocab_size: int
    # Not stored in the checkpoint: fixed by upstream code (SopranoDecoder defaults, 32 kHz audio).
    hop_length: int = HOP_LENGTH
    upscale: int = UPSCALE
    sample_rate: int = SAMPLE_RATE

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (path as a string)."""
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


def _missing_file_error(path: Path, name: str) -> CheckpointError:
    return CheckpointError(
        f"{path / name}: missing file {name}. An upstream Soprano checkpoint holds {', '.join(CHECKPOINT_FILES)}. "
        f"Fetch one with the pipeline's fetch stage ({OFFLINE_CHOICES} offline) or copy the missing file in."
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc}); re-fetch the checkpoint") from exc


def expected_decoder_shapes(
    input_channels: int, dim: int, intermediate_dim: int, num_layers: int, n_fft: int, dw_kernel: int
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an upstream ``SopranoDecoder`` state_dict with these dimensions, in upstream order."""
    shapes: dict[str, tuple[int, ...]] = {
        "decoder.embed.weight": (dim, input_channels, 1),
        "decoder.embed.bias": (dim,),
        "decoder.norm.weight": (dim,),
        "decoder.norm.bias": (dim,),
    }
    for i in range(num_layers):
        p = f"decoder.convnext.{i}."
        shapes.update(
            {
                p + "gamma": (dim,),
                p + "dwconv.weight": (dim, 1, dw_kernel),
                p + "dwconv.bias": (dim,),
                p + "norm.weight": (dim,),
                p + "norm.bias": (dim,),
                p + "pwconv1.weight": (intermediate_dim, dim),
                p + "pwconv1.bias": (intermediate_dim,),
                p + "pwconv2.weight": (dim, intermediate_dim),
                p + "pwconv2.bias": (dim,),
            }
        )
    shapes.update(
        {
            "decoder.final_layer_norm.weight": (dim,),
            "decoder.final_layer_norm.bias": (dim,),
            "head.out.weight": (n_fft + 2, dim),
            "head.out.bias": (n_fft + 2,),
            "head.istft.window": (n_fft,),
        }
    )
    return shapes


def _decoder_dims(found: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Read the dimensions from anchor tensors, falling back to upstream defaults where one is absent."""
    d = dict(DECODER_DEFAULTS)
    shape = found.get("decoder.embed.weight")
    if shape is not None and len(shape) == 3:
        d["dim"], d["input_channels"] = shape[0], shape[1]
    shape = found.get("decoder.convnext.0.pwconv1.weight")
    if shape is not None and len(shape) == 2:
        d["intermediate_dim"] = shape[0]
    shape = found.get("decoder.convnext.0.dwconv.weight")
    if shape is not None and len(shape) == 3:
        d["dw_kernel"] = shape[2]
    blocks = {int(m.group(1)) for k in found if (m := re.match(r"decoder\.convnext\.(\d+)\.", k))}
    if blocks:
        d["num_layers"] = max(blocks) + 1
    shape = found.get("head.out.weight")
    if shape is not None and len(shape) == 2:
        d["n_fft"] = shape[0] - 2
    return d


def _check_decoder(path: Path) -> dict[str, int]:
    import torch

    f = path / "decoder.pth"
    try:
        # mmap: only the headers are touched, the 30M parameters are not read.
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{f}: cannot load decoder.pth as a torch state_dict ({exc}); re-fetch the checkpoint") from exc
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{f}: expected a state_dict (a mapping of tensors), found {type(sd).__name__}")
    found = {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}
    dims = _decoder_dims(found)
    expected = expected_decoder_shapes(**dims)
    for key, shape in expected.items():
        if key not in found:
            raise CheckpointError(
                f"{f}: decoder.pth does not match upstream SopranoDecoder: key {key!r} missing "
                f"(expected shape {list(shape)}, found none)"
            )
        if found[key] != shape:
            raise CheckpointError(
                f"{f}: decoder.pth does not match upstream SopranoDecoder: key {key!r} "
                f"expected shape {list(shape)}, found {list(found[key])}"
            )
    extra = [k for k in sd if k not in expected]
    if extra:
        raise CheckpointError(f"{f}: decoder.pth has unexpected key {extra[0]!r} (upstream SopranoDecoder has no such key)")
    return dims


def _check_lm_weights(path: Path, cfg: Mapping[str, Any]) -> None:
    from safetensors import safe_open

    f = path / "model.safetensors"
    h, v, hd = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    expected = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "model.layers.0.self_attn.q_proj.weight": (cfg["num_attention_heads"] * hd, h),
        "model.layers.0.self_attn.k_proj.weight": (cfg["num_key_value_heads"] * hd, h),
        "model.layers.0.self_attn.q_norm.weight": (hd,),
        "model.layers.0.mlp.gate_proj.weight": (cfg["intermediate_size"], h),
    }
    if not cfg.get("tie_word_embeddings", False):
        expected["lm_head.weight"] = (v, h)
    try:
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
            for key, shape in expected.items():
                if key not in keys:
                    raise CheckpointError(f"{f}: tensor {key!r} missing (expected shape {list(shape)} from config.json)")
                got = tuple(st.get_slice(key).get_shape())
                if got != shape:
                    raise CheckpointError(
                        f"{f}: tensor {key!r} has shape {list(got)}, config.json implies {list(shape)}"
                    )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{f}: cannot read model.safetensors ({exc}); re-fetch the checkpoint") from exc
    layers = {int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if len(layers) != cfg["num_hidden_layers"]:
        raise CheckpointError(
            f"{f}: holds {len(layers)} decoder layers, config.json says num_hidden_layers={cfg['num_hidden_layers']}"
        )


def _check_tokenizer(path: Path, vocab_size: int) -> dict[str, int]:
    from tokenizers import Tokenizer

    f = path / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as exc:
        raise CheckpointError(f"{f}: cannot load tokenizer.json ({exc}); re-fetch the checkpoint") from exc
    for want, name in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(name)
        if got != want:
            raise CheckpointError(
                f"{f}: special token {name} has id {got}, expected {want} "
                f"(Soprano needs ids 0..3 = {' '.join(SPECIAL_TOKENS)})"
            )
    offset = len(SPECIAL_TOKENS)
    for k in range(NUM_AUDIO_TOKENS):
        got = tok.token_to_id(f"[{k}]")
        if got != offset + k:
            raise CheckpointError(
                f"{f}: audio token [{k}] has id {got}, expected {offset + k} "
                f"(Soprano needs [0]..[{NUM_AUDIO_TOKENS - 1}] at ids {offset}..{offset + NUM_AUDIO_TOKENS - 1})"
            )
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise CheckpointError(f"{f}: tokenizer has {size} ids, more than the LM's vocab_size {vocab_size} in config.json")
    return {"size": size, "offset": offset}


def validate_checkpoint(path: Path | str) -> CheckpointInfo:
    """Check that ``path`` holds a usable upstream-layout Soprano checkpoint and return its shapes.

    Raises one ``CheckpointError`` naming the offending file for: a missing file, a config.json of
    another architecture, LM tensors that disagree with config.json, a decoder.pth whose keys or
    shapes differ from upstream ``SopranoDecoder``, decoder input channels != LM hidden size, or a
    tokenizer whose special / audio token ids are not where Soprano expects them.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist; fetch one first ({OFFLINE_CHOICES})")
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            raise _missing_file_error(path, name)

    cfg = _read_json(path / "config.json")
    archs = cfg.get("architectures") or []
    if "Qwen3ForCausalLM" not in archs or cfg.get("model_type") != "qwen3":
        raise CheckpointError(
            f"{path / 'config.json'}: expected architectures ['Qwen3ForCausalLM'] and model_type 'qwen3', "
            f"found architectures {archs} and model_type {cfg.get('model_type')!r}; this is not a Soprano LM"
        )
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "max_position_embeddings", "rms_norm_eps", "intermediate_size")
    absent = [k for k in keys if k not in cfg]
    if absent:
        raise CheckpointError(f"{path / 'config.json'}: lacks {absent}")
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    # transformers 5 writes rope_theta inside rope_parameters; older files have it at the top level.
    rope = cfg.get("rope_theta")
    if rope is None:
        rope = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if rope is None:
        raise CheckpointError(f"{path / 'config.json'}: no rope_theta (top level or in rope_parameters)")

    dec = _check_decoder(path)
    if dec["input_channels"] != cfg["hidden_size"]:
        raise CheckpointError(
            f"{path / 'decoder.pth'}: decoder input channels {dec['input_channels']} != LM hidden_size "
            f"{cfg['hidden_size']} in config.json; the decoder and the LM come from different models"
        )
    _check_lm_weights(path, cfg)
    tok = _check_tokenizer(path, cfg["vocab_size"])
    for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        _read_json(path / name)

    return CheckpointInfo(
        path=path,
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        head_dim=cfg["head_dim"],
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"],
        rope_theta=float(rope),
        rms_norm_eps=float(cfg["rms_norm_eps"]),
        intermediate_size=cfg["intermediate_size"],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        decoder_input_channels=dec["input_channels"],
        decoder_dim=dec["dim"],
        decoder_intermediate_dim=dec["intermediate_dim"],
        decoder_num_layers=dec["num_layers"],
        n_fft=dec["n_fft"],
        dw_kernel=dec["dw_kernel"],
        unk_id=0,
        text_id=1,
        start_id=2,
        stop_id=3,
        audio_token_offset=tok["offset"],
        num_audio_tokens=NUM_AUDIO_TOKENS,
        tokenizer_vocab_size=tok["size"],
    )

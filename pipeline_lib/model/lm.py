"""Torch reference of the Soprano LM (Qwen3 architecture) as a step model with an explicit KV cache.

One forward serves prefill (S tokens, empty cache) and decode (1 token, cache of P):

    inputs : input_ids [B, S], attention_mask [B, P+S], position_ids [B, S],
             past_key_i / past_value_i [B, num_kv_heads, P, head_dim] for every layer i
    outputs: logits [B, S, vocab], hidden_states [B, S, hidden] (after the final norm),
             new_key_i / new_value_i [B, num_kv_heads, S, head_dim]: this call's tokens only

The caller keeps the cache: the next call's past is the concatenation of past and new along the
sequence axis (`extend_cache`). Returning only the new tokens' keys and values, and attending to
past and new keys as two products under one softmax, keeps the graph from copying the whole cache
into a concatenated output every step (measured on the 80M LM with ONNX Runtime, fp32, 2 threads,
300 past tokens: 9.1-9.6 instead of 9.8-10.8 ms per step with one row, 14.1-15.2 instead of
15.3-16.2 ms with 8 rows; and no second copy of the cache in memory, 45 MiB with 8 rows).

Keys in the cache are stored after k-norm and rotary embedding.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline_lib.errors import CheckpointError
from pipeline_lib.model.weights import load_checked

EXPECTED_ARCHITECTURE = "Qwen3ForCausalLM"
EXPECTED_MODEL_TYPE = "qwen3"
# Added to masked attention scores. Finite, so a fully masked row (a left-padding query) stays NaN-free.
MASK_VALUE = -1e9


@dataclass(frozen=True)
class LMConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: Path | str) -> "LMConfig":
        path = Path(ckpt_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; a Soprano checkpoint directory has config.json (the LM config).")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc}); re-fetch the checkpoint.") from exc
        archs = cfg.get("architectures") or []
        if EXPECTED_ARCHITECTURE not in archs or cfg.get("model_type") != EXPECTED_MODEL_TYPE:
            raise CheckpointError(
                f"{path}: expected architecture {EXPECTED_ARCHITECTURE} (model_type '{EXPECTED_MODEL_TYPE}'), "
                f"found {archs} (model_type {cfg.get('model_type')!r}); this is not a Soprano LM checkpoint."
            )
        rope = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta"))
        try:
            return cls(
                hidden_size=int(cfg["hidden_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=int(cfg["num_attention_heads"]),
                num_kv_heads=int(cfg["num_key_value_heads"]),
                head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]),
                intermediate_size=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                max_position_embeddings=int(cfg["max_position_embeddings"]),
                rope_theta=float(theta),
                rms_norm_eps=float(cfg["rms_norm_eps"]),
            )
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: missing or invalid field {exc}; expected a Qwen3 config.") from exc


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    # `half` is a Python int (head_dim // 2), so the exported slices have constant bounds.
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [B, heads, S, D], keys and values [B, kv_heads, S, D]: q/k after their norm and the
        rotary embedding."""
        return self.heads(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin)

    def heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`project` from the projections' outputs [B, S, heads * D] / [B, S, kv_heads * D]."""
        b, s, _ = q.shape
        c = self.cfg
        half = c.head_dim // 2
        q = self.q_norm(q.reshape(b, s, c.num_heads, c.head_dim)).transpose(1, 2)
        k = self.k_norm(k.reshape(b, s, c.num_kv_heads, c.head_dim)).transpose(1, 2)
        v = v.reshape(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return q * cos + _rotate_half(q, half) * sin, k * cos + _rotate_half(k, half) * sin, v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,
        past_len: torch.Tensor | int,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """bias: [B, 1, groups*S, P+S], the mask bias in the grouped query layout (see below);
        past_len: P, computed once per call and shared by the layers."""
        b, s, _ = x.shape
        c = self.cfg
        q, k, v = self.project(x, cos, sin)
        groups = c.num_heads // c.num_kv_heads
        # [B, kv, groups*S, D]: the query heads sharing one KV head are stacked along the query axis
        # (row g*S + i is head g's query i), so no copy of the cache is made for grouped-query attention.
        qg = q.reshape(b, c.num_kv_heads, groups * s, c.head_dim) * (c.head_dim**-0.5)
        # Past and new keys in two products, one softmax over both: the cache is never concatenated.
        scores = torch.cat((torch.matmul(qg, past_key.transpose(2, 3)), torch.matmul(qg, k.transpose(2, 3))), dim=-1)
        probs = torch.softmax(scores + bias, dim=-1)
        out = torch.matmul(probs[..., :past_len], past_value) + torch.matmul(probs[..., past_len:], v)
        out = out.view(b, c.num_heads, s, c.head_dim).transpose(1, 2).reshape(b, s, c.num_heads * c.head_dim)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.gate_proj(x), self.up_proj(x))

    def combine(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, bias, past_len, past_key, past_value):
        attn, key, value = self.self_attn(self.input_layernorm(x), cos, sin, bias, past_len, past_key, past_value)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, key, value


class Backbone(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class SopranoLMStep(nn.Module):
    """The LM as a step function over an explicit KV cache (see the module docstring for the signature)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the rotary embedding, [B, 1, S, head_dim]."""
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()

    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "position_ids"]
        for i in range(self.cfg.num_layers):
            names += [f"past_key_{i}", f"past_value_{i}"]
        return names

    def output_names(self) -> list[str]:
        names = ["logits", "hidden_states"]
        for i in range(self.cfg.num_layers):
            names += [f"new_key_{i}", f"new_value_{i}"]
        return names

    def empty_cache(self, batch: int) -> list[torch.Tensor]:
        c = self.cfg
        return [torch.zeros(batch, c.num_kv_heads, 0, c.head_dim) for _ in range(2 * c.num_layers)]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        past_len = attention_mask.shape[1] - input_ids.shape[1]
        cos, sin = self.rotary(position_ids)
        bias = mask_bias(input_ids, attention_mask)  # [B, S, P+S]
        # In the grouped query layout of Attention: [B, 1, groups*S, P+S], built once for all layers.
        bias = bias.repeat(1, self.cfg.num_heads // self.cfg.num_kv_heads, 1)[:, None]
        x = self.model.embed_tokens(input_ids)
        new: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.layers):
            x, key, value = layer(x, cos, sin, bias, past_len, past[2 * i], past[2 * i + 1])
            new += [key, value]
        hidden = self.model.norm(x)
        return (self.lm_head(hidden), hidden, *new)


def mask_bias(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S, P+S] additive attention bias: query i sits at cache index P + i and sees the keys at or
    before it that attention_mask keeps (bias 0); the others get MASK_VALUE."""
    past_len = attention_mask.shape[1] - input_ids.shape[1]
    key_idx = torch.cumsum(torch.ones_like(attention_mask[0]), 0) - 1
    query_idx = torch.cumsum(torch.ones_like(input_ids[0]), 0) - 1 + past_len
    allowed = (key_idx[None, :] <= query_idx[:, None])[None] & (attention_mask[:, None, :] > 0)
    return (~allowed).to(torch.float32) * MASK_VALUE


class SopranoLMStateful(nn.Module):
    """The step model in the form OpenVINO keeps its KV cache in (pipeline_lib.openvino_stateful): each
    layer's past keys / values are reordered by `beam_idx` (the rows that go on), joined with this call's
    along the sequence axis, attended to with `scaled_dot_product_attention` (OpenVINO's SDPA op), and
    returned whole as present_*. Same weights and results as SopranoLMStep.

        inputs : input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], beam_idx [B] (int32),
                 past_key_i / past_value_i [B', kv_heads, P, head_dim]
        outputs: logits, hidden_states, present_key_i / present_value_i [B, kv_heads, P+S, head_dim]
    """

    def __init__(self, step: SopranoLMStep) -> None:
        super().__init__()
        self.step = step
        # Per layer, one product for q, k and v and one for gate and up (their weights stacked): the
        # same numbers (per-output-channel int8 scales are unchanged too) in 4 matrix products per
        # layer instead of 7. OpenVINO, 80M LM, stateful, one row, medians of 6 alternating rounds
        # (AVX2 CPU): int8 9.57 vs 10.22 ms per step at 1 thread, 6.35 vs 6.67 ms at 2; fp32 18.43 vs
        # 19.14 ms at 1 thread; faster in 6 of 6 rounds each.
        self.qkv_proj = nn.ModuleList(_stacked(a.q_proj, a.k_proj, a.v_proj) for a in (l.self_attn for l in step.model.layers))
        self.gate_up_proj = nn.ModuleList(_stacked(l.mlp.gate_proj, l.mlp.up_proj) for l in step.model.layers)

    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "position_ids", "beam_idx"]
        return names + [n for n in self.step.input_names() if n.startswith("past_")]

    def output_names(self) -> list[str]:
        return ["logits", "hidden_states"] + [n.replace("new_", "present_") for n in self.step.output_names()[2:]]

    def forward(self, input_ids, attention_mask, position_ids, beam_idx, *past):  # noqa: ANN001, ANN201
        st, c = self.step, self.step.cfg
        b, s = input_ids.shape
        groups = c.num_heads // c.num_kv_heads
        qkv_sizes = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        cos, sin = st.rotary(position_ids)
        bias = mask_bias(input_ids, attention_mask)[:, None]  # [B, 1, S, P+S]
        x = st.model.embed_tokens(input_ids)
        present: list[torch.Tensor] = []
        for i, layer in enumerate(st.model.layers):
            attn = layer.self_attn
            qkv = self.qkv_proj[i](layer.input_layernorm(x)).split(qkv_sizes, dim=-1)
            q, k, v = attn.heads(*qkv, cos, sin)
            key = torch.cat((past[2 * i].index_select(0, beam_idx), k), dim=2)
            value = torch.cat((past[2 * i + 1].index_select(0, beam_idx), v), dim=2)
            n = key.shape[2]
            # Grouped-query heads as OpenVINO's fused SDPA expects them: unsqueeze, broadcast, reshape.
            kh = key[:, :, None].expand(b, c.num_kv_heads, groups, n, c.head_dim).reshape(b, c.num_heads, n, c.head_dim)
            vh = value[:, :, None].expand(b, c.num_kv_heads, groups, n, c.head_dim).reshape(b, c.num_heads, n, c.head_dim)
            out = F.scaled_dot_product_attention(q, kh, vh, attn_mask=bias)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(b, s, c.num_heads * c.head_dim))
            gate, up = self.gate_up_proj[i](layer.post_attention_layernorm(x)).split(c.intermediate_size, dim=-1)
            x = x + layer.mlp.combine(gate, up)
            present += [key, value]
        hidden = st.model.norm(x)
        return (st.lm_head(hidden), hidden, *present)


def _stacked(*linears: nn.Linear) -> nn.Linear:
    """One bias-free Linear whose output is the given ones' outputs, concatenated."""
    weight = torch.cat([l.weight.detach() for l in linears])
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    out.weight = nn.Parameter(weight, requires_grad=False)
    return out


def extend_cache(past: Sequence[torch.Tensor], new: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The next call's past: each layer's past and new keys / values joined on the sequence axis."""
    return [torch.cat((p, n), dim=2) for p, n in zip(past, new, strict=True)]


def load_lm(ckpt_dir: Path | str) -> SopranoLMStep:
    """Build the step model from a checkpoint directory (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    cfg = LMConfig.from_checkpoint(ckpt_dir)
    weights_path = ckpt_dir / "model.safetensors"
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: not found; a Soprano checkpoint has the LM weights in model.safetensors.")
    try:
        weights = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - any parse failure means a bad file
        raise CheckpointError(f"{weights_path}: cannot be read as safetensors ({exc}); re-fetch the checkpoint.") from exc
    model = SopranoLMStep(cfg)
    return load_checked(model, weights, weights_path, "config.json and model.safetensors come from different models")

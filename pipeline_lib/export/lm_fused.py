"""The LM step as a fused ONNX Runtime graph, written node by node from the torch reference's weights.

The default graph (`DEFAULT_ATTENTION`, the KV contract of runtime.kv_cache with in-place buffers,
registry.KV_CACHE_BUFFER; `fused_interface` describes it for the LM config):

    inputs : input_ids [B, S], attention_mask [B, W], position_ids [B, S] (not read: positions are columns),
             past_key_i / past_value_i [B, kv, W, D]: buffers, row b's tokens in columns [0, len_b)
    outputs: logits [B, 1, vocab] (the last position's only: a prompt's other positions are never sampled),
             hidden_states [B, S, hidden], present_key_i / present_value_i [B, kv, W, D]
             (the same buffers: bound to past_*'s memory, the op writes columns [len_b, len_b + S))

attention_mask has ones in [0, len_b + S) of row b: its row sums - 1 are GroupQueryAttention's
seqlens_k, and W its total_sequence_length (len_b + S <= W in every row). Per layer it uses ONNX
Runtime's contrib operators:

- ``SkipSimplifiedLayerNormalization``: the residual add and the next RMS norm in one op;
- one packed q/k/v ``MatMul`` and one packed gate/up ``MatMul`` (MatMulNBits once quantised);
- Qwen3's per-head q / k norms as ``SimplifiedLayerNormalization`` over the head axis;
- ``GroupQueryAttention`` with its own rotary (positions = columns: row b's new tokens are at positions
  len_b ..), the KV append into the shared buffer, and attention over each row's own length.

The other `ATTENTION_CORES` are the alternatives measured against it (scripts/lm_attention_cores.py);
the non-shared ones keep the traced step's interface (attention_mask [B, P + S], new_* outputs of this
call's tokens, rows sharing one column index with gaps masked by ``attention_bias``) but for the logits,
which are the last position's in every core.

Limitation (ONNX Runtime's CPU GroupQueryAttention): a call with several new tokens (S > 1) must have
one row (the runtime prefills each prompt alone; ONNX Runtime refuses other calls with its own error,
"batch_size must be 1 when sequence_length > 1 and past context is given").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline_lib.model.lm import MASK_VALUE, SopranoLMStep
from pipeline_lib.registry import KV_CACHE_BUFFER

MS = "com.microsoft"
# RotaryEmbedding reads cos/sin from a table indexed by position: rows for positions 0 .. this factor x
# max_position_embeddings - 1 (the runtime keeps prompts to half of max_position_embeddings and new tokens
# to max_position_embeddings, so positions stay below 1.5x).
ROTARY_TABLE_FACTOR = 2


def fused_interface(cfg) -> dict:
    """The default graph's interface for the LM config (`cfg`: model.lm.LMConfig): kv_cache, inputs,
    outputs; pipeline_lib.convert gives the ONNX Runtime targets this instead of the traced step's."""
    kv = ["batch", "num_kv_heads", "past_sequence", "head_dim"]
    inputs = [{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
              {"name": "attention_mask", "shape": ["batch", "past_sequence"], "dtype": "int64"},
              {"name": "position_ids", "shape": ["batch", "sequence"], "dtype": "int64"}]
    outputs = [{"name": "logits", "shape": ["batch", 1, cfg.vocab_size], "dtype": "float32"},
               {"name": "hidden_states", "shape": ["batch", "sequence", cfg.hidden_size], "dtype": "float32"}]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append({"name": f"past_{kind}_{i}", "shape": kv, "dtype": "float32"})
            outputs.append({"name": f"present_{kind}_{i}", "shape": kv, "dtype": "float32"})
    return {"kv_cache": KV_CACHE_BUFFER, "inputs": inputs, "outputs": outputs,
            "kv_note": ("past_* are buffers the model appends to in place (present_* alias them); row b's tokens "
                        "fill columns [0, len_b); attention_mask has ones in [0, len_b + sequence) "
                        "(pipeline_lib.runtime.kv_cache)")}


def rotary_tables(model: SopranoLMStep) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin [positions, head_dim // 2], computed as the torch reference computes them."""
    n = ROTARY_TABLE_FACTOR * model.cfg.max_position_embeddings
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * model.inv_freq[None, :]
    return freqs.cos().numpy(), freqs.sin().numpy()


@dataclass(frozen=True)
class AttentionCore:
    op: str                   # GroupQueryAttention, Attention (ONNX opset 23) or MatMul (explicit MatMul / Softmax)
    per_row: bool = False     # rows' tokens in columns [0, len): seqlens_k from the mask's row sums, no bias
    shared: bool = False      # one past / present buffer (present_* outputs alias past_*), KV append inside
    gqa_rotary: bool = False  # GroupQueryAttention's own rotary (positions = columns)


ATTENTION_CORES = {
    "gqa_bias": AttentionCore("GroupQueryAttention"),
    "gqa_rows": AttentionCore("GroupQueryAttention", per_row=True),
    "gqa_shared": AttentionCore("GroupQueryAttention", per_row=True, shared=True),
    "gqa_shared_rotary": AttentionCore("GroupQueryAttention", per_row=True, shared=True, gqa_rotary=True),
    "attention23": AttentionCore("Attention"),
    "matmul": AttentionCore("MatMul"),
}


DEFAULT_ATTENTION = "gqa_shared_rotary"  # the measurement behind it: docs/design.md, "The attention core, measured"


def _matmul_attention(g, p, q, k, v, past_k, past_v, bias, H, KV, D) -> str:
    """Attention as explicit ops: keys / values = past joined with this call's, scores = q k^T * scale +
    bias, softmax, times values. q [B, S, H*D], k / v [B, S, KV*D], bias [B, 1, S, T]; returns [B, S, H*D]."""
    G = H // KV
    kv4 = f"{p}.kv4_shape"
    g.const(kv4, np.array([0, 0, KV, D], np.int64))
    joined = []
    for kind, t, past in (("k", k, past_k), ("v", v, past_v)):
        t = g.op("Reshape", [t, kv4], name=f"{p}.{kind}_kv4")[0]
        t = g.op("Transpose", [t], name=f"{p}.{kind}_bnsd", perm=[0, 2, 1, 3])[0]           # [B, KV, S, D]
        t = g.op("Concat", [past, t], name=f"{p}.{kind}_all", axis=2)[0]                     # [B, KV, T, D]
        joined.append(g.op("Unsqueeze", [t, "i2_const"], name=f"{p}.{kind}_all5")[0])        # [B, KV, 1, T, D]
    g.const(f"{p}.q5_shape", np.array([0, 0, KV, G, D], np.int64))
    q5 = g.op("Reshape", [q, f"{p}.q5_shape"], name=f"{p}.q5")[0]
    q5 = g.op("Transpose", [q5], name=f"{p}.q_bkgsd", perm=[0, 2, 3, 1, 4])[0]               # [B, KV, G, S, D]
    kt = g.op("Transpose", [joined[0]], name=f"{p}.k_t", perm=[0, 1, 2, 4, 3])[0]            # [B, KV, 1, D, T]
    scores = g.op("MatMul", [q5, kt], name=f"{p}.scores")[0]                                  # [B, KV, G, S, T]
    scores = g.op("Mul", [scores, g.const(f"{p}.scale", np.array(D ** -0.5, np.float32))], name=f"{p}.scaled")[0]
    b5 = g.op("Unsqueeze", [bias, "i2_const"], name=f"{p}.bias5")[0]                         # [B, 1, 1, S, T]
    scores = g.op("Add", [scores, b5], name=f"{p}.masked")[0]
    probs = g.op("Softmax", [scores], name=f"{p}.softmax", axis=-1)[0]
    out = g.op("MatMul", [probs, joined[1]], name=f"{p}.context")[0]                          # [B, KV, G, S, D]
    out = g.op("Transpose", [out], name=f"{p}.context_bs", perm=[0, 3, 1, 2, 4])[0]           # [B, S, KV, G, D]
    return g.op("Reshape", [out, "q_flat_shape"], name=f"{p}.context_flat")[0]


class _Graph:
    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, domain: str = "", name: str | None = None,
           outputs: Sequence[str] | None = None, **attrs) -> list[str]:
        from onnx import helper

        self._n += 1
        base = name or f"{op_type}_{self._n}"
        outs = list(outputs) if outputs is not None else [f"{base}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain or None, **attrs))
        return outs


def _w(linear: torch.nn.Module) -> np.ndarray:
    """A Linear's weight as the right operand of MatMul ([in, out])."""
    return linear.weight.detach().numpy().T


def build_fused_lm(model: SopranoLMStep, opset: int = 17, pack_gate_up: bool = True, attention: str = DEFAULT_ATTENTION):
    """The fused step graph (an onnx.ModelProto) holding `model`'s weights in fp32. pack_gate_up: one
    MatMul for the MLP's gate and up projections, then a Split (False: two MatMuls, as ONNX Runtime
    GenAI's builder writes them; docs/design.md has the measurement behind the default)."""
    from onnx import TensorProto, helper

    core = ATTENTION_CORES[attention]
    if core.op == "Attention":
        opset = max(opset, 23)
    c = model.cfg
    H, KV, D, E = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
    g = _Graph()
    st = model.model
    eps = float(c.rms_norm_eps)

    # Shared per call: the total width, seqlens_k, the additive bias, the rotary tables.
    mask_shape = g.op("Shape", ["attention_mask"], name="mask_shape")[0]
    ids_shape = g.op("Shape", ["input_ids"], name="ids_shape")[0]
    g.const("i0", np.array([0], np.int64))
    g.const("i1", np.array([1], np.int64))
    total = g.op("Gather", [mask_shape, "i1"], name="total")[0]          # [1]: P + S
    batch = g.op("Gather", [ids_shape, "i0"], name="batch")[0]           # [1]: B
    seq = g.op("Gather", [ids_shape, "i1"], name="seq")[0]               # [1]: S
    past_len = g.op("Sub", [total, seq], name="past_len")[0]             # [1]: P
    total32 = g.op("Cast", [total], name="total32", to=TensorProto.INT32)[0]
    g.const("scalar_shape", np.array([], np.int64))
    g.const("one32", np.array([1], np.int32))
    if core.per_row:
        # Each row's tokens fill columns [0, len): seqlens_k = the mask's row sum - 1.
        rowsum = g.op("ReduceSum", ["attention_mask", "i1"], name="mask_rowsum", keepdims=0)[0]
        rowsum32 = g.op("Cast", [rowsum], name="rowsum32", to=TensorProto.INT32)[0]
        seqlens = g.op("Sub", [rowsum32, "one32"], name="seqlens_k")[0]
        total_scalar = g.op("Reshape", [total32, "scalar_shape"], name="total_sequence_length")[0]
        bias = ""
    else:
        total_scalar = g.op("Reshape", [total32, "scalar_shape"], name="total_sequence_length")[0]
        last32 = g.op("Sub", [total32, "one32"], name="last_index")[0]
        seqlens = g.op("Expand", [last32, batch], name="seqlens_k")[0]       # [B] int32, P + S - 1 in every row
        # bias[b, 0, i, j] = 0 where key j <= query P + i and attention_mask[b, j] > 0, else MASK_VALUE.
        g.const("zero_i64", np.array(0, np.int64))
        g.const("one_i64", np.array(1, np.int64))
        total_s = g.op("Squeeze", [total, "i0"], name="total_s")[0]
        seq_s = g.op("Squeeze", [seq, "i0"], name="seq_s")[0]
        key_idx = g.op("Range", ["zero_i64", total_s, "one_i64"], name="key_idx")[0]        # [T]
        q_rel = g.op("Range", ["zero_i64", seq_s, "one_i64"], name="query_rel")[0]          # [S]
        q_idx = g.op("Add", [q_rel, past_len], name="query_idx")[0]
        q_col = g.op("Unsqueeze", [q_idx, "i1"], name="query_col")[0]                       # [S, 1]
        causal = g.op("LessOrEqual", [key_idx, q_col], name="causal")[0]                     # [S, T]
        g.const("mask_zero", np.array(0, np.int64))
        kept = g.op("Greater", ["attention_mask", "mask_zero"], name="kept")[0]              # [B, T]
        g.const("i1_2", np.array([1, 2], np.int64))
        kept4 = g.op("Unsqueeze", [kept, "i1_2"], name="kept4")[0]                           # [B, 1, 1, T]
        allowed = g.op("And", [kept4, causal], name="allowed")[0]                            # [B, 1, S, T]
        g.const("bias_zero", np.array(0.0, np.float32))
        g.const("bias_masked", np.array(MASK_VALUE, np.float32))
        bias = g.op("Where", [allowed, "bias_zero", "bias_masked"], name="attention_bias")[0]
    if core.op == "MatMul":
        g.const("i2_const", np.array([2], np.int64))
    cos, sin = rotary_tables(model)
    g.const("cos_cache", cos)
    g.const("sin_cache", sin)

    x = g.op("Gather", [g.const("embed_tokens", st.embed_tokens.weight.detach().numpy()), "input_ids"],
             name="embed")[0]
    g.const("q_heads_shape", np.array([0, 0, H, D], np.int64))
    g.const("k_heads_shape", np.array([0, 0, KV, D], np.int64))
    g.const("q_flat_shape", np.array([0, 0, H * D], np.int64))
    g.const("k_flat_shape", np.array([0, 0, KV * D], np.int64))
    if not core.shared:
        g.const("kv_heads_shape" if KV > 1 else "kv_one_head_shape", np.array([0, 0, KV, D] if KV > 1 else [0, 1, -1, D], np.int64))
    g.const("qkv_split", np.array([H * D, KV * D, KV * D], np.int64))
    g.const("gate_up_split", np.array([c.intermediate_size, c.intermediate_size], np.int64))
    residual, pending = x, None  # pending: the previous block's output, not yet added to residual
    for i, layer in enumerate(st.layers):
        a = layer.self_attn
        p = f"layers.{i}"
        ln_in = g.const(f"{p}.input_layernorm.weight", layer.input_layernorm.weight.detach().numpy())
        if pending is None:
            h = g.op("SimplifiedLayerNormalization", [residual, ln_in], name=f"{p}.input_norm", axis=-1, epsilon=eps)[0]
        else:
            h, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [pending, residual, ln_in], 4, MS,
                                     name=f"{p}.input_norm", epsilon=eps)
        wqkv = np.concatenate([_w(a.q_proj), _w(a.k_proj), _w(a.v_proj)], axis=1)
        qkv = g.op("MatMul", [h, g.const(f"{p}.qkv_proj.weight", wqkv)], name=f"{p}.qkv_proj")[0]
        q, k, v = g.op("Split", [qkv, "qkv_split"], 3, name=f"{p}.qkv_split", axis=-1)
        heads = []
        for kind, t, norm, n_heads in (("q", q, a.q_norm, H), ("k", k, a.k_norm, KV)):
            t = g.op("Reshape", [t, f"{kind}_heads_shape"], name=f"{p}.{kind}_heads")[0]
            t = g.op("SimplifiedLayerNormalization", [t, g.const(f"{p}.{kind}_norm.weight", norm.weight.detach().numpy())],
                     name=f"{p}.{kind}_norm", axis=-1, epsilon=eps)[0]
            t = g.op("Reshape", [t, f"{kind}_flat_shape"], name=f"{p}.{kind}_flat")[0]
            if not core.gqa_rotary:
                t = g.op("RotaryEmbedding", [t, "position_ids", "cos_cache", "sin_cache"], domain=MS,
                         name=f"{p}.{kind}_rotary", num_heads=n_heads, interleaved=0)[0]
            heads.append(t)
        q, k = heads
        past_k, past_v = f"past_key_{i}", f"past_value_{i}"
        if core.op == "GroupQueryAttention":
            rot = ["cos_cache", "sin_cache"] if core.gqa_rotary else ["", ""]
            outs = ["", f"present_key_{i}", f"present_value_{i}"] if core.shared else None
            attn = g.op("GroupQueryAttention", [q, k, v, past_k, past_v, seqlens, total_scalar, *rot, "", bias],
                        3, MS, name=f"{p}.attention", outputs=[f"{p}.attention_out0", *outs[1:]] if outs else None,
                        num_heads=H, kv_num_heads=KV, scale=float(D ** -0.5), do_rotary=int(core.gqa_rotary))[0]
        elif core.op == "Attention":  # ONNX opset 23
            attn = g.op("Attention", [q, k, v, bias, past_k, past_v], 3, name=f"{p}.attention",
                        q_num_heads=H, kv_num_heads=KV, scale=float(D ** -0.5))[0]
        else:  # "MatMul": the traced graph's attention, explicit
            attn = _matmul_attention(g, p, q, k, v, past_k, past_v, bias, H, KV, D)
        if not core.shared:
            # This call's keys / values, [B, kv, S, D], as the cache stores them (keys after norm and rotary).
            if core.gqa_rotary:
                raise ValueError("GroupQueryAttention's own rotary needs the shared buffer (the rotated keys are inside it)")
            for kind, t in (("key", k), ("value", v)):
                if KV == 1:  # [B, S, D] and [B, 1, S, D] are the same bytes: one Reshape
                    g.op("Reshape", [t, "kv_one_head_shape"], name=f"{p}.new_{kind}", outputs=[f"new_{kind}_{i}"])
                    continue
                t = g.op("Reshape", [t, "kv_heads_shape"], name=f"{p}.new_{kind}_heads")[0]
                g.op("Transpose", [t], name=f"{p}.new_{kind}", outputs=[f"new_{kind}_{i}"], perm=[0, 2, 1, 3])
        o = g.op("MatMul", [attn, g.const(f"{p}.o_proj.weight", _w(a.o_proj))], name=f"{p}.o_proj")[0]
        ln_post = g.const(f"{p}.post_attention_layernorm.weight", layer.post_attention_layernorm.weight.detach().numpy())
        h, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [o, residual, ln_post], 4, MS,
                                 name=f"{p}.post_attention_norm", epsilon=eps)
        m = layer.mlp
        if pack_gate_up:
            wgu = np.concatenate([_w(m.gate_proj), _w(m.up_proj)], axis=1)
            gu = g.op("MatMul", [h, g.const(f"{p}.gate_up_proj.weight", wgu)], name=f"{p}.gate_up_proj")[0]
            gate, up = g.op("Split", [gu, "gate_up_split"], 2, name=f"{p}.gate_up_split", axis=-1)
        else:
            gate = g.op("MatMul", [h, g.const(f"{p}.gate_proj.weight", _w(m.gate_proj))], name=f"{p}.gate_proj")[0]
            up = g.op("MatMul", [h, g.const(f"{p}.up_proj.weight", _w(m.up_proj))], name=f"{p}.up_proj")[0]
        sig = g.op("Sigmoid", [gate], name=f"{p}.gate_sigmoid")[0]
        silu = g.op("Mul", [gate, sig], name=f"{p}.gate_silu")[0]
        act = g.op("Mul", [silu, up], name=f"{p}.gate_times_up")[0]
        pending = g.op("MatMul", [act, g.const(f"{p}.down_proj.weight", _w(m.down_proj))], name=f"{p}.down_proj")[0]
    g.op("SkipSimplifiedLayerNormalization", [pending, residual, g.const("norm.weight", st.norm.weight.detach().numpy())],
         domain=MS, name="final_norm", outputs=["hidden_states", "", "", ""], epsilon=eps)
    # The logits head reads the last position only (a prefill of S tokens would otherwise compute S rows of
    # vocabulary logits and use one).
    last = g.op("Slice", ["hidden_states", g.const("last_start", np.array([-1], np.int64)),
                          g.const("last_end", np.array([np.iinfo(np.int64).max], np.int64)), "i1"], name="last_position")[0]
    g.op("MatMul", [last, g.const("lm_head.weight", _w(model.lm_head))], name="lm_head", outputs=["logits"])

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "past_sequence" if core.shared else "total_sequence"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", 1, c.vocab_size]),
               helper.make_tensor_value_info("hidden_states", f32, ["batch", "sequence", E])]
    for i in range(c.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", f32, ["batch", KV, "past_sequence", D]))
            if core.shared:
                outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", f32, ["batch", KV, "past_sequence", D]))
            else:
                outputs.append(helper.make_tensor_value_info(f"new_{kind}_{i}", f32, ["batch", KV, "sequence", D]))
    graph = helper.make_graph(g.nodes, "soprano_lm_fused", inputs, outputs, initializer=g.inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                                   producer_name="soprano-onnx")
    onnx_model.ir_version = 8
    return onnx_model

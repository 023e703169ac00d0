"""The fused LM step graph (pipeline_lib.export.lm_fused): same results and KV contract as the torch
reference and the traced graph, the fused operators in place, and the ONNX Runtime targets built from it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_lib.export.lm import FUSED_ONNX, LM_ONNX, example_inputs
from pipeline_lib.export.onnx_io import ort_session
from pipeline_lib.model.lm import load_lm
from pipeline_lib.registry import LM_CONFIG

LOGITS_MAX_ABS = 2e-3  # conf/parity: lm_logits_max_abs
HIDDEN_MAX_ABS = 1e-3  # conf/parity: lm_hidden_max_abs


def _inputs(model, batch: int, past: int, seq: int, seed: int, hole: bool):
    x = list(example_inputs(model, batch=batch, past=past, seq=seq, seed=seed))
    if hole:  # a masked gap inside the last row's cache, as a row that joined a running batch has
        x[1][-1, past // 2] = 0
        x[2] = (x[1].cumsum(-1) - 1).clamp(min=0)[:, past:]
    return x


@pytest.mark.parametrize("batch,past,seq,hole", [(1, 0, 7, False), (2, 0, 5, False), (1, 6, 3, False),
                                                  (3, 9, 1, True), (2, 12, 1, False)])
def test_fused_graph_matches_torch(tiny_checkpoint: Path, tiny_export: Path, batch, past, seq, hole) -> None:
    model = load_lm(tiny_checkpoint).eval()
    sess = ort_session(tiny_export / FUSED_ONNX)
    x = _inputs(model, batch, past, seq, seed=batch * 100 + past, hole=hole)
    with torch.no_grad():
        ref = [t.numpy() for t in model(*x)]
    got = sess.run(None, dict(zip(model.input_names(), (t.numpy() for t in x))))
    real = x[1][:, past:].numpy() > 0  # a padding position's output is never read
    assert np.abs(got[0] - ref[0])[real].max() < LOGITS_MAX_ABS
    assert np.abs(got[1] - ref[1])[real].max() < HIDDEN_MAX_ABS
    for g, r in zip(got[2:], ref[2:]):  # new keys / values of the real tokens: what the cache stores
        assert g.shape == r.shape
        assert np.abs(g - r).transpose(0, 2, 1, 3)[real].max() < 1e-4


def test_fused_graph_uses_the_fused_operators(tiny_checkpoint: Path, tiny_export: Path) -> None:
    import onnx

    layers = load_lm(tiny_checkpoint).cfg.num_layers
    ops = Counter(n.op_type for n in onnx.load(str(tiny_export / FUSED_ONNX)).graph.node)
    assert ops["GroupQueryAttention"] == layers
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers  # every residual add, the final norm too
    assert ops["MatMul"] == 4 * layers + 1  # packed q/k/v, o, packed gate/up, down; the logits head
    assert ops["RotaryEmbedding"] == 2 * layers
    assert not {"Softmax", "Concat", "Neg"} & set(ops)
    assert ops["Add"] == 1  # the query index: every residual add is inside a norm
    traced = Counter(n.op_type for n in onnx.load(str(tiny_export / LM_ONNX)).graph.node)
    assert sum(ops.values()) < sum(traced.values())


def test_export_config_names_the_fused_graph(tiny_export: Path) -> None:
    cfg = json.loads((tiny_export / LM_CONFIG).read_text())
    assert cfg["file"] == LM_ONNX and cfg["ort_file"] == FUSED_ONNX


def test_fused_runtime_greedy_equals_traced(tiny_export: Path) -> None:
    """The runtime loop (KVCache: shared column index, buckets, masked gaps) on both graphs: same tokens,
    same hidden states within the parity limit, for a batch of prompts of different lengths."""
    from pipeline_lib.runtime.backends import OrtLM
    from pipeline_lib.runtime.generate import LMSpec, generate
    from pipeline_lib.runtime.sampling import SamplingParams

    spec = LMSpec.from_json(tiny_export / LM_CONFIG)
    prompts = [[5 + j % 40 for j in range(n)] for n in (9, 14, 4)]
    outs = {}
    for name in (LM_ONNX, FUSED_ONNX):
        lm = OrtLM(tiny_export / name, 2)
        outs[name] = generate(lm, spec, prompts, max_new_tokens=40, params=SamplingParams(0.0, 1.0, 0, 1.2), kv_bucket=8)
    for a, b in zip(outs[LM_ONNX].tokens, outs[FUSED_ONNX].tokens):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(outs[LM_ONNX].hidden, outs[FUSED_ONNX].hidden):
        assert np.abs(a - b).max() < HIDDEN_MAX_ABS
    assert outs[LM_ONNX].finish_reasons == outs[FUSED_ONNX].finish_reasons


def test_weight_only_int8_of_the_fused_graph(tiny_checkpoint: Path, tiny_export: Path, tmp_path: Path) -> None:
    """MatMulNBits 8-bit: every MatMul becomes weight-only int8 (no activation quantisation at run time),
    and the step stays close to fp32."""
    import onnx

    from pipeline_lib.quantize_ort import quantize_onnx_int8

    out = quantize_onnx_int8(tiny_export / FUSED_ONNX, tmp_path / "int8.onnx", method="matmul_nbits", bits=8,
                             block_size=128, accuracy_level=4)
    nodes = onnx.load(str(out)).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == sum(n.op_type == "MatMul" for n in onnx.load(str(tiny_export / FUSED_ONNX)).graph.node)
    assert all({a.name: a.i for a in n.attribute}["bits"] == 8 for n in nbits)
    assert not any(n.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "MatMul") for n in nodes)
    model = load_lm(tiny_checkpoint).eval()
    x = _inputs(model, 1, 6, 1, seed=3, hole=False)
    with torch.no_grad():
        ref = model(*x)[1].numpy()
    got = ort_session(out).run(["hidden_states"], dict(zip(model.input_names(), (t.numpy() for t in x))))[0]
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 0.99


def test_onnx_targets_are_built_from_the_fused_graph(tiny_export: Path, tmp_path: Path) -> None:
    """ONNX Runtime targets convert the export's ort_file into soprano_lm_step.onnx (the runtime's name);
    their config names that one file."""
    import onnx

    from pipeline_lib.convert import convert_into

    for precision in ("fp32", "int8"):
        folder = tmp_path / precision
        folder.mkdir()
        convert_into("onnx", precision, tiny_export, tiny_export, folder)
        lm = folder / "lm"
        cfg = json.loads((lm / LM_CONFIG).read_text())
        assert cfg["file"] == LM_ONNX and "ort_file" not in cfg
        assert cfg["conversion"]["source"] == FUSED_ONNX
        assert not (lm / FUSED_ONNX).exists()
        ops = Counter(n.op_type for n in onnx.load(str(lm / LM_ONNX)).graph.node)
        assert ops["GroupQueryAttention"] > 0
        assert (ops["MatMulNBits"] > 0) == (precision == "int8")

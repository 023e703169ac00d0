"""The fused LM step graph (pipeline_lib.export.lm_fused): same results as the torch reference and the
traced graph, keys / values appended in place into the rows' own columns, the fused operators in place, and the ONNX Runtime targets built from it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_lib.export.lm import FUSED_ONNX, LM_ONNX, fused_example
from pipeline_lib.export.onnx_io import ort_session
from pipeline_lib.model.lm import load_lm
from pipeline_lib.registry import KV_CACHE_BUFFER, LM_CONFIG

LOGITS_MAX_ABS = 2e-3  # conf/parity: lm_logits_max_abs
HIDDEN_MAX_ABS = 1e-3  # conf/parity: lm_hidden_max_abs


@pytest.mark.parametrize("lens,seq,width", [([0], 7, 8), ([6], 3, 16), ([9, 4, 7], 1, 16), ([12, 12], 1, 16),
                                            ([0], 5, 5)])
def test_fused_graph_matches_torch(tiny_checkpoint: Path, tiny_export: Path, lens, seq, width) -> None:
    """Rows of different lengths in one buffer (each row's tokens in its columns [0, len)): the last
    position's logits (the graph computes no others) and every position's hidden states as torch's, and the
    keys / values written at each row's own columns [len, len + seq)."""
    model = load_lm(tiny_checkpoint).eval()
    sess = ort_session(tiny_export / FUSED_ONNX)
    x, feed = fused_example(model, lens, seq, width, seed=len(lens) * 100 + max(lens))
    with torch.no_grad():
        ref = [t.numpy() for t in model(*x)]
    names = ["logits", "hidden_states", *(n.replace("new_", "present_") for n in model.output_names()[2:])]
    got = sess.run(names, feed)
    assert got[0].shape == (len(lens), 1, model.cfg.vocab_size)
    assert np.abs(got[0] - ref[0][:, -1:]).max() < LOGITS_MAX_ABS
    assert np.abs(got[1] - ref[1]).max() < HIDDEN_MAX_ABS
    for g, r, past in zip(got[2:], ref[2:], (n for n in feed if n.startswith("past_"))):
        assert g.shape == feed[past].shape
        for b, n in enumerate(lens):  # the new columns hold torch's new keys / values; the past stays
            assert np.abs(g[b, :, n: n + seq] - r[b]).max() < 1e-4
            np.testing.assert_array_equal(g[b, :, :n], feed[past][b, :, :n])


def test_the_runtime_binds_present_to_the_past_buffers(tiny_checkpoint: Path, tmp_path: Path, tiny_export: Path) -> None:
    """OrtLM on the fused graph: the step writes its keys / values into the fed past_* arrays (in place),
    at each row's own column, and present_* are those arrays."""
    from pipeline_lib.convert import convert_into
    from pipeline_lib.runtime.backends import OrtLM

    convert_into("onnx", "fp32", tiny_export, tiny_export, tmp_path)
    model = load_lm(tiny_checkpoint).eval()
    x, feed = fused_example(model, [5, 2], 1, 8, seed=4)
    before = {n: a.copy() for n, a in feed.items()}
    with torch.no_grad():
        ref = [t.numpy() for t in model(*x)]
    out = OrtLM(tmp_path / "lm" / LM_ONNX, 1).run(feed)
    for i, r in enumerate(ref[2:]):
        name = model.input_names()[3 + i]
        assert out[name.replace("past_", "present_")] is feed[name]
        for b, n in enumerate([5, 2]):
            assert np.abs(feed[name][b, :, n] - r[b, :, 0]).max() < 1e-4
            np.testing.assert_array_equal(feed[name][b, :, :n], before[name][b, :, :n])
            assert not feed[name][b, :, n + 1:].any()


def test_fused_graph_uses_the_fused_operators(tiny_checkpoint: Path, tiny_export: Path) -> None:
    import onnx

    layers = load_lm(tiny_checkpoint).cfg.num_layers
    nodes = onnx.load(str(tiny_export / FUSED_ONNX)).graph.node
    ops = Counter(n.op_type for n in nodes)
    assert ops["GroupQueryAttention"] == layers
    assert all({a.name: a.i for a in n.attribute}["do_rotary"] == 1 for n in nodes if n.op_type == "GroupQueryAttention")
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers  # every residual add, the final norm too
    assert ops["MatMul"] == 4 * layers + 1  # packed q/k/v, o, packed gate/up, down; the logits head
    assert not {"Softmax", "Concat", "Neg", "RotaryEmbedding", "Where", "Add", "Transpose"} & set(ops)
    traced = Counter(n.op_type for n in onnx.load(str(tiny_export / LM_ONNX)).graph.node)
    assert sum(ops.values()) < sum(traced.values())


def test_export_config_names_the_fused_graph(tiny_export: Path) -> None:
    cfg = json.loads((tiny_export / LM_CONFIG).read_text())
    assert cfg["file"] == LM_ONNX and cfg["ort_file"] == FUSED_ONNX


def test_fused_runtime_greedy_equals_traced(tiny_export: Path, tmp_path: Path) -> None:
    """The runtime loop (KVCache: rows of different lengths, buckets) on both graphs (the traced one through
    its new_* outputs, the fused one appending in place): same tokens, same hidden states within the parity
    limit, for a batch of prompts of different lengths."""
    from pipeline_lib.convert import convert_into
    from pipeline_lib.runtime.backends import OrtLM
    from pipeline_lib.runtime.generate import LMSpec, generate
    from pipeline_lib.runtime.sampling import SamplingParams

    convert_into("onnx", "fp32", tiny_export, tiny_export, tmp_path)
    prompts = [[5 + j % 40 for j in range(n)] for n in (9, 14, 4)]
    outs = {}
    for name, folder in ((LM_ONNX, tiny_export), (FUSED_ONNX, tmp_path / "lm")):
        spec = LMSpec.from_json(folder / LM_CONFIG)
        assert spec.in_place == (name == FUSED_ONNX)
        lm = OrtLM(folder / LM_ONNX, 2)
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
    x, feed = fused_example(model, [6], 1, 8, seed=3)
    with torch.no_grad():
        ref = model(*x)[1].numpy()
    got = ort_session(out).run(["hidden_states"], feed)[0]
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
        assert cfg["file"] == LM_ONNX and "ort_file" not in cfg and "ort_interface" not in cfg
        assert cfg["kv_cache"] == KV_CACHE_BUFFER and cfg["outputs"][-1]["name"].startswith("present_")
        assert cfg["conversion"]["source"] == FUSED_ONNX
        assert not (lm / FUSED_ONNX).exists()
        model = onnx.load(str(lm / LM_ONNX))
        ops = Counter(n.op_type for n in model.graph.node)
        assert ops["GroupQueryAttention"] > 0
        # The config declares what the graph gives: the last position's logits, every position's hidden states.
        dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
        declared = {o["name"]: o["shape"] for o in cfg["outputs"]}
        for name in ("logits", "hidden_states"):
            assert dims[name] == declared[name], name
        assert declared["logits"][1] == 1 and declared["hidden_states"][1] == "sequence"
        assert (ops["MatMulNBits"] > 0) == (precision == "int8")


def test_lm_parity_refuses_logits_for_some_prompt_positions(tiny_checkpoint: Path, tiny_export: Path) -> None:
    """check_lm compares every prompt position's logits, or the last one's where the model computes only those
    (the fused graph); a model that returns some other number of positions is an error, not a smaller check."""
    from pipeline_lib.parity import ParityThresholds, check_lm, ort_runner

    lm, traced = load_lm(tiny_checkpoint).eval(), ort_runner(tiny_export / LM_ONNX)
    th = ParityThresholds(decode_steps=2)
    assert check_lm(lm, traced, 3, th).passed

    def two_positions(feed):
        out = traced(feed)
        return dict(out, logits=out["logits"][:, -2:]) if feed["input_ids"].shape[1] > 1 else out

    with pytest.raises(ValueError, match="logits for 2 of 24 prompt positions"):
        check_lm(lm, two_positions, 3, th)

"""The exported ONNX graphs: dynamic sizes, configs, no ISTFT inside, agreement with the torch reference."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipeline_lib.export.decoder import DECODER_CONFIG, DECODER_ONNX
from pipeline_lib.export.lm import LM_CONFIG, LM_ONNX, example_inputs
from pipeline_lib.export.onnx_io import ort_session
from pipeline_lib.model.decoder import load_decoder
from pipeline_lib.model.lm import load_lm


@pytest.mark.parametrize("batch,past,seq", [(1, 0, 1), (1, 0, 13), (3, 0, 9), (1, 7, 1), (3, 7, 1), (3, 5, 4), (1, 30, 2)])
def test_lm_step_dynamic_sizes(tiny_checkpoint, tiny_export, batch, past, seq):
    lm = load_lm(tiny_checkpoint)
    sess = ort_session(tiny_export / LM_ONNX)
    inputs = example_inputs(lm, batch, past, seq, seed=batch * 100 + past + seq)
    with torch.no_grad():
        ref = lm(*inputs)
    got = sess.run(lm.output_names(), dict(zip(lm.input_names(), (t.numpy() for t in inputs))))
    assert got[0].shape == (batch, seq, lm.cfg.vocab_size)
    assert got[2].shape == (batch, lm.cfg.num_kv_heads, seq, lm.cfg.head_dim)  # the new tokens only
    assert np.abs(got[0] - ref[0].numpy()).max() <= 1e-3
    assert np.abs(got[1] - ref[1].numpy()).max() <= 1e-4
    for g, r in zip(got[2:], ref[2:]):
        assert np.abs(g - r.numpy()).max() <= 1e-4


def test_lm_reshapes_have_constant_shapes(tiny_export):
    """Every Reshape in the step graph takes a constant shape (0 / -1 rules), so no per-layer shape
    arithmetic runs per step; test_lm_step_dynamic_sizes shows the results stay right at all sizes."""
    model = onnx.load(str(tiny_export / LM_ONNX), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    assert reshapes and all(n.input[1] in constants for n in reshapes)
    assert sum(n.op_type == "Shape" for n in model.graph.node) <= 4  # the mask / position set-up only


def test_lm_config_names_every_input_and_output(tiny_export):
    cfg = json.loads((tiny_export / LM_CONFIG).read_text())
    model = onnx.load(str(tiny_export / LM_ONNX), load_external_data=False)
    assert [i["name"] for i in cfg["inputs"]] == [i.name for i in model.graph.input]
    assert [o["name"] for o in cfg["outputs"]] == [o.name for o in model.graph.output]
    assert cfg["special_tokens"] == {"unk": 0, "text": 1, "start": 2, "stop": 3}
    assert cfg["audio_token_first_id"] == 4 and cfg["audio_token_count"] == 8000
    assert cfg["num_layers"] == 2 and cfg["hidden_size"] == 512 and cfg["num_kv_heads"] == 1
    assert cfg["max_position_embeddings"] == 512 and cfg["vocab_size"] == 8192


@pytest.mark.parametrize("batch,tokens", [(1, 1), (1, 2), (3, 17), (2, 64)])
def test_decoder_dynamic_sizes(tiny_checkpoint, tiny_export, batch, tokens):
    decoder = load_decoder(tiny_checkpoint / "decoder.pth")
    sess = ort_session(tiny_export / DECODER_ONNX)
    hidden = torch.randn(batch, 512, tokens, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        ref = decoder(hidden).numpy()
    got = sess.run(None, {"hidden_states": hidden.numpy()})[0]
    assert got.shape == (batch, 1025, 4 * (tokens - 1) + 1, 2)
    assert np.abs(got - ref).max() <= 1e-3


def test_decoder_graph_has_no_istft(tiny_export):
    model = onnx.load(str(tiny_export / DECODER_ONNX))
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"DFT", "STFT", "HannWindow", "ConvTranspose"}, ops


def test_istft_config_json(tiny_export):
    cfg = json.loads((tiny_export / DECODER_CONFIG).read_text())
    for key in ("n_fft", "hop_length", "win_length", "window", "center", "normalized", "onesided", "length",
                "sample_rate", "samples_per_token", "upscale_factor", "zeroed_bins"):
        assert key in cfg, key
    assert (cfg["n_fft"], cfg["hop_length"], cfg["win_length"]) == (2048, 512, 2048)
    assert cfg["sample_rate"] == 32000 and cfg["samples_per_token"] == 2048 and cfg["upscale_factor"] == 4
    assert list(cfg["zeroed_bins"]) == [0, 1024] and cfg["center"] is True


def test_export_folder_is_self_contained(tiny_export):
    for name in (DECODER_ONNX, DECODER_CONFIG, LM_ONNX, LM_CONFIG, "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_export / name).is_file(), name


def test_failed_shape_inference_leaves_no_files_behind(tmp_path, monkeypatch):
    """ONNX Runtime's symbolic shape inference dumps the model (weights and all) into the working
    directory when it fails; constant_reshape_shapes runs it elsewhere."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from pipeline_lib.export.onnx_io import constant_reshape_shapes

    def failing(model, **kwargs):
        Path("sym_shape_infer_temp.onnx").write_bytes(b"x")
        Path("weights.data").write_bytes(b"x" * 1024)
        raise Exception("Incomplete symbolic shape inference")

    monkeypatch.setattr(SymbolicShapeInference, "infer_shapes", staticmethod(failing))
    monkeypatch.chdir(tmp_path)
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    with pytest.raises(Exception, match="Incomplete"):
        constant_reshape_shapes(model)
    assert list(tmp_path.iterdir()) == [] and Path.cwd() == tmp_path

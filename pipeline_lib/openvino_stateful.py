"""The LM as a stateful OpenVINO model: the KV cache lives in OpenVINO state, not in the caller's arrays.

As OpenVINO's own LLM export does it (optimum-intel), the model is converted from PyTorch
(`SopranoLMStateful`: past_* reordered by beam_idx, joined with the call's keys / values, SDPA,
present_* out), then each past_* input / present_* output pair becomes one state variable
(ReadValue / Assign). OpenVINO's CPU plugin fuses each layer's ReadValue -> Gather -> Concat -> SDPA ->
Assign into one attention node that keeps the cache in its own growing buffer: a decode step moves
four small inputs (input_ids, attention_mask, position_ids, beam_idx) and two outputs across the API
instead of 34 cache arrays, and attends to the tokens there are, not to a fixed width.

    inputs : input_ids [B, S] int64, attention_mask [B, P+S] int64 (left padding), position_ids [B, S]
             int64, beam_idx [B] int32: the rows of the previous call's state this call continues
             (arange(B) normally; a subset when rows leave the batch)
    outputs: logits [B, S, vocab], hidden_states [B, S, hidden]
    state  : past_key_i / past_value_i, [B, kv_heads, P, head_dim]; `InferRequest.reset_state()` empties it
             (the next call is a prefill: attention_mask as wide as input_ids).

This module only makes an ov.Model stateful (`make_stateful`) and writes its config; like optimum-intel's
stateful.py it is a leaf (OpenVINO utilities and the registry's names): the conversion from the checkpoint,
weight compression and saving are pipeline_lib.convert's (`convert_lm_to_openvino_stateful`), which calls it.

Why the ONNX step model is not converted instead: its attention (two products under one softmax, no
concatenated cache) has no SDPA op for the plugin to fuse, and ONNX has none that OpenVINO maps to it.
The fp32 IR of the ONNX model is still written beside it (`convert_onnx_to_openvino`): parity compares
it with ONNX, and the runtime can run it (explicit cache, see runtime.backends.OpenVinoLM).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pipeline_lib.errors import ExportError
from pipeline_lib.openvino_ir import import_openvino
from pipeline_lib.registry import KV_CACHE_STATE


def stateful_interface(num_layers: int) -> tuple[list[str], list[str], dict[str, str]]:
    """Input and output names of the compiled model, and the state variables (past_* -> present_*)."""
    inputs = ["input_ids", "attention_mask", "position_ids", "beam_idx"]
    outputs = ["logits", "hidden_states"]
    states = {f"past_{k}_{i}": f"present_{k}_{i}" for i in range(num_layers) for k in ("key", "value")}
    return inputs, outputs, states


def _zero_state_init(model: Any, num_kv_heads: int, head_dim: int) -> None:
    """Give every ReadValue an initial value: an empty cache [B, kv_heads, 0, head_dim], B from input_ids.
    Without one the CPU plugin cannot compile the model."""
    import openvino.opset13 as ops

    batch = ops.gather(ops.shape_of(model.input("input_ids"), output_type="i64"),
                       ops.constant(np.array([0], dtype=np.int64)), ops.constant(np.int64(0)))
    rest = ops.constant(np.array([num_kv_heads, 0, head_dim], dtype=np.int64))
    for op in model.get_ops():
        if op.get_type_name() == "ReadValue":
            shape = ops.concat([batch, rest], 0)
            op.set_arguments([ops.broadcast(ops.constant(np.float32(0)), shape).output(0)])
    model.validate_nodes_and_infer_types()


def make_stateful(model: Any, input_names: Sequence[str], output_names: Sequence[str], num_layers: int,
                  num_kv_heads: int, head_dim: int) -> Any:
    """Turn a converted stateful-form LM (inputs input_ids, attention_mask, position_ids, beam_idx,
    past_*; outputs logits, hidden_states, present_*: model.lm.SopranoLMStateful) into the stateful model,
    in place: name its ports, make every dimension dynamic, pair each past_* with its present_* as one
    state variable (ReadValue / Assign) initialised to an empty cache. Returns the model."""
    ov = import_openvino()
    from openvino._offline_transformations import apply_make_stateful_transformation

    if len(model.inputs) != len(input_names) or len(model.outputs) != len(output_names):
        raise ExportError(f"stateful LM: OpenVINO made {len(model.inputs)} inputs / {len(model.outputs)} outputs, "
                          f"expected {len(input_names)} / {len(output_names)}")
    for port, name in zip(model.inputs, input_names):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, output_names):
        port.get_tensor().set_names({name})

    def dynamic(name: str) -> list[int]:  # -1: any length
        if name == "beam_idx":
            return [-1]
        return [-1, num_kv_heads, -1, head_dim] if name.startswith("past_") else [-1, -1]

    model.reshape({port: ov.PartialShape(dynamic(name)) for port, name in zip(model.inputs, input_names)})
    _, _, states = stateful_interface(num_layers)
    apply_make_stateful_transformation(model, states)
    _zero_state_init(model, num_kv_heads, head_dim)
    return model


def stateful_config(step_config: dict, conversion: dict) -> dict:
    """The stateful model's JSON config, from the LM step model's: its own inputs, outputs and state."""
    layers = int(step_config["num_layers"])
    by_name = {d["name"]: d for d in [*step_config["inputs"], *step_config["outputs"]]}
    inputs, outputs, states = stateful_interface(layers)
    cfg = {k: v for k, v in step_config.items() if k not in ("inputs", "outputs", "kv_note", "conversion")}
    cfg["file"] = conversion["file"]
    cfg["inputs"] = [by_name[n] for n in inputs if n in by_name] + [{"name": "beam_idx", "shape": ["batch"], "dtype": "int32"}]
    cfg["outputs"] = [by_name[n] for n in outputs]
    cfg["kv_cache"] = KV_CACHE_STATE
    cfg["state"] = [{"name": past, "present": present, "shape": cfg["kv_layout"]} for past, present in states.items()]
    cfg["kv_note"] = ("the KV cache is OpenVINO state (InferRequest.reset_state() empties it; the next call is a "
                      "prefill); beam_idx picks the rows of the previous call's state that this call continues; "
                      "attention_mask covers the cached tokens and this call's, left padding")
    cfg["conversion"] = conversion
    return cfg

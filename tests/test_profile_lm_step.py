"""scripts/profile_lm_step.py: the bytes a step reads, the trace parsing, and a run on the tiny export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest



@pytest.fixture(scope="module")
def prof(load_script):
    return load_script("profile_lm_step")


def test_step_bytes_counts_one_embedding_row(prof, tmp_path):
    """An embedding table read by Gather costs one row per token; a MatMul weight is read whole."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
    w = numpy_helper.from_array(np.zeros((4, 3), np.float32), "w")
    head = numpy_helper.from_array(np.zeros((3, 5), np.float32), "head_w")
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"], name="/embed/Gather"),
         helper.make_node("MatMul", ["e", "w"], ["h"], name="/layers.0/MatMul"),
         helper.make_node("MatMul", ["h", "head_w"], ["y"], name="/lm_head/MatMul")],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 5])], [table, w, head])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    total, head_bytes, nodes = prof.step_bytes(path)
    assert (total, head_bytes, nodes) == (4 * 4 + 4 * 3 * 4 + 3 * 5 * 4, 3 * 5 * 4, 3)


def test_parse_profile_sums_kernel_time_of_the_chosen_runs(prof, tmp_path):
    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = []
    for i in range(3):  # run i: a MatMulNBits, the head, an Add; model_run 100 us
        t = 1000 * i
        events += [{"cat": "Session", "name": "model_run", "ts": t, "dur": 100},
                   node("/layers.0/q_proj/MatMul_Q4", "MatMulNBits", t + 1, 10 * (i + 1)),
                   node("/lm_head/MatMul_Q4", "MatMulNBits", t + 20, 30),
                   node("/Add", "Add", t + 60, 5),
                   {"cat": "Node", "name": "/Add_fence_before", "ts": t + 59, "dur": 7, "args": {"op_name": "Add"}}]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(events))
    p = prof.parse_profile(str(path), 1, 2)  # runs 1 and 2
    assert p["by_op"]["MatMulNBits"] == pytest.approx((20 + 30) / 2 * 1e-6)
    assert p["by_op"]["MatMulNBits (lm_head)"] == pytest.approx(30e-6)
    assert p["by_op"]["Add"] == pytest.approx(5e-6)  # fences are not kernel time
    assert p["count"] == {"MatMulNBits": 1, "MatMulNBits (lm_head)": 1, "Add": 1}
    assert p["model_run"] == pytest.approx(100e-6)
    with pytest.raises(RuntimeError):
        prof.parse_profile(str(path), 2, 2)


def test_runs_on_the_tiny_export(tiny_export, monkeypatch, capsys, prof):
    lm = next(Path(tiny_export).rglob("soprano_lm_step.onnx"))
    monkeypatch.setattr(sys, "argv", ["profile_lm_step.py", "--model", str(lm), "--threads", "1", "--rows", "1", "2",
                                      "--steps", "4", "--warmup", "2", "--rounds", "2", "--chain-nodes", "10",
                                      "--floor-mb", "8", "--floor-reps", "2"])
    prof.main()
    out = capsys.readouterr().out
    for rows in (1, 2):
        assert f"== threads 1, rows {rows}:" in out
    assert out.count("MatMul ") >= 2 and "(outside kernels)" in out and "Python overhead" in out
    assert "floor: weights" in out and "the MatMulNBits nodes alone" not in out  # fp32: no MatMulNBits

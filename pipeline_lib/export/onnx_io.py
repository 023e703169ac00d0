"""Shared pieces of the ONNX exporters: the torch -> ONNX call and a check of the written file."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from pipeline_lib.errors import ExportError
from pipeline_lib.fsutil import atomic_file

log = logging.getLogger(__name__)
DEFAULT_OPSET = 17


def export_to_onnx(
    model: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int = DEFAULT_OPSET,
    postprocess: Callable[["onnx.ModelProto"], None] | None = None,
) -> Path:
    """Export with the TorchScript-based exporter and check the result; written atomically.

    The TorchScript exporter is used on purpose: it keeps every axis named in ``dynamic_axes`` symbolic,
    including a KV cache of length 0, which the dynamo exporter would specialise. `postprocess`, if
    given, edits the exported graph in place before the check (see constant_reshape_shapes).
    """
    import onnx

    with atomic_file(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    args,
                    str(tmp),
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_axes=dynamic_axes,
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise ExportError(f"exporting {path.name} failed: {exc}") from exc
        if postprocess is not None:
            graph = onnx.load(str(tmp))
            try:
                postprocess(graph)
            except Exception as exc:  # noqa: BLE001
                raise ExportError(f"{path.name}: post-processing the exported graph failed: {exc}") from exc
            onnx.save(graph, str(tmp))
            del graph
        try:
            onnx.checker.check_model(str(tmp))
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"{path.name}: the exported graph does not pass onnx.checker: {exc}") from exc
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def ort_session(path: Path, num_threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def constant_reshape_shapes(model: "onnx.ModelProto", may_be_zero: Sequence[str] = ()) -> int:
    """Give every Reshape whose target shape the graph computes at run time (Shape -> Gather ->
    Unsqueeze -> Concat chains, as the TorchScript exporter writes `x.view(b, s, ...)`) a constant
    shape instead, where ONNX Reshape's own rules can say it: 0 copies the input's dimension at the
    same index, -1 takes what is left (used for at most one dimension, and never where a dimension
    named in `may_be_zero` is involved, since -1 is undefined for an empty tensor). The dimensions
    come from ONNX Runtime's symbolic shape inference. Then drops the nodes nothing uses any more.

    In place; returns how many Reshapes got a constant shape. The step graph then has no per-layer
    shape arithmetic (80M LM: ~1050 -> ~870 nodes after ONNX Runtime's own optimisations)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # On failure ONNX Runtime saves the half-inferred model, weights included, as external data into
    # the working directory ("sym_shape_infer_temp.onnx" and a weight-sized .data file): run it in a
    # temporary directory so that nothing is left behind.
    with tempfile.TemporaryDirectory(prefix="soprano-shape-infer-") as scratch:
        cwd = os.getcwd()
        os.chdir(scratch)
        try:
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        finally:
            os.chdir(cwd)
    dims: dict[str, list[int | str | None]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            dims[vi.name] = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
            ]
    constants = {i.name for i in model.graph.initializer}
    zero_names = tuple(may_be_zero)
    done = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.input[1] in constants:
            continue
        src, out = dims.get(node.input[0]), dims.get(node.output[0])
        if not src or not out or any(d is None or d == 0 for d in out):
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        shape: list[int] = []
        unknown: list[int] = []
        for i, d in enumerate(out):
            if isinstance(d, int):
                shape.append(d)
            elif i < len(src) and src[i] == d:
                shape.append(0)
            else:
                unknown.append(i)
                shape.append(-1)
        if len(unknown) > 1 or any(z in str(out[i]) for i in unknown for z in zero_names):
            continue
        name = f"{node.output[0]}__const_shape"
        model.graph.initializer.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), name))
        constants.add(name)
        node.input[1] = name
        done += 1
    _drop_unused_nodes(model)
    onnx.checker.check_model(model)
    return done


def _drop_unused_nodes(model: "onnx.ModelProto") -> None:
    """Remove nodes none of whose outputs reaches a graph output (in place)."""
    needed = {o.name for o in model.graph.output}
    keep = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del model.graph.node[:]
    model.graph.node.extend(keep)

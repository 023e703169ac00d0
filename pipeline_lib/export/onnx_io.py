"""Shared pieces of the ONNX exporters: the torch -> ONNX call and a check of the written file."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Sequence

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
) -> Path:
    """Export with the TorchScript-based exporter and check the result; written atomically.

    The TorchScript exporter is used on purpose: it keeps every axis named in ``dynamic_axes`` symbolic,
    including a KV cache of length 0, which the dynamo exporter would specialise.
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

"""int8 ONNX models for ONNX Runtime.

Two methods, chosen per model in conf/convert/default.yaml (the measurements behind the defaults are there):

- ``dynamic``: ``onnxruntime.quantization.quantize_dynamic``. Weights int8 ahead of time; activations are
  quantised to uint8 per tensor at run time (DynamicQuantizeLinear + MatMulInteger, fused by ORT into
  DynamicQuantizeMatMul). Fast on CPUs with VNNI, but the activation rounding costs accuracy.
- ``matmul_nbits``: ``MatMulNBitsQuantizer`` with ``bits`` (8 or 4): weight-only, block-wise symmetric
  scales; the matmul itself runs in f32 (``accuracy_level`` 0/1) or int8 (4) inside one MatMulNBits kernel.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Sequence

from pipeline_lib.errors import ExportError, ModelFileError
from pipeline_lib.fsutil import atomic_file

log = logging.getLogger(__name__)
METHODS = ("dynamic", "matmul_nbits")


def quantize_onnx_int8(
    onnx_path: Path | str,
    out_path: Path | str,
    method: str = "dynamic",
    op_types: Sequence[str] = ("MatMul",),
    weight_type: str = "qint8",
    per_channel: bool = False,
    reduce_range: bool = False,
    nodes_to_exclude: Sequence[str] = (),
    bits: int = 8,
    block_size: int = 128,
    accuracy_level: int = 4,
) -> Path:
    """Quantise ``onnx_path`` into ``out_path`` (written atomically) and return ``out_path``.

    ``method="dynamic"`` uses ``op_types``, ``weight_type`` (qint8 / quint8), ``per_channel``, ``reduce_range``;
    ``method="matmul_nbits"`` uses ``bits``, ``block_size``, ``accuracy_level``. Both honour ``nodes_to_exclude``.
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    if not onnx_path.is_file():
        raise ModelFileError(f"{onnx_path}: ONNX model not found; run the export first.")
    with atomic_file(out_path) as tmp, _quiet_root_logger():
        try:
            if method == "dynamic":
                _dynamic(onnx_path, tmp, op_types, weight_type, per_channel, reduce_range, nodes_to_exclude)
            else:
                _nbits(onnx_path, tmp, bits, block_size, accuracy_level, nodes_to_exclude)
        except (ValueError, ModelFileError):
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise ExportError(f"{onnx_path}: ONNX Runtime quantisation ({method}) failed: {exc}") from exc
    log.info("wrote %s (%s, %.1f MB)", out_path, method, out_path.stat().st_size / 1e6)
    return out_path


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs one INFO line per tensor on the root logger; keep warnings only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def _dynamic(src: Path, dst: Path, op_types, weight_type: str, per_channel: bool, reduce_range: bool, exclude) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    types = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
    if weight_type not in types:
        raise ValueError(f"weight_type {weight_type!r}: expected one of {sorted(types)}")
    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=list(op_types),
        weight_type=types[weight_type],
        per_channel=per_channel,
        reduce_range=reduce_range,
        nodes_to_exclude=list(exclude),
    )


def _nbits(src: Path, dst: Path, bits: int, block_size: int, accuracy_level: int, exclude) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if bits not in (4, 8):
        raise ValueError(f"bits {bits}: MatMulNBits supports 4 or 8 here")
    model = onnx.load(str(src))
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, bits=bits)
    q = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                             nodes_to_exclude=list(exclude), algo_config=cfg, bits=bits)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)

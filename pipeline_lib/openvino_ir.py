"""OpenVINO IR files and CPU compile settings, shared by the conversion (pipeline_lib.convert), the parity
checks and the runtime (pipeline_lib.runtime.backends). A leaf: openvino is imported when a function
needs it, so a missing package is a MissingBackendError with the install command.

An IR is a .xml (the graph) + .bin (the weights) pair: `save_ir` writes both atomically with fp32
weights kept fp32, `load_openvino_model` checks that the .bin is the one the .xml addresses.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Mapping

from pipeline_lib.errors import MissingBackendError, ModelFileError

log = logging.getLogger(__name__)

OPENVINO_INSTALL = "pip install 'soprano-onnx[openvino]'"
# DYNAMIC_QUANTIZATION_GROUP_SIZE: for layers with int8 weights, OpenVINO's CPU plugin quantises
# the activations at run time, in groups of this many input channels (its default: 32). Measured on the 80M LM (int8, one row at 300
# cached tokens, fixed shapes, 2 threads, 8 alternating rounds in one process): median 3.50 ms per
# step at 256 against 3.81 ms at 32, 3.64 at 128, 3.67 at 512 (which does not divide the MLP's 2304)
# and 4.03 with it off (0); in the generation loop 3.96 against 4.11 ms (one row) and 6.24 against
# 7.28 ms (8 rows). Accuracy against fp32 (parity_convert, random-80m), 256 against 32: hidden
# cosine min 0.987 / 0.990, teacher-forced token agreement 0.77 / 0.84, decoder SNR 36.0 / 36.9 dB
# (ONNX Runtime int8: 0.980, 0.73, 35.1 dB). fp32 weights are not affected.
OV_DYNAMIC_QUANT_GROUP = 256
# KV_CACHE_PRECISION: the stateful LM's cache (OpenVINO state, pipeline_lib.openvino_stateful) is stored
# as u8 by default on this plugin, which moved the 80M LM's hidden states by up to 0.07 against ONNX
# Runtime fp32 (f32 cache: the plain IR's 1e-5 level). f32 keeps fp32 meaning fp32 (and int8 meaning
# int8 weights only); models without such state ignore it.
OV_KV_CACHE_PRECISION = "f32"


def ov_cpu_config(inference_precision: str = "f32", threads: int | None = None) -> dict[str, Any]:
    """How every OpenVINO CPU compile here is configured (the runtime's, the parity checks'), for a
    target's inference precision (registry.Precision.inference). INFERENCE_PRECISION_HINT: OpenVINO runs
    bf16 (or fp16) on CPUs that have it unless told otherwise, so "f32" is set explicitly."""
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": inference_precision,
                           "DYNAMIC_QUANTIZATION_GROUP_SIZE": OV_DYNAMIC_QUANT_GROUP,
                           "KV_CACHE_PRECISION": OV_KV_CACHE_PRECISION}
    if threads is not None:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


def import_openvino(needed_by: str = "the OpenVINO backend") -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise MissingBackendError(f"{needed_by} needs the openvino package, which is not installed: "
                                  f"{OPENVINO_INSTALL}") from exc
    return openvino


def save_ir(model: Any, xml_path: Path | str) -> Path:
    """``openvino.save_model`` with fp32 weights kept as they are, written atomically as a .xml/.bin pair."""
    ov = import_openvino()
    xml_path = Path(xml_path)
    bin_path = xml_path.with_suffix(".bin")
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{xml_path.stem}.tmp-", dir=xml_path.parent))
    try:
        # compress_to_fp16 defaults to True: it would silently turn fp32 (and the f32 scales of int8) into fp16.
        ov.save_model(model, str(tmp / xml_path.name), compress_to_fp16=False)
        # Stale pair first, so no moment exists where an old .xml points into a new .bin.
        xml_path.unlink(missing_ok=True)
        os.replace(tmp / bin_path.name, bin_path)
        try:
            os.replace(tmp / xml_path.name, xml_path)
        except BaseException:
            bin_path.unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s + %s (%.1f MB)", xml_path.name, bin_path.name, bin_path.stat().st_size / 1e6)
    return xml_path


def ir_weights_size(xml_path: Path | str) -> int:
    """Bytes of .bin that the IR's Const layers address (the end of the furthest one)."""
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ModelFileError(f"{xml_path}: not a readable OpenVINO IR .xml ({exc}); re-run the conversion.") from exc
    end = 0
    for layer in root.iter("layer"):
        if layer.get("type") != "Const":
            continue
        data = layer.find("data")
        if data is not None and data.get("offset") is not None and data.get("size") is not None:
            end = max(end, int(data.get("offset")) + int(data.get("size")))
    return end


def load_openvino_model(xml_path: Path | str, core: Any = None) -> Any:
    """Read an IR after checking that its .bin is there and is the size the .xml's constants need.

    OpenVINO itself reads a larger .bin of another model without complaint (and runs with garbage weights);
    a size check catches a .bin copied from another model or a truncated download. Errors name the file.
    """
    ov = import_openvino()
    xml_path = Path(xml_path)
    bin_path = xml_path.with_suffix(".bin")
    if not xml_path.is_file():
        raise ModelFileError(f"{xml_path}: OpenVINO IR not found; run `dvc repro convert` (or convert_onnx_to_openvino).")
    if not bin_path.is_file():
        raise ModelFileError(
            f"{bin_path}: weights file missing beside {xml_path.name}; an IR is a .xml + .bin pair, copy both "
            "(or re-run the conversion)."
        )
    need, have = ir_weights_size(xml_path), bin_path.stat().st_size
    if need != have:
        raise ModelFileError(
            f"{bin_path}: {have} bytes, but {xml_path.name} addresses {need} bytes of weights: the .bin belongs to "
            "another model or is truncated; copy the .xml and .bin of one conversion together."
        )
    try:
        return (core or ov.Core()).read_model(str(xml_path), str(bin_path))
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"{xml_path}: OpenVINO could not read the IR: {exc}") from exc


def compile_openvino(model: Any, num_threads: int = 1, core: Any = None, config: Mapping[str, Any] | None = None,
                     inference_precision: str = "f32") -> Any:
    """Compile for CPU with `ov_cpu_config(inference_precision)`, ``num_threads`` threads, one latency
    stream; ``config`` overrides single settings. ``model``: an ov.Model or the path of an IR."""
    ov = import_openvino()
    if isinstance(model, (str, Path)):
        model = load_openvino_model(model, core)
    cfg = {**ov_cpu_config(inference_precision, num_threads), "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    cfg.update(config or {})
    return (core or ov.Core()).compile_model(model, "CPU", cfg)

"""Conversion of the exported ONNX models: OpenVINO IR (fp32, int8 weights via NNCF), int8 ONNX for ORT.

One conversion target is a backend x precision pair. Its folder is self-contained for the runtime:
``{lm,decoder}/`` each holds the model file(s) under the export's file stem, the export's JSON config
(``file`` pointing at the converted model, a ``conversion`` record beside it) and, for the LM, the tokenizer.

    artifacts/openvino/fp32/lm/soprano_lm_step.xml + .bin          ovc-equivalent, weights kept fp32
    artifacts/openvino/int8/lm/soprano_lm_step.xml + .bin          NNCF int8 weight compression
    artifacts/onnx/int8/lm/soprano_lm_step.onnx                    ORT dynamic int8 (pipeline_lib.quantize_ort)
    artifacts/onnx/fp32/lm/soprano_lm_step.onnx                    the export itself, hard-linked
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipeline_lib.errors import ExportError, MissingBackendError, ModelFileError
from pipeline_lib.fsutil import atomic_dir, write_json

log = logging.getLogger(__name__)

OPENVINO_INSTALL = "pip install 'soprano-onnx[openvino]'"
NNCF_INSTALL = "pip install 'soprano-onnx[export]'"
BACKENDS = ("onnx", "openvino")
PRECISIONS = ("fp32", "int8")
OV_INT8_MODES = ("int8_asym", "int8_sym")
# How every OpenVINO compile here is configured (the runtime's and the parity stage's).
# INFERENCE_PRECISION_HINT: OpenVINO runs bf16 (or fp16) on CPUs that have it unless told otherwise.
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
OV_CPU_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": OV_DYNAMIC_QUANT_GROUP,
                 "KV_CACHE_PRECISION": "f32"}

LM_DIR, DECODER_DIR = "lm", "decoder"


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise MissingBackendError(f"the OpenVINO backend needs the openvino package: {OPENVINO_INSTALL}") from exc
    return openvino


def import_nncf() -> Any:
    import_openvino()
    try:
        import nncf
    except ImportError as exc:
        raise MissingBackendError(f"int8 OpenVINO conversion needs the nncf package: {NNCF_INSTALL}") from exc
    return nncf


def convert_onnx_to_openvino(
    onnx_path: Path | str,
    out_path: Path | str | None = None,
    weight_format: str = "fp32",
    int8_mode: str = "int8_asym",
) -> Path:
    """Convert an ONNX model to OpenVINO IR (.xml + .bin) and return the .xml path.

    ``weight_format="fp32"``: ``openvino.convert_model`` then ``save_model(..., compress_to_fp16=False)``.
    OpenVINO's ``save_model`` and the ``ovc`` tool compress weights to fp16 BY DEFAULT; here fp32 means fp32.
    ``weight_format="int8"``: NNCF weight compression (``int8_mode``: ``int8_asym`` or ``int8_sym``),
    per output channel, every MatMul / Gather / Conv weight including the embedding and the logits head.
    The IR holds int8 weights and their scales, activations are f32; at run time the CPU plugin by default
    also quantises activations on the fly in groups of 32 (``DYNAMIC_QUANTIZATION_GROUP_SIZE``) for int8
    dot products (0, 128 or 512 instead made no measurable difference to LM decode speed here).

    The default ``out_path`` is beside the ONNX file: ``<stem>_fp32.xml`` / ``<stem>_int8.xml``.
    Both files are written under temporary names and renamed at the end: a failure leaves neither.
    """
    ov = import_openvino()
    onnx_path = Path(onnx_path)
    if weight_format not in PRECISIONS:
        raise ValueError(f"weight_format {weight_format!r}: expected one of {PRECISIONS}")
    if int8_mode not in OV_INT8_MODES:
        raise ValueError(f"int8_mode {int8_mode!r}: expected one of {OV_INT8_MODES}")
    if not onnx_path.is_file():
        raise ModelFileError(f"{onnx_path}: ONNX model not found; run the export first (dvc repro export_lm export_decoder).")
    xml_path = Path(out_path) if out_path is not None else onnx_path.with_name(f"{onnx_path.stem}_{weight_format}.xml")
    if xml_path.suffix != ".xml":
        raise ValueError(f"{xml_path}: an OpenVINO IR path must end in .xml (its weights go beside it in .bin)")
    nncf = import_nncf() if weight_format == "int8" else None
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ExportError(f"{onnx_path}: OpenVINO could not convert the model: {exc}") from exc
    if nncf is not None:
        mode = getattr(nncf.CompressWeightsMode, int8_mode.upper())
        model = nncf.compress_weights(model, mode=mode)
    save_ir(model, xml_path)
    return xml_path


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


def compile_openvino(model: Any, num_threads: int = 1, core: Any = None, config: Mapping[str, Any] | None = None) -> Any:
    """Compile for CPU as the runtime does (OV_CPU_CONFIG: f32 inference precision, never bf16; the
    dynamic quantisation group of int8-weight layers), ``num_threads`` threads, one latency stream."""
    ov = import_openvino()
    if isinstance(model, (str, Path)):
        model = load_openvino_model(model, core)
    cfg = {**OV_CPU_CONFIG, "INFERENCE_NUM_THREADS": int(num_threads), "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    cfg.update(config or {})
    return (core or ov.Core()).compile_model(model, "CPU", cfg)


@dataclass
class ConvertSettings:
    """The ``convert`` params that shape the artifacts (conf/convert/default.yaml)."""

    openvino_int8_mode: str = "int8_asym"
    onnx_int8: dict[str, Any] = field(default_factory=dict)  # keyword arguments of quantize_onnx_int8, per model

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "ConvertSettings":
        ov = dict(params.get("openvino", {}) or {})
        onnx = dict(params.get("onnx", {}) or {})
        return cls(openvino_int8_mode=str(ov.get("int8_mode", "int8_asym")),
                   onnx_int8={k: _plain(v) for k, v in (onnx.get("int8", {}) or {}).items()})


def _plain(v: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(v):
            return OmegaConf.to_container(v, resolve=True)
    except ImportError:
        pass
    return v


@dataclass(frozen=True)
class ModelSpec:
    """Where an exported model's file name lives in its JSON config."""

    subdir: str
    config_name: str
    extra_files: tuple[str, ...]

    def onnx_name(self, cfg: dict) -> str:
        return cfg["file"] if self.subdir == LM_DIR else cfg["onnx"]["file"]

    def set_model(self, cfg: dict, conversion: dict) -> None:
        """Point the config at the converted file and record how it was made.

        The decoder's config is read strictly by IstftConfig (which skips only its "onnx" and "decoder"
        blocks), so there the record goes inside the "onnx" block, which describes the model file.
        """
        block = cfg if self.subdir == LM_DIR else cfg["onnx"]
        block["file"] = conversion["file"]
        block["conversion"] = conversion


def _specs() -> dict[str, ModelSpec]:
    from pipeline_lib.export.decoder import DECODER_CONFIG
    from pipeline_lib.export.lm import LM_CONFIG, TOKENIZER_FILES

    return {
        LM_DIR: ModelSpec(LM_DIR, LM_CONFIG, TOKENIZER_FILES),
        DECODER_DIR: ModelSpec(DECODER_DIR, DECODER_CONFIG, ()),
    }


def model_file(folder: Path | str, which: str) -> Path:
    """The model file (.onnx or .xml) in an ``lm`` or ``decoder`` folder (export or converted), as its config names it."""
    spec = _specs()[which]
    folder = Path(folder)
    cfg_path = folder / spec.config_name
    if not cfg_path.is_file():
        raise ModelFileError(f"{cfg_path}: config not found; expected an exported or converted {which} folder.")
    return folder / spec.onnx_name(json.loads(cfg_path.read_text()))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _convert_model(src: Path, dst_dir: Path, backend: str, precision: str, settings: ConvertSettings,
                   which: str) -> dict[str, Any]:
    """Convert one model file ``src`` into ``dst_dir``; return the conversion block of its config."""
    start = time.perf_counter()
    info: dict[str, Any] = {"backend": backend, "precision": precision, "source": src.name}
    if backend == "onnx" and precision == "fp32":
        out = dst_dir / src.name
        _link_or_copy(src, out)
        info.update(method="none: the fp32 export itself (hard link)", file=out.name)
    elif backend == "onnx" and precision == "int8":
        from pipeline_lib.quantize_ort import quantize_onnx_int8

        kwargs = dict(settings.onnx_int8.get(which, {}) or {})
        out = quantize_onnx_int8(src, dst_dir / src.name, **kwargs)
        info.update(method="onnxruntime.quantization", settings=kwargs, file=out.name)
    elif backend == "openvino":
        out = convert_onnx_to_openvino(src, dst_dir / f"{src.stem}.xml", weight_format=precision,
                                       int8_mode=settings.openvino_int8_mode)
        info.update(file=out.name, weights_file=out.with_suffix(".bin").name)
        if precision == "fp32":
            info["method"] = "openvino.convert_model + save_model(compress_to_fp16=False)"
        else:
            info["method"] = f"nncf.compress_weights mode={settings.openvino_int8_mode} (per-channel int8 weights)"
        info["inference_precision_hint"] = "f32"
    else:
        raise ValueError(f"unknown target {backend}/{precision}: backends {BACKENDS}, precisions {PRECISIONS}")
    info["seconds"] = round(time.perf_counter() - start, 3)
    files = [out] + ([out.with_suffix(".bin")] if out.suffix == ".xml" else [])
    info["bytes"] = sum(f.stat().st_size for f in files)
    info["source_bytes"] = src.stat().st_size
    return info


def convert_target(
    backend: str,
    precision: str,
    decoder_dir: Path | str,
    lm_dir: Path | str,
    out_dir: Path | str,
    settings: ConvertSettings | None = None,
    checkpoint_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Build ``out_dir/{lm,decoder}`` for one backend x precision from the export folders; return its figures.

    For OpenVINO with ``checkpoint_dir``, the LM folder also gets the stateful LM (KV cache in OpenVINO
    state, see pipeline_lib.openvino_stateful), converted from the checkpoint, with its own config; the
    runtime prefers it (figures key ``lm_stateful``).
    The whole ``out_dir`` appears at once (atomic rename) or not at all.
    """
    if backend not in BACKENDS or precision not in PRECISIONS:
        raise ValueError(f"unknown target {backend}/{precision}: backends {BACKENDS}, precisions {PRECISIONS}")
    if backend == "openvino" and checkpoint_dir is not None and not (Path(checkpoint_dir) / "config.json").is_file():
        raise ModelFileError(f"{checkpoint_dir}: not a checkpoint folder (no config.json); the stateful OpenVINO LM "
                             "is converted from the checkpoint: run the fetch stage first (dvc repro fetch).")
    settings = settings or ConvertSettings()
    sources = {LM_DIR: Path(lm_dir), DECODER_DIR: Path(decoder_dir)}
    figures: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the runtime folder should read like any other
        for which, spec in _specs().items():
            src_dir = sources[which]
            cfg_path = src_dir / spec.config_name
            if not cfg_path.is_file():
                raise ModelFileError(f"{cfg_path}: export config not found; run the export stages first.")
            cfg = json.loads(cfg_path.read_text())
            src = src_dir / spec.onnx_name(cfg)
            if not src.is_file():
                raise ModelFileError(f"{src}: the ONNX model named by {cfg_path.name} is missing; re-run the export.")
            dst = tmp / which
            dst.mkdir()
            log.info("%s %s/%s: converting %s", which, backend, precision, src)
            info = _convert_model(src, dst, backend, precision, settings, which)
            spec.set_model(cfg, info)
            write_json(dst / spec.config_name, cfg)
            for name in spec.extra_files:
                if (src_dir / name).is_file():
                    shutil.copy2(src_dir / name, dst / name)
                elif name == "tokenizer.json":
                    raise ModelFileError(f"{src_dir / name}: not found; the LM folder must carry the tokenizer.")
            log.info("%s %s/%s: %.1f MB -> %.1f MB in %.1f s", which, backend, precision, info["source_bytes"] / 1e6,
                     info["bytes"] / 1e6, info["seconds"])
            figures[which] = {k: info[k] for k in ("seconds", "bytes", "source_bytes")}
            if which == LM_DIR and backend == "openvino" and checkpoint_dir is not None:
                figures["lm_stateful"] = _convert_stateful(Path(checkpoint_dir), dst, precision, settings, cfg)
    return figures


def _convert_stateful(ckpt_dir: Path, dst: Path, precision: str, settings: ConvertSettings, step_cfg: dict) -> dict:
    from pipeline_lib.openvino_stateful import STATEFUL_CONFIG, STATEFUL_FILE, convert_lm_to_openvino_stateful, stateful_config

    start = time.perf_counter()
    log.info("lm openvino/%s: converting the stateful LM from %s", precision, ckpt_dir)
    xml = convert_lm_to_openvino_stateful(ckpt_dir, dst / f"{STATEFUL_FILE}.xml", precision, settings.openvino_int8_mode)
    info: dict[str, Any] = {"backend": "openvino", "precision": precision, "source": str(ckpt_dir),
                            "file": xml.name, "weights_file": xml.with_suffix(".bin").name,
                            "method": "openvino.convert_model (PyTorch, SDPA) + make_stateful"
                                      + (f" + nncf.compress_weights mode={settings.openvino_int8_mode}" if precision == "int8" else
                                         " + save_model(compress_to_fp16=False)"),
                            "inference_precision_hint": "f32"}
    info["seconds"] = round(time.perf_counter() - start, 3)
    info["bytes"] = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    info["source_bytes"] = (ckpt_dir / "model.safetensors").stat().st_size
    write_json(dst / STATEFUL_CONFIG, stateful_config(step_cfg, info))
    log.info("lm stateful openvino/%s: %.1f MB in %.1f s", precision, info["bytes"] / 1e6, info["seconds"])
    return {k: info[k] for k in ("seconds", "bytes", "source_bytes")}

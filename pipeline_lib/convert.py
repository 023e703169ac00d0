"""Conversion of the exported ONNX models into the targets of pipeline_lib.registry: OpenVINO IR (fp32,
int8 weights via NNCF) and int8 ONNX for ONNX Runtime.

One target is a backend x precision pair; `registry.TARGETS` names the conversion function below that
builds each (`link_export`, `onnx_quantized`, `openvino_ir`, and `openvino_stateful_ir` for the stateful
LM). Its folder is self-contained for the runtime: ``{lm,decoder}/`` each holds the model file(s) under
the export's file stem, the export's JSON config (``file`` pointing at the converted model, a
``conversion`` record beside it) and, for the LM, the tokenizer.

    artifacts/openvino/fp32/lm/soprano_lm_step.xml + .bin          ovc-equivalent, weights kept fp32
    artifacts/openvino/int8/lm/soprano_lm_step.xml + .bin          NNCF int8 weight compression
    artifacts/openvino/<precision>/lm/soprano_lm_stateful.xml      the LM with its KV cache in OpenVINO state
    artifacts/onnx/int8/lm/soprano_lm_step.onnx                    ORT dynamic int8 (pipeline_lib.quantize_ort)
    artifacts/onnx/int4/lm/soprano_lm_step.onnx                    ORT MatMulNBits 4-bit (decoder: int8)
    artifacts/openvino/bf16/...                                    the fp32 IR, compiled in bf16 (its record says so)
    artifacts/onnx/fp32/lm/soprano_lm_step.onnx                    the export itself, hard-linked

`convert_target` builds a target's folder as a whole (the convert stage's out); `convert_into` writes the
same into a folder given (also `soprano-onnx convert`: pipeline_lib.convert_command); `read_export` checks
the export that both read before anything is converted.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipeline_lib import registry
from pipeline_lib.errors import ExportError, MissingBackendError, ModelFileError
from pipeline_lib.fsutil import write_json
from pipeline_lib.openvino_ir import import_openvino, save_ir
from pipeline_lib.openvino_stateful import make_stateful, stateful_config
from pipeline_lib.registry import LM_DIR, MODELS, STATEFUL_CONFIG, STATEFUL_FILE, Precision

log = logging.getLogger(__name__)

NNCF_INSTALL = "pip install 'soprano-onnx[export]'"
OV_WEIGHT_FORMATS = ("fp32", "int8", "int4")  # the weight formats (registry.Precision.weights) OpenVINO IR is written in
OV_INT8_MODES = ("int8_asym", "int8_sym")
OV_INT4_MODES = ("int4_sym", "int4_asym")
# int4: (NNCF mode, group size); data-free (no calibration set). conf/convert/default.yaml: openvino.int4_*.
DEFAULT_INT4 = ("int4_sym", 128)


def import_nncf() -> Any:
    import_openvino()
    try:
        import nncf
    except ImportError as exc:
        raise MissingBackendError(f"int8 OpenVINO conversion needs the nncf package: {NNCF_INSTALL}") from exc
    return nncf


def _check_ov_weights(weight_format: str, int8_mode: str, int4: tuple[str, int] = DEFAULT_INT4) -> None:
    if weight_format not in OV_WEIGHT_FORMATS:
        raise ValueError(f"weight_format {weight_format!r}: expected one of {OV_WEIGHT_FORMATS}")
    if int8_mode not in OV_INT8_MODES:
        raise ValueError(f"int8_mode {int8_mode!r}: expected one of {OV_INT8_MODES}")
    if int4[0] not in OV_INT4_MODES or not (isinstance(int4[1], int) and int4[1] > 0):
        raise ValueError(f"int4 {int4!r}: expected (one of {OV_INT4_MODES}, a group size > 0)")


def compress_weights(model: Any, weight_format: str, int8_mode: str = "int8_asym",
                     int4: tuple[str, int] = DEFAULT_INT4) -> Any:
    """The ov.Model with its weights in ``weight_format``: fp32 as it is; int8 by NNCF weight compression
    (``int8_mode``), per output channel, every MatMul / Gather / Conv weight including the embedding and
    the logits head."""
    _check_ov_weights(weight_format, int8_mode, int4)
    if weight_format == "fp32":
        return model
    nncf = import_nncf()
    if weight_format == "int4":
        # Every MatMul 4-bit in groups of int4[1] input channels (ratio 1.0), data-free; NNCF keeps the
        # embedding and the last MatMul (logits head) 8-bit (its backup mode).
        return nncf.compress_weights(model, mode=getattr(nncf.CompressWeightsMode, int4[0].upper()),
                                     group_size=int(int4[1]), ratio=1.0)
    return nncf.compress_weights(model, mode=getattr(nncf.CompressWeightsMode, int8_mode.upper()))


def convert_onnx_to_openvino(
    onnx_path: Path | str,
    out_path: Path | str | None = None,
    weight_format: str = "fp32",
    int8_mode: str = "int8_asym",
    int4: tuple[str, int] = DEFAULT_INT4,
) -> Path:
    """Convert an ONNX model to OpenVINO IR (.xml + .bin) and return the .xml path.

    ``weight_format="fp32"``: ``openvino.convert_model`` then ``save_model(..., compress_to_fp16=False)``.
    OpenVINO's ``save_model`` and the ``ovc`` tool compress weights to fp16 BY DEFAULT; here fp32 means fp32.
    ``weight_format="int8"``: NNCF weight compression (`compress_weights`). The IR holds int8 weights and
    their scales, activations are f32; at run time the CPU plugin also quantises activations on the fly for
    int8 dot products (``DYNAMIC_QUANTIZATION_GROUP_SIZE``, see pipeline_lib.openvino_ir).

    The default ``out_path`` is beside the ONNX file: ``<stem>_fp32.xml`` / ``<stem>_int8.xml``.
    Both files are written under temporary names and renamed at the end: a failure leaves neither.
    """
    ov = import_openvino()
    onnx_path = Path(onnx_path)
    _check_ov_weights(weight_format, int8_mode, int4)
    if not onnx_path.is_file():
        raise ModelFileError(f"{onnx_path}: ONNX model not found; run the export first (dvc repro export_lm export_decoder).")
    xml_path = Path(out_path) if out_path is not None else onnx_path.with_name(f"{onnx_path.stem}_{weight_format}.xml")
    if xml_path.suffix != ".xml":
        raise ValueError(f"{xml_path}: an OpenVINO IR path must end in .xml (its weights go beside it in .bin)")
    if weight_format != "fp32":
        import_nncf()  # before the conversion: a missing package fails fast
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ExportError(f"{onnx_path}: OpenVINO could not convert the model: {exc}") from exc
    save_ir(compress_weights(model, weight_format, int8_mode, int4), xml_path)
    return xml_path


def build_stateful_lm(ckpt_dir: Path | str) -> Any:
    """The stateful ov.Model (fp32 weights) of the checkpoint's LM: model.lm.SopranoLMStateful converted
    from PyTorch (SDPA), then made stateful (pipeline_lib.openvino_stateful.make_stateful)."""
    import torch

    from pipeline_lib.model.lm import SopranoLMStateful, load_lm

    ov = import_openvino()
    step = load_lm(ckpt_dir).eval()
    module = SopranoLMStateful(step).eval()
    c = step.cfg
    # Small example inputs (batch 1, 2 new tokens, 3 past): make_stateful makes every dimension dynamic.
    past = [torch.zeros(1, c.num_kv_heads, 3, c.head_dim) for _ in range(2 * c.num_layers)]
    example = (torch.ones(1, 2, dtype=torch.int64), torch.ones(1, 5, dtype=torch.int64),
               torch.tensor([[3, 4]]), torch.zeros(1, dtype=torch.int32), *past)
    try:
        with torch.no_grad():
            model = ov.convert_model(module, example_input=example)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{ckpt_dir}: OpenVINO could not convert the stateful LM: {exc}") from exc
    return make_stateful(model, module.input_names(), module.output_names(), c.num_layers, c.num_kv_heads, c.head_dim)


def convert_lm_to_openvino_stateful(
    ckpt_dir: Path | str,
    out_path: Path | str,
    weight_format: str = "fp32",
    int8_mode: str = "int8_asym",
    int4: tuple[str, int] = DEFAULT_INT4,
) -> Path:
    """Write the stateful LM IR (.xml + .bin) for a checkpoint folder; returns the .xml path.
    fp32 weights are kept fp32; int8: NNCF weight compression (`int8_mode`), as for the plain IR."""
    _check_ov_weights(weight_format, int8_mode, int4)
    if weight_format != "fp32":
        import_nncf()
    model = build_stateful_lm(ckpt_dir)
    return save_ir(compress_weights(model, weight_format, int8_mode, int4), Path(out_path))


# The values of conf/convert/default.yaml (the measurements behind each are there), so that ConvertSettings()
# converts as the convert stage does wherever conf/ is not at hand (`soprano-onnx convert` from an installed
# package). tests/test_convert_command.py keeps the two equal.
DEFAULT_OV_INT8_MODE = "int8_sym"
DEFAULT_ONNX: dict[str, dict[str, dict[str, Any]]] = {
    "int8": {
        "lm": {"method": "matmul_nbits", "bits": 8, "block_size": 128, "accuracy_level": 4},
        "decoder": {"method": "dynamic", "op_types": ["MatMul"], "weight_type": "qint8", "per_channel": True,
                    "reduce_range": False},
    },
    "int4": {
        "lm": {"method": "matmul_nbits", "bits": 4, "block_size": 128, "accuracy_level": 4},
        "decoder": {"method": "dynamic", "op_types": ["MatMul"], "weight_type": "qint8", "per_channel": True,
                    "reduce_range": False},
    },
}


@dataclass
class ConvertSettings:
    """The ``convert`` params that shape the artifacts. The defaults are conf/convert/default.yaml's values
    (DEFAULT_OV_INT8_MODE, DEFAULT_INT4, DEFAULT_ONNX): ``ConvertSettings()`` converts as the convert stage
    does; the stage reads its params.yaml (`from_params`)."""

    openvino_int8_mode: str = DEFAULT_OV_INT8_MODE
    openvino_int4_mode: str = DEFAULT_INT4[0]
    openvino_int4_group_size: int = DEFAULT_INT4[1]
    # Keyword arguments of quantize_onnx_int8 per precision and model (convert.onnx.<precision>.<model>).
    onnx: dict[str, dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_ONNX))

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "ConvertSettings":
        """The settings of params ``convert`` (a mapping or OmegaConf node); a key it lacks keeps the default
        (``onnx``: as a whole)."""
        ov = dict(params.get("openvino", {}) or {})
        default = cls()
        onnx = _plain(params.get("onnx"))
        return cls(openvino_int8_mode=str(ov.get("int8_mode", default.openvino_int8_mode)),
                   openvino_int4_mode=str(ov.get("int4_mode", default.openvino_int4_mode)),
                   openvino_int4_group_size=int(ov.get("int4_group_size", default.openvino_int4_group_size)),
                   onnx=default.onnx if onnx is None else {str(p): dict(models or {}) for p, models in dict(onnx).items()})


def _plain(v: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(v):
            return OmegaConf.to_container(v, resolve=True)
    except ImportError:
        pass
    return v


# --- the conversions that registry.TARGETS names ------------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _onnx_out(src: Path, dst_dir: Path, model: str) -> Path:
    """An ONNX Runtime target's model file: the model's registry name, whichever export file it came from
    (the LM's fused graph, export/lm_fused.py, is converted into soprano_lm_step.onnx)."""
    return dst_dir / f"{MODELS[model].file}{src.suffix}"


def link_export(src: Path, dst_dir: Path, model: str, precision: Precision, settings: ConvertSettings) -> dict[str, Any]:
    """ONNX fp32: the export itself (a hard link, else a copy)."""
    out = _onnx_out(src, dst_dir, model)
    _link_or_copy(src, out)
    return {"method": "none: the fp32 export itself (hard link)", "file": out.name}


def onnx_quantized(src: Path, dst_dir: Path, model: str, precision: Precision, settings: ConvertSettings) -> dict[str, Any]:
    """ONNX with quantised weights for ONNX Runtime (pipeline_lib.quantize_ort), with the settings of
    params convert.onnx.<precision>.<model>."""
    from pipeline_lib.quantize_ort import quantize_onnx_int8

    weights = precision.weights(model)
    if weights not in ("int8", "int4"):
        raise ValueError(f"onnx_quantized: {model} weights {weights!r}; quantize_ort writes int8 or int4")
    kwargs = dict((settings.onnx.get(precision.name) or {}).get(model) or {})
    bits = int(kwargs.get("bits", 8)) if kwargs.get("method") == "matmul_nbits" else 8
    if bits != int(weights[3:]):
        raise ValueError(f"params convert.onnx.{precision.name}.{model} ({kwargs}) write {bits}-bit weights, but "
                         f"precision {precision.name} stores {model} weights as {weights}")
    out = quantize_onnx_int8(src, _onnx_out(src, dst_dir, model), **kwargs)
    return {"method": "onnxruntime.quantization", "settings": kwargs, "file": out.name}


def _ov_method(weight_format: str, settings: ConvertSettings) -> str:
    if weight_format == "fp32":
        return "save_model(compress_to_fp16=False)"
    if weight_format == "int4":
        return (f"nncf.compress_weights mode={settings.openvino_int4_mode} group_size={settings.openvino_int4_group_size} "
                "ratio=1.0 (data-free; embedding and logits head int8)")
    return f"nncf.compress_weights mode={settings.openvino_int8_mode} (per-channel int8 weights)"


def _int4(settings: ConvertSettings) -> tuple[str, int]:
    return settings.openvino_int4_mode, int(settings.openvino_int4_group_size)


def openvino_ir(src: Path, dst_dir: Path, model: str, precision: Precision, settings: ConvertSettings) -> dict[str, Any]:
    """OpenVINO IR of the exported ONNX model, weights in the precision's format for this model."""
    weights = precision.weights(model)
    out = convert_onnx_to_openvino(src, dst_dir / f"{src.stem}.xml", weight_format=weights,
                                   int8_mode=settings.openvino_int8_mode, int4=_int4(settings))
    method = _ov_method(weights, settings)
    return {"file": out.name, "weights_file": out.with_suffix(".bin").name,
            "method": ("openvino.convert_model + " if weights == "fp32" else "") + method,
            "inference_precision_hint": precision.inference}


def openvino_stateful_ir(ckpt_dir: Path, dst_dir: Path, precision: Precision, settings: ConvertSettings) -> dict[str, Any]:
    """The stateful LM (pipeline_lib.openvino_stateful), converted from the checkpoint, LM weights in the
    precision's format."""
    weights = precision.lm_weights
    xml = convert_lm_to_openvino_stateful(ckpt_dir, dst_dir / f"{STATEFUL_FILE}.xml", weights, settings.openvino_int8_mode,
                                          _int4(settings))
    # the checkpoint's folder name, not its path: the record must not depend on where the build ran
    return {"source": f"{Path(ckpt_dir).name}/model.safetensors", "file": xml.name, "weights_file": xml.with_suffix(".bin").name,
            "method": "openvino.convert_model (PyTorch, SDPA) + make_stateful + " + _ov_method(weights, settings),
            "inference_precision_hint": precision.inference}


def _files(info: Mapping[str, Any], folder: Path) -> list[Path]:
    return [folder / info["file"]] + ([folder / info["weights_file"]] if "weights_file" in info else [])


EXPORT_HOW = "export it first: soprano-onnx export --checkpoint CKPT --out DIR, or dvc repro export_lm export_decoder"


@dataclass
class ExportModel:
    """One model of an export folder, as `read_export` found it: its folder, its parsed JSON config and the
    fp32 ONNX file that the config names."""

    dir: Path
    config_path: Path
    config: dict[str, Any]
    src: Path
    # The file ONNX Runtime targets are converted from: the config's "ort_file" (the LM's fused graph,
    # export/lm_fused.py) where it names one, else src.
    ort_src: Path


def read_export(lm_dir: Path | str, decoder_dir: Path | str) -> dict[str, ExportModel]:
    """The two exported models (registry.MODELS order: LM_DIR, DECODER_DIR) that a conversion reads, checked
    without converting anything: each folder holds its JSON config, the config names an fp32 ONNX file
    (not one that is already converted) that is there, and the LM folder carries the tokenizer. A
    ModelFileError names the first missing or wrong file and how to make it. The two folders may be one
    (a flat export folder)."""
    sources = {LM_DIR: Path(lm_dir), registry.DECODER_DIR: Path(decoder_dir)}
    found: dict[str, ExportModel] = {}
    for which, spec in MODELS.items():
        src_dir = sources[which]
        cfg_path = src_dir / spec.config
        if not cfg_path.is_file():
            raise ModelFileError(f"{cfg_path}: export config not found, so {src_dir} holds no exported {which}; "
                                 f"{EXPORT_HOW}.")
        try:
            cfg = json.loads(cfg_path.read_text())
            block = spec.block(cfg)
            name = block["file"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(f"{cfg_path}: not an export config (no model file named in it: {exc!r}); "
                                 f"{EXPORT_HOW}.") from exc
        src = src_dir / name
        done = block.get("conversion") or {}
        if src.suffix != ".onnx" or done.get("precision", "fp32") != "fp32":
            raise ModelFileError(f"{cfg_path}: names {name}, a model already converted ({done.get('backend', src.suffix)} "
                                 f"{done.get('precision', '')}); convert from the fp32 ONNX export instead "
                                 "(the folder `soprano-onnx export` wrote, or artifacts/export).")
        if not src.is_file():
            raise ModelFileError(f"{src}: the ONNX model named by {cfg_path.name} is missing; re-run the export "
                                 f"({EXPORT_HOW}).")
        ort_src = src_dir / block["ort_file"] if block.get("ort_file") else src
        if not ort_src.is_file():
            raise ModelFileError(f"{ort_src}: the ONNX Runtime graph named by {cfg_path.name} (ort_file) is missing; "
                                 f"re-run the export ({EXPORT_HOW}).")
        for extra in spec.extra_files:
            if extra == registry.TOKENIZER_FILE and not (src_dir / extra).is_file():
                raise ModelFileError(f"{src_dir / extra}: not found; the LM folder must carry the tokenizer "
                                     f"({EXPORT_HOW}).")
        found[which] = ExportModel(src_dir, cfg_path, cfg, src, ort_src)
    return found


def convert_target(
    backend: str,
    precision: str,
    decoder_dir: Path | str,
    lm_dir: Path | str,
    out_dir: Path | str,
    settings: ConvertSettings | None = None,
    checkpoint_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Build ``out_dir/{lm,decoder}`` for one target (registry.TARGETS) from the export folders; return
    its figures (`convert_into`). The two folders (the convert stage's outs) are built in a temporary folder
    and replace the old ones only once both are complete; anything else in ``out_dir`` (the certificate,
    parity_convert's out) is left alone."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Files keep the modes their writers gave them (no chmod: onnx fp32's are hard links to the export's,
    # which DVC's cache may share and keeps read-only).
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.convert-", dir=out_dir.parent))
    try:
        figures = convert_into(backend, precision, decoder_dir, lm_dir, tmp, settings, checkpoint_dir)
        out_dir.mkdir(exist_ok=True)  # only now: a failed conversion leaves no folder behind
        for which in MODELS:
            if (out_dir / which).exists():
                shutil.rmtree(out_dir / which)
            os.replace(tmp / which, out_dir / which)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


def convert_into(
    backend: str,
    precision: str,
    decoder_dir: Path | str,
    lm_dir: Path | str,
    folder: Path | str,
    settings: ConvertSettings | None = None,
    checkpoint_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Write one target (registry.TARGETS: its converter, registry.target(...).converter()) into ``folder``
    (which exists and holds no lm/ or decoder/): ``folder/{lm,decoder}`` each get the converted model, the
    export's JSON config (``file`` pointing at the converted model, a ``conversion`` record beside it) and,
    for the LM, the tokenizer files. Returns the figures: per model (``lm``, ``decoder``) seconds, bytes
    and source_bytes.

    For a backend with a stateful LM (OpenVINO) and ``checkpoint_dir``, the LM folder also gets the
    stateful LM, converted from the checkpoint, with its own config; the runtime prefers it (figures key
    ``lm_stateful``). Without ``checkpoint_dir`` the LM folder holds the step model only.

    The target, the checkpoint folder and the export (`read_export`) are checked before anything is
    converted. ``folder`` is not cleaned up on failure: callers write into a temporary folder
    (`convert_target`: a temporary sibling folder; `soprano-onnx convert`: fsutil.atomic_files).
    """
    target = registry.target(backend, precision)
    prec = registry.precision(precision)
    stateful = target.stateful_converter() if checkpoint_dir is not None else None
    if stateful is not None and not (Path(checkpoint_dir) / "config.json").is_file():
        raise ModelFileError(f"{checkpoint_dir}: not a checkpoint folder (no config.json); the stateful {backend} LM "
                             "is converted from the checkpoint: run the fetch stage first (dvc repro fetch).")
    settings = settings or ConvertSettings()
    convert = target.converter()
    export = read_export(lm_dir, decoder_dir)
    folder = Path(folder)
    figures: dict[str, Any] = {}
    for which, spec in MODELS.items():
        src_dir, cfg = export[which].dir, export[which].config
        src = export[which].ort_src if target.backend == "onnx" else export[which].src
        dst = folder / which
        dst.mkdir()
        log.info("%s %s: converting %s", which, target.label, src)
        start = time.perf_counter()
        info = {"backend": backend, "precision": precision, "source": src.name,
                **convert(src, dst, which, prec, settings)}
        seconds = round(time.perf_counter() - start, 3)
        info["bytes"] = sum(f.stat().st_size for f in _files(info, dst))
        info["source_bytes"] = src.stat().st_size
        block = spec.block(cfg)
        block["file"], block["conversion"] = info["file"], info  # inputs and settings only: no time (figures)
        # A converted folder holds one model file per model; converted from the fused graph, its interface.
        iface = block.pop("ort_interface", None)
        if block.pop("ort_file", None) and iface and target.backend == "onnx":
            block.update(iface)
        write_json(dst / spec.config, cfg)
        for name in spec.extra_files:
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, dst / name)
        log.info("%s %s: %.1f MB -> %.1f MB in %.1f s", which, target.label, info["source_bytes"] / 1e6,
                 info["bytes"] / 1e6, seconds)
        figures[which] = {"seconds": seconds, "bytes": info["bytes"], "source_bytes": info["source_bytes"]}
        if which == LM_DIR and stateful is not None:
            figures["lm_stateful"] = _convert_stateful(stateful, Path(checkpoint_dir), dst, target, prec, settings, cfg)
    return figures


def _convert_stateful(convert: Any, ckpt_dir: Path, dst: Path, target: registry.Target, precision: Precision,
                      settings: ConvertSettings, step_cfg: dict) -> dict:
    start = time.perf_counter()
    log.info("lm %s: converting the stateful LM from %s", target.label, ckpt_dir)
    info = {"backend": target.backend, "precision": target.precision, **convert(ckpt_dir, dst, precision, settings)}
    seconds = round(time.perf_counter() - start, 3)
    info["bytes"] = sum(f.stat().st_size for f in _files(info, dst))
    info["source_bytes"] = (ckpt_dir / "model.safetensors").stat().st_size
    write_json(dst / STATEFUL_CONFIG, stateful_config(step_cfg, info))
    log.info("lm stateful %s: %.1f MB in %.1f s", target.label, info["bytes"] / 1e6, seconds)
    return {"seconds": seconds, "bytes": info["bytes"], "source_bytes": info["source_bytes"]}

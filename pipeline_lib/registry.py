"""The names that the model factory and the runtime share: backends, precisions, targets (a backend x
precision and the conversion that builds it), artifact folders and file names.

A leaf: it imports the standard library and pipeline_lib.errors only, so that the runtime, the stages,
the benchmark and the params check all read it without loading torch, onnxruntime or openvino. A
target names its conversion as "module:function", imported when the convert stage calls it.

    artifacts/export/{lm,decoder}/               the export stages' folders (= target onnx-fp32)
    artifacts/<backend>/<precision>/lm/          LM_FILE (+ STATEFUL_FILE where the backend has one), its
                                                 config, the tokenizer files
    artifacts/<backend>/<precision>/decoder/     DECODER_FILE and its ISTFT config

How to add a backend or a precision: docs/design.md, "The registry".
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline_lib.errors import InputError

# --- file names (stems: a model is <stem>.onnx, or an OpenVINO IR <stem>.xml + <stem>.bin) -----------------

LM_FILE = "soprano_lm_step"                # the LM step model: the KV cache as inputs and outputs
FUSED_FILE = "soprano_lm_fused"           # the same step model as ONNX Runtime's fused graph (export/lm_fused.py)
STATEFUL_FILE = "soprano_lm_stateful"      # the LM with its KV cache in the backend's state (OpenVINO)
DECODER_FILE = "soprano_decoder_preistft"  # the decoder up to its spectrum (no ISTFT inside)
LM_CONFIG_SUFFIX = "_config.json"
DECODER_CONFIG_SUFFIX = "_istft_config.json"
LM_CONFIG = LM_FILE + LM_CONFIG_SUFFIX
STATEFUL_CONFIG = STATEFUL_FILE + LM_CONFIG_SUFFIX
DECODER_CONFIG = DECODER_FILE + DECODER_CONFIG_SUFFIX
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
# The LM config's "kv_cache": where the cache lives between calls.
KV_CACHE_INPUTS = "inputs"           # the caller's arrays: past_* in, new_* out (the step model)
KV_CACHE_STATE = "openvino_state"    # OpenVINO state variables (the stateful LM)
# Buffers the model appends to in place (present_* alias past_*; the fused ONNX Runtime graph, export/lm_fused.py)
KV_CACHE_BUFFER = "buffer"

# --- folders ---------------------------------------------------------------------------------------------

ARTIFACTS = Path("artifacts")
EXPORT_DIR = ARTIFACTS / "export"
LM_DIR, DECODER_DIR = "lm", "decoder"


@dataclass(frozen=True)
class Model:
    """One of the two exported models: its folder in an export or target, its file stem, its JSON config,
    the files that travel with it, and the config block that names its model file ("file")."""

    dir: str
    file: str
    config: str
    extra_files: tuple[str, ...] = ()
    file_block: tuple[str, ...] = ()  # keys from the config's top level to the block holding "file"

    def block(self, config: dict) -> dict:
        """The block of a parsed config that names the model file (and holds its "conversion" record)."""
        for key in self.file_block:
            config = config[key]
        return config


MODELS: dict[str, Model] = {
    LM_DIR: Model(LM_DIR, LM_FILE, LM_CONFIG, TOKENIZER_FILES),
    # The decoder's config is read strictly by IstftConfig, which skips its "onnx" and "decoder" blocks:
    # the model file (and how it was converted) is described inside "onnx".
    DECODER_DIR: Model(DECODER_DIR, DECODER_FILE, DECODER_CONFIG, (), ("onnx",)),
}


# --- backends ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """An inference backend. `name`: the pipeline's (artifacts/<name>/, convert@<name>-..., benchmark rows,
    conf/); `runtime`: SopranoTTS(backend=...) and `--backend` of the CLI; `suffix`: the model files its
    targets hold; `stateful_lm`: its LM folders also hold STATEFUL_FILE."""

    name: str
    runtime: str
    display: str
    suffix: str
    aliases: tuple[str, ...] = ()
    stateful_lm: bool = False


_BACKENDS = {b.name: b for b in (
    Backend("onnx", "onnx_cpu", "ONNX Runtime", ".onnx", aliases=("ort", "onnxruntime")),
    Backend("openvino", "openvino_cpu", "OpenVINO", ".xml", aliases=("ov",), stateful_lm=True),
)}
BACKENDS = tuple(_BACKENDS)                                 # pipeline names
RUNTIME_BACKENDS = tuple(b.runtime for b in _BACKENDS.values())
# The benchmark's references beside the backends (each in its own process; no artifacts of their own).
REFERENCES = {"torch": "PyTorch reference", "upstream": "upstream soprano-tts"}
BENCH_BACKENDS = (*BACKENDS, *REFERENCES)
DISPLAY_NAMES = {**{b.name: b.display for b in _BACKENDS.values()}, **REFERENCES}
# `--backend` of the CLI (speak, serve): pipeline or runtime name -> runtime name.
BACKEND_CHOICES = {n: b.runtime for b in _BACKENDS.values() for n in (b.name, b.runtime)}


def backend(name: str) -> Backend:
    """The backend of a pipeline name, runtime name or alias (case and spaces ignored); an InputError
    naming the choices otherwise."""
    if isinstance(name, str):
        key = name.strip().lower()
        for b in _BACKENDS.values():
            if key in (b.name, b.runtime, *b.aliases):
                return b
    raise InputError(f"unknown backend {name!r}: choose one of {', '.join(RUNTIME_BACKENDS)} "
                     f"(or {', '.join(BACKENDS)}; aliases: {', '.join(a for b in _BACKENDS.values() for a in b.aliases)})")


def normalize_backend(name: str) -> str:
    """The runtime name ("onnx_cpu", "openvino_cpu") of any name `backend` accepts."""
    return backend(name).runtime


# --- precisions --------------------------------------------------------------------------------------------

PARITY_REFERENCE = "reference"  # checked against the torch reference, the export's checks (ParityThresholds)
PARITY_QUANTIZED = "quantized"  # checked against the fp32 export (QuantParityThresholds)


@dataclass(frozen=True)
class Precision:
    """What a target's precision means. `lm_weights` / `decoder_weights`: how its conversion stores each
    model's weights (the two may differ); `inference`: the element type OpenVINO computes in
    (INFERENCE_PRECISION_HINT, a compile setting: a precision may differ from fp32 by this alone);
    `parity`: PARITY_REFERENCE or PARITY_QUANTIZED, with the limits in params parity.convert_<name>."""

    name: str
    lm_weights: str
    decoder_weights: str
    inference: str = "f32"
    parity: str = PARITY_REFERENCE

    def weights(self, model: str) -> str:
        """The weight format of model LM_DIR or DECODER_DIR."""
        return {LM_DIR: self.lm_weights, DECODER_DIR: self.decoder_weights}[model]

    @property
    def parity_key(self) -> str:
        """The key of this precision's limits under params `parity` (conf/parity/default.yaml)."""
        return f"convert_{self.name}"


_PRECISIONS = {p.name: p for p in (
    Precision("fp32", "fp32", "fp32"),
    Precision("int8", "int8", "int8", parity=PARITY_QUANTIZED),
    # The fp32 IR computed in bf16 (OpenVINO CPU, INFERENCE_PRECISION_HINT): needs AVX512-BF16 or AMX-BF16
    # (pipeline_lib.cpuinfo.BF16_FEATURES); checked against fp32 like a quantised precision.
    Precision("bf16", "fp32", "fp32", inference="bf16", parity=PARITY_QUANTIZED),
    # 4-bit grouped LM weights (ONNX Runtime MatMulNBits, OpenVINO NNCF int4); the decoder keeps int8
    # (conf/convert says why).
    Precision("int4", "int4", "int8", parity=PARITY_QUANTIZED),
)}
PRECISIONS = tuple(_PRECISIONS)


def precision(name: str) -> Precision:
    if name not in _PRECISIONS:
        raise InputError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    return _PRECISIONS[name]


# --- targets: backend x precision, and the conversion that builds each -------------------------------------


def _load(ref: str) -> Callable[..., Any]:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Target:
    """One convert stage (convert@<backend>-<precision>) and its folder. `convert`: "module:function" that
    converts one exported ONNX model, called as function(src, dst_dir, model, precision, settings) -> the
    config's "conversion" record (at least "file" and "method"); `convert_stateful` (backends with
    stateful_lm): function(checkpoint_dir, dst_dir, precision, settings) -> the stateful LM's record.
    `older_folders`: earlier layouts that the benchmark still reads."""

    backend: str
    precision: str
    convert: str
    convert_stateful: str | None = None
    older_folders: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.backend}-{self.precision}"

    @property
    def folder(self) -> Path:
        """The convert stage's out, relative to the repository root."""
        return ARTIFACTS / self.backend / self.precision

    def converter(self) -> Callable[..., dict]:
        return _load(self.convert)

    def stateful_converter(self) -> Callable[..., dict] | None:
        return _load(self.convert_stateful) if self.convert_stateful else None


_CONVERT = "pipeline_lib.convert"
TARGETS: dict[tuple[str, str], Target] = {(t.backend, t.precision): t for t in (
    Target("onnx", "fp32", f"{_CONVERT}:link_export"),
    Target("onnx", "int8", f"{_CONVERT}:onnx_quantized", older_folders=("artifacts/onnx_int8",)),
    Target("openvino", "fp32", f"{_CONVERT}:openvino_ir", f"{_CONVERT}:openvino_stateful_ir"),
    Target("openvino", "int8", f"{_CONVERT}:openvino_ir", f"{_CONVERT}:openvino_stateful_ir"),
    Target("openvino", "bf16", f"{_CONVERT}:openvino_ir", f"{_CONVERT}:openvino_stateful_ir"),
    Target("onnx", "int4", f"{_CONVERT}:onnx_quantized"),
    Target("openvino", "int4", f"{_CONVERT}:openvino_ir", f"{_CONVERT}:openvino_stateful_ir"),
)}
# The export stages' folders hold this target's models (its convert stage hard-links them).
EXPORT_TARGET = ("onnx", "fp32")


def target(backend_name: str, precision_name: str) -> Target:
    t = TARGETS.get((backend_name, precision_name))
    if t is None:
        raise InputError(f"unknown target {backend_name}/{precision_name}: the targets are "
                         f"{', '.join(t.label for t in TARGETS.values())} (backends {', '.join(BACKENDS)}, "
                         f"precisions {', '.join(PRECISIONS)})")
    return t


def target_labels(backends: Any = BACKENDS, precisions: Any = PRECISIONS) -> list[str]:
    """"<backend>-<precision>" of every registered target within backends x precisions, in that order:
    the convert / parity_convert stages (params convert.targets, dvc.yaml foreach)."""
    return [f"{b}-{p}" for b in backends for p in precisions if (b, p) in TARGETS]


def model_folders(backend_name: str, precision_name: str) -> tuple[Path, ...]:
    """Base folders (each with lm/ and decoder/) holding a target's models, in the order to look in:
    the export's for EXPORT_TARGET, then the target's own folder, then its older layouts."""
    t = target(backend_name, precision_name)
    export = (EXPORT_DIR,) if (t.backend, t.precision) == EXPORT_TARGET else ()
    return (*export, t.folder, *(Path(p) for p in t.older_folders))


# --- choices: which target each model comes from -------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The LM of target `lm` with the decoder of target `decoder` (the two may differ in backend and
    precision, e.g. an ONNX Runtime int4 LM with an OpenVINO bf16 decoder). `label`: the target's label
    when both are one target ("onnx-int8"), else "<lm label>+<decoder label>" ("onnx-int4+openvino-bf16")."""

    lm: Target
    decoder: Target

    @property
    def label(self) -> str:
        return self.lm.label if self.lm == self.decoder else f"{self.lm.label}+{self.decoder.label}"

    @property
    def backend(self) -> str:
        """The pipeline backend name(s) for tables: "onnx", or "onnx+openvino" for a mixed pair."""
        return self.lm.backend if self.lm.backend == self.decoder.backend else f"{self.lm.backend}+{self.decoder.backend}"

    @property
    def precision(self) -> str:
        """"int8", or "int4+bf16" where the two models' precisions differ."""
        return self.lm.precision if self.lm.precision == self.decoder.precision else f"{self.lm.precision}+{self.decoder.precision}"

    @property
    def targets(self) -> tuple[Target, ...]:
        return (self.lm,) if self.lm == self.decoder else (self.lm, self.decoder)


def _target_of_label(label: str, what: str) -> Target:
    for t in TARGETS.values():
        if t.label == label.strip().lower():
            return t
    raise InputError(f"{what} {label!r} is not a target: choose one of {', '.join(t.label for t in TARGETS.values())}, "
                     "or a pair LM+DECODER such as onnx-int4+openvino-bf16")


def choice(spec: str | Choice) -> Choice:
    """A Choice from "<backend>-<precision>" (both models of that target) or "<lm target>+<decoder target>";
    an InputError naming the targets otherwise."""
    if isinstance(spec, Choice):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"model choice {spec!r}: expected a target such as onnx-int8, or LM+DECODER such as "
                         "onnx-int4+openvino-bf16")
    parts = spec.split("+")
    if len(parts) > 2:
        raise InputError(f"model choice {spec!r}: at most two targets, LM+DECODER")
    lm = _target_of_label(parts[0], "LM target" if len(parts) == 2 else "target")
    dec = _target_of_label(parts[1], "decoder target") if len(parts) == 2 else lm
    return Choice(lm, dec)


def folders_under(root: str | Path, backend_name: str, precision_name: str) -> tuple[Path, ...]:
    """model_folders of a target, under `root` instead of artifacts/ (root: the artifacts/ folder after
    `dvc repro`, or any folder laid out like it, e.g. by `soprano-onnx convert --out ROOT/<backend>/<precision>`)."""
    out = []
    for p in model_folders(backend_name, precision_name):
        rel = p.relative_to(ARTIFACTS) if p.is_relative_to(ARTIFACTS) else p
        out.append(Path(root) / rel)
    return tuple(out)


def model_dir_under(root: str | Path, backend_name: str, precision_name: str, model: str) -> Path | None:
    """The folder holding `model` (LM_DIR or DECODER_DIR) of a target under `root`: the first of
    folders_under that has it; None where none does."""
    for base in folders_under(root, backend_name, precision_name):
        if (base / model / f"{MODELS[model].file}{backend(backend_name).suffix}").is_file() or \
                (base / model / f"{MODELS[model].file}.onnx").is_file():
            return base / model
    return None

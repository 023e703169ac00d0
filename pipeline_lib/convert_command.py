"""`soprano-onnx convert`: an export folder -> one target's self-contained runtime folder, outside DVC.

    soprano-onnx convert --export DIR --backend onnx|openvino --precision P --out OUT [--checkpoint CKPT | --no-stateful]

The contract:

- Input: ``--export`` is a flat export folder (what ``soprano-onnx export --out DIR`` writes: both fp32 ONNX
  models, their JSON configs and the tokenizer files side by side) or a pipeline folder with ``lm/`` and
  ``decoder/`` subfolders (artifacts/export). Which one: the rule of SopranoTTS.from_dir (both subfolders
  there: the pipeline layout).
- Output: ``OUT/lm`` and ``OUT/decoder``, laid out exactly as the convert stage's
  artifacts/<backend>/<precision>/, so that ``SopranoTTS.from_dir(OUT, backend=...)`` loads it. The target
  (``--backend`` x ``--precision``) is one of pipeline_lib.registry.TARGETS and is built by the stage's own
  code (pipeline_lib.convert.convert_into, with the target's converter) with ``ConvertSettings()``: the
  values of conf/convert/default.yaml.
- OpenVINO: with ``--checkpoint`` (the checkpoint the export was made from) the LM folder also gets the
  stateful LM, which from_dir prefers; without it, the step IR only, and a note says so (``--no-stateful``:
  the same without the note).
- Nothing lost: only the files the conversion writes are replaced in OUT, each with a rename, all of them
  once the whole conversion has succeeded (fsutil.atomic_files); other files in OUT stay as they were, and
  a failed conversion leaves OUT as it was.
- Bad input is an ``error: ...`` (exit 2) before any conversion starts: an unknown backend, precision or
  target, a missing or incomplete export folder, an --out that cannot be written or lies in the export,
  a --checkpoint that is not the export's, OUT holding model files of another conversion that this one
  would not replace (a mixed folder would load the wrong model), a missing package.

Module level imports nothing heavy: the CLI's parser imports every subcommand's module (pipeline_lib.cli).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from pipeline_lib import registry
from pipeline_lib.errors import CheckpointError, InputError, MissingBackendError, ModelFileError

log = logging.getLogger("pipeline_lib.convert_command")

EXPORT_INSTALL = "pip install 'soprano-onnx[export]'"
IR_WEIGHTS = ".bin"  # an OpenVINO IR's weights, beside its .xml


def _targets() -> str:
    return ", ".join(t.label for t in registry.TARGETS.values())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--export", required=True, type=Path, metavar="DIR",
                   help="export folder: flat (soprano-onnx export --out DIR) or with lm/ and decoder/ (artifacts/export)")
    p.add_argument("--backend", required=True, metavar="{" + ",".join(registry.BACKENDS) + "}",
                   help=f"{' or '.join(registry.BACKENDS)} (or {', '.join(registry.RUNTIME_BACKENDS)})")
    p.add_argument("--precision", required=True, metavar="{" + ",".join(registry.PRECISIONS) + "}",
                   help=f"one of {', '.join(registry.PRECISIONS)}; the targets: {_targets()}")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder: gets lm/ and decoder/ as artifacts/<backend>/<precision>/; "
                        "other files in it are kept")
    stateful = p.add_mutually_exclusive_group()
    stateful.add_argument("--checkpoint", type=Path, metavar="DIR",
                          help="openvino: the checkpoint folder the export was made from; the stateful LM (what from_dir "
                               "prefers) is converted from it")
    stateful.add_argument("--no-stateful", action="store_true",
                          help="openvino: write the step IR only, without the note that says so")


def resolve_target(backend_name: str, precision_name: str) -> registry.Target:
    """The registry target of ``--backend`` (any name or alias registry.backend accepts) and ``--precision``;
    an InputError that lists the targets otherwise."""
    try:
        b = registry.backend(backend_name)
        registry.precision(precision_name)
    except InputError as exc:
        raise InputError(f"{exc}; the targets (--backend B --precision P) are {_targets()}") from exc
    return registry.target(b.name, precision_name)


def export_folders(export: Path) -> tuple[Path, Path]:
    """(lm folder, decoder folder) of an export folder: its lm/ and decoder/ where it has both (a pipeline
    folder), else the folder itself for both (a flat one). A folder that is not there is an InputError."""
    if not export.is_dir():
        found = "is a file" if export.exists() else "does not exist"
        raise InputError(f"--export {export}: {found}; give the folder `soprano-onnx export --out DIR` wrote "
                         "(or artifacts/export after dvc repro)")
    lm, dec = export / registry.LM_DIR, export / registry.DECODER_DIR
    return (lm, dec) if lm.is_dir() and dec.is_dir() else (export, export)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out(out: Path, export: Path, sources: tuple[Path, ...]) -> None:
    """InputError unless OUT can take the conversion: writable (or creatable), not the export folder or
    inside it, its lm/ and decoder/ folders (where present) writable folders that are not the export's."""
    from pipeline_lib.fsutil import check_output_dir

    check_output_dir(out, "--out")
    out_r, export_r = Path(os.path.abspath(out)).resolve(), export.resolve()
    if _is_within(out_r, export_r):
        where = "is the export folder" if out_r == export_r else f"is inside the export folder {export}"
        raise InputError(f"--out {out}: {where}; write the conversion to a folder outside it, e.g. "
                         f"--out {export.parent / 'converted'}")
    for sub in (registry.LM_DIR, registry.DECODER_DIR):
        if (out_r / sub).resolve() in {s.resolve() for s in sources}:
            raise InputError(f"--out {out}: its {sub}/ is the export's folder, whose files the conversion would replace; "
                             "choose another --out")
        check_output_dir(out / sub, f"--out {out}: subfolder")


def planned_files(target: registry.Target, stateful: bool, lm_dir: Path) -> dict[str, set[str]]:
    """The model files and configs that the conversion writes in OUT/lm and OUT/decoder (the converters keep
    the export's stems; OpenVINO IR: .xml + .bin), plus the tokenizer files the export has."""
    suffix = registry.backend(target.backend).suffix
    ir = (IR_WEIGHTS,) if suffix != ".onnx" else ()
    out: dict[str, set[str]] = {}
    for which, spec in registry.MODELS.items():
        stems = [spec.file] + ([registry.STATEFUL_FILE] if which == registry.LM_DIR and stateful else [])
        names = {stem + s for stem in stems for s in (suffix, *ir)} | {spec.config}
        names |= {n for n in spec.extra_files if which == registry.LM_DIR and (lm_dir / n).is_file()}
        out[which] = names | ({registry.STATEFUL_CONFIG} if which == registry.LM_DIR and stateful else set())
    return out


def check_no_other_conversion(out: Path, planned: dict[str, set[str]], target: registry.Target) -> None:
    """InputError when OUT/lm or OUT/decoder hold model files (or the stateful LM's config) that this
    conversion (``planned``: `planned_files`) would not replace: left beside the new ones they would be
    loaded instead (from_dir prefers a stateful LM and IR files) or mixed with them."""
    suffixes = {b.suffix for b in (registry.backend(n) for n in registry.BACKENDS)} | {IR_WEIGHTS}
    stale = []
    for which, spec in registry.MODELS.items():
        stems = (spec.file, registry.STATEFUL_FILE) if which == registry.LM_DIR else (spec.file,)
        names = {stem + s for stem in stems for s in suffixes}
        names |= {registry.STATEFUL_CONFIG} if which == registry.LM_DIR else set()
        stale += [out / which / n for n in sorted(names - planned[which]) if (out / which / n).exists()]
    if stale:
        only_stateful = all(p.name.startswith(registry.STATEFUL_FILE) for p in stale)
        also = (" (or pass --checkpoint, which replaces the stateful LM)"
                if only_stateful and registry.backend(target.backend).stateful_lm else "")
        raise InputError(f"--out {out}: holds model files of another conversion that this one would not replace "
                         f"({', '.join(map(str, stale))}); a folder mixing two conversions loads the wrong model. "
                         f"Remove those files{also}, or choose another --out")


def check_checkpoint(ckpt: Path, lm_config: dict) -> None:
    """CheckpointError unless ``ckpt`` is a valid checkpoint folder whose LM has the export's shapes (the
    stateful LM is converted from it and runs with the export's tokenizer and decoder)."""
    from pipeline_lib.checkpoint_checks import validate_checkpoint

    if not ckpt.is_dir():
        raise CheckpointError(f"--checkpoint {ckpt}: {'is a file' if ckpt.exists() else 'does not exist'}; give the "
                              "checkpoint folder the export was made from (e.g. artifacts/checkpoints/<name>), or leave "
                              "--checkpoint out (step IR only)")
    try:
        info = validate_checkpoint(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"--checkpoint: {exc}") from exc
    pairs = {"num_layers": info.num_layers, "hidden_size": info.hidden_size, "num_kv_heads": info.num_kv_heads,
             "head_dim": info.head_dim, "vocab_size": info.vocab_size}
    differ = {k: (v, lm_config.get(k)) for k, v in pairs.items() if v != lm_config.get(k)}
    if differ:
        listing = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items())
        raise CheckpointError(f"--checkpoint {ckpt}: not the checkpoint the export was made from (checkpoint vs export: "
                              f"{listing}); give that checkpoint, or leave --checkpoint out (step IR only)")


def check_packages(target: registry.Target, stateful: bool) -> None:
    """MissingBackendError naming the install command unless the packages the conversion imports are there."""
    from pipeline_lib.convert import import_nncf
    from pipeline_lib.openvino_ir import import_openvino

    prec = registry.precision(target.precision)
    quantized = any(prec.weights(m) != "fp32" for m in registry.MODELS)
    if target.backend == "openvino":
        import_openvino("soprano-onnx convert --backend openvino")
        if quantized:
            import_nncf()
    elif quantized:
        try:
            import onnx  # noqa: F401
            import onnxruntime.quantization  # noqa: F401
        except ImportError as exc:
            raise MissingBackendError(f"quantising ONNX needs {exc.name}: {EXPORT_INSTALL}") from exc
    if stateful:
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise MissingBackendError(f"the stateful LM (--checkpoint) is converted from PyTorch: {EXPORT_INSTALL}") from exc


def run(args: argparse.Namespace) -> int:
    import json

    from pipeline_lib.convert import ConvertSettings, convert_into, read_export
    from pipeline_lib.fsutil import atomic_files

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    # Every check before the conversion: nothing below the `atomic_files` line starts unless all pass.
    target = resolve_target(args.backend, args.precision)
    backend = registry.backend(target.backend)
    if args.checkpoint is not None and not backend.stateful_lm:
        raise InputError(f"--checkpoint: only {', '.join(b for b in registry.BACKENDS if registry.backend(b).stateful_lm)} "
                         f"converts a stateful LM from the checkpoint; {target.backend} converts the export alone: "
                         "leave --checkpoint out")
    stateful = args.checkpoint is not None
    lm_dir, dec_dir = export_folders(args.export)
    try:
        export = read_export(lm_dir, dec_dir)
    except ModelFileError as exc:
        raise ModelFileError(f"--export {args.export}: {exc}") from exc
    check_out(args.out, args.export, (lm_dir, dec_dir))
    planned = planned_files(target, stateful, lm_dir)
    check_no_other_conversion(Path(args.out), planned, target)
    check_packages(target, stateful)
    if stateful:
        check_checkpoint(args.checkpoint, export[registry.LM_DIR].config)
    settings = ConvertSettings()  # conf/convert/default.yaml's values
    layout = "lm/ + decoder/" if lm_dir != dec_dir else "flat"
    log.info("convert %s (%s export) -> %s: target %s, settings of conf/convert/default.yaml", args.export, layout,
             args.out, target.label)
    with atomic_files(args.out) as tmp:
        figures = convert_into(target.backend, target.precision, dec_dir, lm_dir, tmp, settings, args.checkpoint)
    for which, f in figures.items():
        folder = registry.LM_DIR if which.startswith(registry.LM_DIR) else which
        print(f"{which}: {args.out / folder} ({f['source_bytes'] / 1e6:.1f} MB -> {f['bytes'] / 1e6:.1f} MB, "
              f"{f['seconds']:.1f} s)")
    print(f"convert {target.label} done in {time.perf_counter() - start:.1f} s -> {args.out}")
    print(f"load it with SopranoTTS.from_dir({json.dumps(str(args.out))}, backend={json.dumps(backend.runtime)})")
    _notes(args, target, backend, stateful)
    return 0


def _notes(args: argparse.Namespace, target: registry.Target, backend: registry.Backend, stateful: bool) -> None:
    """What the folder holds that a user might not expect: the step IR alone, a bf16 model this CPU refuses."""
    if backend.stateful_lm and not stateful and not args.no_stateful:
        print(f"note: no --checkpoint, so {args.out / registry.LM_DIR} holds the step IR only "
              f"({registry.LM_FILE}{backend.suffix}, KV cache as inputs and outputs), which "
              f"SopranoTTS.from_dir(..., backend={backend.runtime!r}) then uses; for the stateful LM that it prefers "
              f"({registry.STATEFUL_FILE}{backend.suffix}, KV cache in OpenVINO state: faster decode steps) convert "
              "again with --checkpoint DIR, the checkpoint the export was made from (--no-stateful: no note)")
    if registry.precision(target.precision).inference == "bf16":
        from pipeline_lib.cpuinfo import missing_bf16

        why = missing_bf16()
        if why:
            print(f"note: {target.label} is the fp32 IR, computed in bf16 once loaded; {why}, so the runtime refuses "
                  "it on this machine: it runs on a CPU with AVX512-BF16 or AMX-BF16")

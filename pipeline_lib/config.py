"""Hydra composition of conf/ into the params that DVC stages read, and the check of those params.

`python -m pipeline_lib.config [overrides...]` composes conf/, checks the result (`validate_params`)
and only then writes params.yaml: a bad override prints ``error: ...``, exits 2 and leaves the old
params.yaml as it was. Every stage checks params.yaml the same way when it loads it
(`pipeline_lib.stage.load_params`), so params that DVC composes itself (`dvc exp run -S ...`) fail
before any stage work either.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline_lib import registry
from pipeline_lib.errors import InputError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PARAMS_FILE = Path("params.yaml")
GROUPS = ("checkpoint", "export", "parity", "convert", "bench")
# A checkpoint name becomes a folder name (artifacts/checkpoints/<name>) and part of DVC stage paths.
CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _hydra_error(exc: Exception, overrides: Sequence[str], conf_dir: Path) -> InputError:
    """A Hydra / OmegaConf composition error as an InputError naming the override and the choices."""
    from hydra.errors import MissingConfigException, OverrideParseException

    given = " ".join(overrides) or "(no overrides)"
    if isinstance(exc, MissingConfigException) and exc.options is not None and exc.missing_cfg_file:
        group, _, choice = str(exc.missing_cfg_file).rpartition("/")
        return InputError(
            f"{group}={choice}: no such choice in config group {group!r} ({conf_dir / group}/); "
            f"available: {', '.join(exc.options)}. Pick one of those, or add {conf_dir / group / choice}.yaml"
        )
    if isinstance(exc, OverrideParseException):
        return InputError(f"override {exc.override!r} cannot be parsed: {exc.message.splitlines()[0]}; "
                          "the syntax is key=value, e.g. threads=4 or 'bench.threads=[1,4]'")
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return InputError(f"composing {conf_dir}/config.yaml with {given} failed: {message}")


def compose(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """Compose conf/config.yaml with Hydra overrides (as `dvc exp run -S` does) into a plain dict.

    A bad override (unknown key, unknown group choice, bad syntax, broken interpolation) is an
    InputError naming it and, for a group choice, the choices there are. The result is not checked:
    that is `validate_params`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)  # as DVC writes params.yaml
    except (HydraException, OmegaConfBaseException) as exc:
        raise _hydra_error(exc, overrides, conf_dir) from exc


class _Problems:
    """Collects every problem of one params dict, so that one run names them all."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, expected: str, found: Any) -> None:
        self.items.append(f"{key}: expected {expected}, found {found!r}")

    def is_int(self, key: str, value: Any, low: int, why: str = "") -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            self.add(key, f"an int >= {low}{why}", value)

    def is_number(self, key: str, value: Any, low: float | None = None, strict: bool = False) -> None:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
        if ok and low is not None:
            ok = value > low if strict else value >= low
        if not ok:
            bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
            self.add(key, f"a number{bound}", value)

    def is_choice_list(self, key: str, value: Any, choices: Sequence[str]) -> None:
        if not isinstance(value, list) or not value or any(v not in choices for v in value):
            self.add(key, f"a non-empty list of {', '.join(choices)}", value)

    def group(self, params: Mapping[str, Any], name: str) -> Mapping[str, Any]:
        value = params.get(name)
        if not isinstance(value, Mapping):
            self.add(name, "a mapping (the config group conf/" + name + "/)", value)
            return {}
        return value


def _check_checkpoint(p: _Problems, ckpt: Mapping[str, Any]) -> None:
    from pipeline_lib.checkpoint import CheckpointConfig
    from pipeline_lib.errors import CheckpointError

    try:
        CheckpointConfig.from_mapping(ckpt)
    except CheckpointError as exc:
        p.items.append(f"checkpoint: {exc}")
    name = ckpt.get("name")
    if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name):
        p.add("checkpoint.name", "a folder name (letters, digits, '.', '_', '-'; not starting with '.')", name)
    source = ckpt.get("source")
    if source == "local" and (not isinstance(ckpt.get("path"), str) or ckpt.get("path") in ("", "???")):
        p.add("checkpoint.path", "a checkpoint directory for source=local (checkpoint.path=/abs/dir)", ckpt.get("path"))
    if source == "hub" and not (isinstance(ckpt.get("repo_id"), str) and HUB_ID.fullmatch(ckpt["repo_id"])):
        p.add("checkpoint.repo_id", "a hub id owner/name for source=hub", ckpt.get("repo_id"))
    if ckpt.get("num_layers") is not None:
        p.is_int("checkpoint.num_layers", ckpt["num_layers"], 1, " or null")
    p.is_int("checkpoint.seed", ckpt.get("seed", 0), 0)
    p.is_number("checkpoint.lm_head_scale", ckpt.get("lm_head_scale", 1.0), 0.0, strict=True)
    p.is_number("checkpoint.timeout_s", ckpt.get("timeout_s", 30), 0.0, strict=True)


def _check_thresholds(p: _Problems, key: str, values: Any, cls: type) -> None:
    """Every field of the thresholds dataclass ``cls``: ints >= 1 (seed >= 0), numbers otherwise."""
    import dataclasses

    if not isinstance(values, Mapping):
        p.add(key, "a mapping of thresholds", values)
        return
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        p.add(key, f"only the keys {sorted(fields)}", unknown)
    for name, value in values.items():
        if name not in fields:
            continue
        if fields[name].type in ("int", int):
            p.is_int(f"{key}.{name}", value, 0 if name == "seed" else 1)
        else:
            p.is_number(f"{key}.{name}", value)


def _check_convert(p: _Problems, convert: Mapping[str, Any]) -> None:
    import inspect

    from pipeline_lib.convert import OV_INT4_MODES, OV_INT8_MODES
    from pipeline_lib.quantize_ort import METHODS, quantize_onnx_int8

    backends, precisions = convert.get("backends"), convert.get("precisions")
    p.is_choice_list("convert.backends", backends, registry.BACKENDS)
    p.is_choice_list("convert.precisions", precisions, registry.PRECISIONS)
    # A pair the registry lacks (onnx-bf16, openvino-int4) is no target: it is left out (convert.targets below).
    mode = (convert.get("openvino") or {}).get("int8_mode", "int8_asym")
    if mode not in OV_INT8_MODES:
        p.add("convert.openvino.int8_mode", f"one of {', '.join(OV_INT8_MODES)}", mode)
    mode4 = (convert.get("openvino") or {}).get("int4_mode", "int4_sym")
    if mode4 not in OV_INT4_MODES:
        p.add("convert.openvino.int4_mode", f"one of {', '.join(OV_INT4_MODES)}", mode4)
    p.is_int("convert.openvino.int4_group_size", (convert.get("openvino") or {}).get("int4_group_size", 128), 1)
    onnx = convert.get("onnx") or {}
    for name in onnx:
        if name not in registry.PRECISIONS:
            p.add("convert.onnx", f"keys that are precisions ({', '.join(registry.PRECISIONS)})", name)
    kwargs = set(inspect.signature(quantize_onnx_int8).parameters) - {"onnx_path", "out_path"}
    for prec_name, models in onnx.items():
        for model, settings in (models or {}).items():
            key = f"convert.onnx.{prec_name}.{model}"
            if model not in registry.MODELS:
                p.add(f"convert.onnx.{prec_name}", f"models {' and '.join(map(repr, registry.MODELS))}", model)
                continue
            if not isinstance(settings, Mapping):
                p.add(key, "a mapping of quantize_onnx_int8 arguments", settings)
                continue
            unknown = sorted(set(settings) - kwargs)
            if unknown:
                p.add(key, f"only arguments of quantize_onnx_int8 ({', '.join(sorted(kwargs))})", unknown)
            if settings.get("method", "dynamic") not in METHODS:
                p.add(f"{key}.method", f"one of {', '.join(METHODS)}", settings.get("method"))
    # dvc.yaml's convert / parity_convert stages run foreach over convert.targets: exactly the registered
    # targets within backends x precisions (registry.target_labels), each with its backend and precision.
    targets = convert.get("targets")
    if isinstance(backends, list) and isinstance(precisions, list):
        want = registry.target_labels([b for b in backends if b in registry.BACKENDS],
                                      [q for q in precisions if q in registry.PRECISIONS])
        have = list(targets) if isinstance(targets, Mapping) else targets
        if have != want:
            p.add("convert.targets", f"the registered targets of convert.backends x convert.precisions, in order: "
                  f"{', '.join(want)}", have)
        elif isinstance(targets, Mapping):
            for label, item in targets.items():
                b, _, q = str(label).partition("-")
                if not isinstance(item, Mapping) or (item.get("backend"), item.get("precision")) != (b, q):
                    p.add(f"convert.targets.{label}", f"{{backend: {b}, precision: {q}}}", item)


def _check_bench(p: _Problems, bench: Mapping[str, Any]) -> None:
    threads = bench.get("threads")
    if not isinstance(threads, list) or not threads:
        p.add("bench.threads", "a non-empty list of thread counts, e.g. [1, ${threads}]", threads)
    else:
        for i, n in enumerate(threads):
            p.is_int(f"bench.threads[{i}]", n, 1)
    # Audio needs two hidden vectors per sentence (n of them give n - 1 tokens of audio).
    p.is_int("bench.num_tokens", bench.get("num_tokens"), 2, " (one token gives no audio)")
    for key in ("repeats", "upstream_repeats", "passes"):
        p.is_int(f"bench.{key}", bench.get(key, 1), 1)
    p.is_int("bench.warmup_tokens", bench.get("warmup_tokens", 0), 0)
    p.is_int("bench.batch_size", bench.get("batch_size", 0), 0, " (0: no batch measurement)")
    if not isinstance(bench.get("stream", True), bool):
        p.add("bench.stream", "true or false", bench.get("stream"))
    p.is_choice_list("bench.backends", bench.get("backends"), registry.BENCH_BACKENDS)
    pairs = bench.get("pairs", [])
    if not isinstance(pairs, (list, tuple)) and not type(pairs).__name__ == "ListConfig":
        p.add("bench.pairs", "a list of LM+DECODER target pairs, e.g. [onnx-int4+openvino-int8]", pairs)
    else:
        for i, label in enumerate(pairs):
            try:
                c = registry.choice(str(label)) if isinstance(label, str) else None
            except InputError:
                c = None
            if c is None or c.lm == c.decoder:
                p.add(f"bench.pairs[{i}]", "LM+DECODER, two targets such as onnx-int4+openvino-int8 (targets: "
                      f"{', '.join(t.label for t in registry.TARGETS.values())})", label)
    text = bench.get("text")
    if text is not None and not (isinstance(text, str) and text.strip()):
        p.add("bench.text", "null (the default text) or a non-empty string", text)
    p.is_number("bench.timeout_s", bench.get("timeout_s", 900), 0.0, strict=True)


def _check_pairs_are_built(p: _Problems, bench: Mapping[str, Any], convert: Mapping[str, Any]) -> None:
    """bench.pairs: each target built by this run (onnx-fp32, the export, or one of convert.targets),
    each backend in bench.backends, no pair twice: else the benchmark would fail after the whole
    pipeline ran, or read an older run's folder."""
    pairs = bench.get("pairs") or []
    if not isinstance(pairs, (list, tuple)):
        return
    built = {"-".join(registry.EXPORT_TARGET)} | {str(t) for t in (convert.get("targets") or {})}
    backends = set(bench.get("backends") or [])
    seen: set[str] = set()
    for i, label in enumerate(pairs):
        try:
            c = registry.choice(str(label))
        except InputError:
            continue  # _check_bench names it
        missing = [t.label for t in c.targets if t.label not in built]
        if missing:
            p.add(f"bench.pairs[{i}]", f"targets this run builds (convert.targets: {', '.join(sorted(built))}); "
                  f"not built: {', '.join(missing)}", label)
        off = sorted({t.backend for t in c.targets} - backends)
        if off:
            p.add(f"bench.pairs[{i}]", f"backends in bench.backends ({', '.join(sorted(backends))}); not there: "
                  f"{', '.join(off)}", label)
        if c.label in seen:
            p.add(f"bench.pairs[{i}]", "each pair once", label)
        seen.add(c.label)


def _check_release(p: _Problems, release: Mapping[str, Any], convert: Mapping[str, Any]) -> None:
    """release.targets: ONNX targets (pipeline_lib.release.VARIANT_SUFFIX) that convert builds; default: one of them."""
    built = set((convert.get("targets") or {}).keys()) if isinstance(convert.get("targets"), Mapping) else set()
    targets = release.get("targets")
    if not isinstance(targets, list) or not targets:
        p.add("release.targets", "a non-empty list of ONNX targets, e.g. [onnx-int8]", targets)
        return
    from pipeline_lib.release import VARIANT_SUFFIX

    for t in targets:
        if t not in [f"onnx-{precision}" for precision in VARIANT_SUFFIX] or (built and t not in built):
            p.add("release.targets", f"ONNX targets that convert.targets builds ({', '.join(sorted(built))})", t)
    if release.get("default") not in targets:
        p.add("release.default", f"one of release.targets {targets}", release.get("default"))


def validate_params(params: Mapping[str, Any] | Any, source: str = "params") -> None:
    """Raise InputError, naming every bad value, unless ``params`` (a composed dict, or an OmegaConf
    object as the stages load it) is one the stages can run with: thread counts and sizes ints >= 1,
    backends, precisions and targets from pipeline_lib.registry,
    a checkpoint whose name is a folder name and whose source has what it needs, thresholds that are
    numbers. ``source`` (the file or the overrides) starts the message."""
    if type(params).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        try:
            params = OmegaConf.to_container(params, resolve=True, throw_on_missing=False)
        except OmegaConfBaseException as exc:
            raise InputError(f"{source}: cannot be resolved: {' '.join(str(exc).split())}; fix the interpolation "
                             "or recompose it with `python -m pipeline_lib.config`") from exc
    if not isinstance(params, Mapping):
        raise InputError(f"{source}: expected a mapping of params, found {type(params).__name__}")
    p = _Problems()
    p.is_int("threads", params.get("threads"), 1)
    groups = {name: p.group(params, name) for name in GROUPS}
    if groups["checkpoint"]:
        _check_checkpoint(p, groups["checkpoint"])
    if groups["export"]:
        p.is_int("export.opset", groups["export"].get("opset"), 1)
    if groups["convert"]:
        _check_convert(p, groups["convert"])
    if groups["parity"]:
        from pipeline_lib.parity import ParityThresholds
        from pipeline_lib.parity_quant import THRESHOLDS

        parity = groups["parity"]
        _check_thresholds(p, "parity", {k: v for k, v in parity.items() if not str(k).startswith("convert_")},
                          ParityThresholds)
        # stages/parity_convert.py: each precision's limits, of the kind its registry entry names.
        for name in groups["convert"].get("precisions") or []:
            if name in registry.PRECISIONS:
                precision = registry.precision(name)
                key = precision.parity_key
                if key not in parity:
                    p.add(f"parity.{key}", "the limits of stage parity_convert for that precision", None)
                else:
                    from pipeline_lib.parity import TRAINED_KEY

                    limits = dict(parity[key] or {})
                    trained = limits.pop(TRAINED_KEY, None) or {}
                    _check_thresholds(p, f"parity.{key}", limits, THRESHOLDS[precision.parity])
                    _check_thresholds(p, f"parity.{key}.{TRAINED_KEY}", trained, THRESHOLDS[precision.parity])
    if isinstance(params.get("release"), Mapping):
        _check_release(p, params["release"], groups["convert"])
    if groups["bench"]:
        _check_bench(p, groups["bench"])
        _check_pairs_are_built(p, groups["bench"], groups["convert"])
    if p.items:
        listing = "\n  ".join(p.items)
        raise InputError(f"{source}: {len(p.items)} bad value(s):\n  {listing}\n"
                         "Fix the override (or conf/<group>/*.yaml) and compose again: "
                         "python -m pipeline_lib.config [overrides...] (or dvc exp run -S key=value)")


def write_params(path: Path, overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> None:
    """Compose, check, then write ``path`` atomically; a bad composition raises InputError and leaves
    ``path`` as it was."""
    import yaml

    from pipeline_lib.fsutil import atomic_file

    params = compose(overrides, conf_dir)
    validate_params(params, f"{conf_dir}/config.yaml with {' '.join(overrides)}" if overrides else f"{conf_dir}/config.yaml")
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(params, sort_keys=False))


def main(argv: Sequence[str] | None = None, path: Path = PARAMS_FILE, conf_dir: Path = CONF_DIR) -> int:
    """`python -m pipeline_lib.config [overrides...]`: 0 when params.yaml was written, 2 on a bad override."""
    try:
        write_params(path, list(sys.argv[1:] if argv is None else argv), conf_dir)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The files of a model: which LM and decoder files a folder, a target root or a release bundle holds for a
backend, the configs and tokenizer beside them, and the checks that they belong together (the LM and decoder
not swapped, the model's names equal to its config's, the tokenizer the LM's). Every failure is a
ModelFileError naming the file and the fix, raised before a model is loaded where it can be.

`SopranoTTS` (runtime.tts) is the one user: its constructor runs the checks, `from_dir` the resolution
(`folder_files`, `root_files`, `bundle_files`: each returns the LM file, the decoder file, the constructor's
keyword arguments and the registry choice, if any)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

from pipeline_lib import registry
from pipeline_lib.certificate import CERTIFICATE_FILE
from pipeline_lib.certificate import status as certificate_status
from pipeline_lib.cpuinfo import read_cpuinfo
from pipeline_lib.errors import InputError, ModelFileError, UnsupportedCpuError
from pipeline_lib.registry import (
    DECODER_CONFIG_SUFFIX,
    DECODER_DIR,
    DECODER_FILE,
    LM_CONFIG_SUFFIX,
    LM_DIR,
    LM_FILE,
    STATEFUL_FILE,
    TOKENIZER_FILE,
)
from pipeline_lib.runtime.backends import HOW_TO_PRODUCE
from pipeline_lib.runtime.generate import LMSpec
from pipeline_lib.text import SPECIAL_TOKENS

__all__ = [
    "config_beside", "load_tokenizer", "check_not_swapped", "check_names", "lm_file", "decoder_file",
    "folder_files", "root_files", "bundle_files",
]

log = logging.getLogger(__name__)

Resolved = tuple[Path, Path, dict, "registry.Choice | None"]


def config_beside(model_path: Path, suffix: str, canonical: str) -> Path:
    """`{stem}{suffix}` beside the model, else the canonical export name in the same folder."""
    own = model_path.with_name(model_path.stem + suffix)
    if own.is_file():
        return own
    fallback = model_path.with_name(canonical + suffix)
    return fallback if fallback.is_file() else own


_TOKENIZER_FIX = ("the tokenizer does not belong to this LM export: copy the checkpoint's tokenizer.json beside the LM "
                  "(or pass tokenizer_path)")
_AUDIO_TOKEN = re.compile(r"\[\d+\]")  # audio token k is "[k]"


def load_tokenizer(path: Path, spec: LMSpec) -> Any:
    """The tokenizer at `path`, checked against the LM's config (`spec`): the special token ids, every
    id below the LM's vocab_size (the rows of its embedding and logits), and the audio tokens [0]..[n-1]
    at ids audio_token_first_id.. (n = audio_token_count; configs without these fields: right after the
    special tokens, n = the tokenizer's count of "[k]" tokens), with no other "[k]" token. A tokenizer
    with fewer ids than vocab_size passes (an LM may have spare rows). A ModelFileError otherwise."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"{path}: cannot be read as a tokenizers JSON file ({exc}); copy the checkpoint's tokenizer.json beside the LM.") from exc
    tok.no_padding()
    tok.no_truncation()
    cfg = spec.path.name
    found = {name.strip("[]").lower(): tok.token_to_id(name) for name in SPECIAL_TOKENS}
    if found != spec.special_tokens:
        raise ModelFileError(
            f"{path}: special token ids {found} differ from {cfg}'s special_tokens "
            f"{spec.special_tokens}; {_TOKENIZER_FIX}."
        )
    vocab = tok.get_vocab(with_added_tokens=True)  # token -> id
    beyond = sorted((i, t) for t, i in vocab.items() if i >= spec.vocab_size)
    if beyond:
        raise ModelFileError(
            f"{path}: expected token ids 0..{spec.vocab_size - 1} (the LM's vocab_size {spec.vocab_size}, {cfg}); "
            f"found {len(beyond)} beyond, up to {beyond[-1][0]} ({beyond[-1][1]!r}; "
            f"{tok.get_vocab_size(with_added_tokens=True)} ids in all); {_TOKENIZER_FIX}."
        )
    audio = {t: i for t, i in vocab.items() if _AUDIO_TOKEN.fullmatch(t)}
    first, count = spec.audio_token_first_id, spec.audio_token_count
    source = f"{cfg}: audio_token_first_id {first}, audio_token_count {count}"
    if first is None or count is None:
        first, count = max(spec.special_tokens.values()) + 1, len(audio)
        source = f"{cfg} has no audio_token_* fields: after the special tokens, as many as the tokenizer's [k] tokens"
    by_id = {i: t for t, i in vocab.items()}
    wrong = [(first + k, by_id.get(first + k)) for k in range(count) if by_id.get(first + k) != f"[{k}]"]
    extra = sorted((i, t) for t, i in audio.items() if not (first <= i < first + count and t == f"[{i - first}]"))
    if wrong or extra or count < 1:
        span = f"[0]..[{count - 1}] at ids {first}..{first + count - 1}" if count >= 1 else f"[0], [1], ... from id {first}"
        if wrong:
            at, got = wrong[0]
            detail = f"found {got!r} at id {at} where [{at - first}] belongs ({len(wrong)} of {count} ids differ)"
        elif extra:
            detail = f"found audio tokens outside that range: {[f'{t} = {i}' for i, t in extra[:3]]} ({len(extra)} in all)"
        else:
            detail = "found no audio tokens"
        raise ModelFileError(
            f"{path}: expected the audio tokens {span} ({source}); "
            f"{detail}; {_TOKENIZER_FIX}."
        )
    return tok


_LM_MARK = "input_ids"  # every LM interface has this input (LMSpec.check_interface); a decoder has not
_SWAP_FIX = (
    f"pass the LM step model as lm_path and the decoder as decoder_path (in an export folder: {LM_FILE}.onnx "
    f"and {DECODER_FILE}.onnx; if the files were renamed, re-export: {HOW_TO_PRODUCE})"
)


def check_not_swapped(lm_path: Path, decoder_path: Path) -> None:
    """Before any config or model is loaded: a ModelFileError saying "swapped" when lm_path has a decoder's
    ISTFT config beside it ({stem}_istft_config.json) and decoder_path an LM config ({stem}_config.json),
    or naming the one path that holds the other kind of model."""
    def own(p: Path, suffix: str) -> Path:
        return p.with_name(p.stem + suffix)

    def is_kind(p: Path, suffix: str, other: str) -> bool:
        return own(p, suffix).is_file() and not own(p, other).is_file()

    lm_is_decoder = is_kind(lm_path, DECODER_CONFIG_SUFFIX, LM_CONFIG_SUFFIX)
    decoder_is_lm = is_kind(decoder_path, LM_CONFIG_SUFFIX, DECODER_CONFIG_SUFFIX)
    seen = []
    if lm_is_decoder:
        seen.append(f"lm_path {lm_path} is a decoder ({own(lm_path, DECODER_CONFIG_SUFFIX).name} beside it)")
    if decoder_is_lm:
        seen.append(f"decoder_path {decoder_path} is an LM step model ({own(decoder_path, LM_CONFIG_SUFFIX).name} beside it)")
    if lm_is_decoder and decoder_is_lm:
        raise ModelFileError(
            f"{'; '.join(seen)}: lm_path and decoder_path are swapped; expected the LM step model first: "
            f"SopranoTTS(lm_path={str(decoder_path)!r}, decoder_path={str(lm_path)!r}), or SopranoTTS.from_dir(folder)."
        )
    if seen:
        raise ModelFileError(f"{seen[0]}; expected the other kind of model there: {_SWAP_FIX}.")


def _short(names: Sequence[str]) -> str:
    names = list(names)
    return str(names) if len(names) <= 4 else f"{names[:3]} and {len(names) - 3} more"


def check_names(kind: str, path: Path, config: Path, expected: Sequence[str], found: Sequence[str]) -> None:
    """The loaded model's input or output names (`found`) must be those its config lists (`expected`).
    A model of the other kind (a decoder where the config is an LM's, or the reverse: told apart by the LM's
    input_ids input) is reported as swapped, otherwise as a model and config from different exports."""
    if kind == "input" and (_LM_MARK in expected) != (_LM_MARK in found):
        holds, wanted = ("an LM step model", "decoder") if _LM_MARK in found else ("a decoder", "LM step model")
        raise ModelFileError(
            f"{path}: holds {holds} (inputs {_short(found)}), not the {wanted} that {config.name} describes "
            f"(inputs {_short(expected)}): the LM and decoder files look swapped (renamed onto each other, or "
            f"lm_path and decoder_path given the other way round); {_SWAP_FIX}."
        )
    if set(expected) != set(found):
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        raise ModelFileError(
            f"{path}: {kind} names do not match {config.name}: expected {list(expected)}, found {list(found)} "
            f"(missing from the model: {missing}; not in the config: {extra}); the model and its config "
            f"come from different exports: {HOW_TO_PRODUCE}."
        )


def lm_file(lm_dir: Path, backend: registry.Backend, stateful: bool, dec_dir: Path | None = None) -> Path:
    """The LM file of a folder for `backend`: its IR (stateful first, unless `stateful` is False) where the
    backend has one and the folder holds it (and, when dec_dir is given, the decoder's IR too, so that an
    export folder with ONNX files only is run from ONNX), else the ONNX step model."""
    ext = backend.suffix
    if ext != ".onnx" and (dec_dir is None or (dec_dir / f"{DECODER_FILE}{ext}").is_file()):
        for lm_file in (STATEFUL_FILE, LM_FILE) if stateful and backend.stateful_lm else (LM_FILE,):
            if (lm_dir / f"{lm_file}{ext}").is_file():
                return lm_dir / f"{lm_file}{ext}"
    return lm_dir / f"{LM_FILE}.onnx"


def decoder_file(dec_dir: Path, backend: registry.Backend) -> Path:
    """The decoder file of a folder for `backend`: its IR where present, else the ONNX model."""
    ir = dec_dir / f"{DECODER_FILE}{backend.suffix}"
    return ir if backend.suffix != ".onnx" and ir.is_file() else dec_dir / f"{DECODER_FILE}.onnx"


def folder_files(d: Path, stateful: bool, kwargs: dict) -> Resolved:
    """An export folder (the files side by side) or a pipeline folder with lm/ and decoder/ subfolders: the
    backend's IR files where both models have them (the stateful LM first unless `stateful` is False), else
    the ONNX files. A target folder whose certificate did not pass loads with a warning."""
    if not d.is_dir():
        raise ModelFileError(f"{d}: model folder not found; {HOW_TO_PRODUCE}.")
    lm_dir, dec_dir = (d / LM_DIR, d / DECODER_DIR) if (d / LM_DIR).is_dir() and (d / DECODER_DIR).is_dir() else (d, d)
    if (d / CERTIFICATE_FILE).is_file():  # a target folder with its certificate: say when it did not pass
        cert = certificate_status(d)
        if not cert.passed:
            log.warning("%s: %s certificate: %s", d, cert.state, cert.why)
    backend = registry.backend(kwargs.get("backend", "onnx_cpu"))
    lm = lm_file(lm_dir, backend, stateful, dec_dir)
    # both models of one kind: IR files where both are there, else the ONNX files
    decoder = decoder_file(dec_dir, backend) if lm.suffix == backend.suffix else dec_dir / f"{DECODER_FILE}.onnx"
    return lm, decoder, kwargs, None


def bundle_files(d: Path, precision: str | None, objective: str, kwargs: dict) -> Resolved:
    """A release bundle's variant picked by `precision` (a label, "auto" or None: its default; runtime.bundle)."""
    from pipeline_lib import recommend
    from pipeline_lib.runtime import bundle

    backend = registry.backend(kwargs.pop("backend", "onnx_cpu"))
    if backend.name != "onnx":
        raise InputError(f"{d}: a release bundle holds ONNX models; leave backend out (or use onnx)")
    recommend.check_objective(objective)
    v = bundle.variant(d, precision, objective)
    return v.lm, v.decoder, {**kwargs, "backend": backend.runtime, "tokenizer_path": d / TOKENIZER_FILE}, \
        registry.choice(v.label)


def root_files(root: Path, precision: str, objective: str, stateful: bool, kwargs: dict) -> Resolved:
    """A ROOT holding <backend>/<precision>/{lm,decoder}: the target (or "LM+DECODER" pair) `precision`
    names, or "auto": pipeline_lib.recommend's pick for this CPU and `objective` among the certified targets."""
    from pipeline_lib import recommend

    if "backend" in kwargs or "decoder_backend" in kwargs:
        raise InputError("from_dir(precision=...) takes the backends from the precision (e.g. "
                         "'onnx-int4+openvino-bf16'); leave backend and decoder_backend out")
    if not root.is_dir():
        raise ModelFileError(f"{root}: model folder not found; {HOW_TO_PRODUCE}.")
    if precision == "auto":
        chosen = recommend.pick(root, objective)
        log.info("precision auto: %s", chosen.reason)
        choice = chosen.choice
    else:
        recommend.check_objective(objective)
        choice = registry.choice(precision)
        _, flags = read_cpuinfo()
        why_not = recommend.runnable(choice, flags) if flags else None
        if why_not:
            raise UnsupportedCpuError(f"precision {choice.label}: {why_not}; pick another precision or "
                                      "precision='auto'")
        for t in dict.fromkeys(choice.targets):  # named explicitly: loaded whatever its certificate says
            cert = recommend.certificate_of(root, t)
            if not cert.passed:
                log.warning("precision %s: %s is %s (%s); loading it because it was named; precision='auto' "
                            "would not pick it", choice.label, t.label, cert.state, cert.why)
    dirs = {}
    for which, t in ((LM_DIR, choice.lm), (DECODER_DIR, choice.decoder)):
        found = registry.model_dir_under(root, t.backend, t.precision, which)
        if found is None:
            looked = ", ".join(str(p / which) for p in registry.folders_under(root, t.backend, t.precision))
            raise ModelFileError(f"{root}: no {which} of {t.label} ({looked}); build it with `dvc repro "
                                 f"convert@{t.label}` or `soprano-onnx convert --export EXPORT_DIR --backend {t.backend} "
                                 f"--precision {t.precision} --out {root / t.backend / t.precision}`.")
        dirs[which] = found
    lm_b, dec_b = registry.backend(choice.lm.backend), registry.backend(choice.decoder.backend)
    return (lm_file(dirs[LM_DIR], lm_b, stateful), decoder_file(dirs[DECODER_DIR], dec_b),
            {**kwargs, "backend": lm_b.runtime, "decoder_backend": dec_b.runtime}, choice)

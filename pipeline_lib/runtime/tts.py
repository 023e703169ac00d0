"""`SopranoTTS`: text -> 32 kHz speech with the exported LM step model, the pre-ISTFT decoder and
the NumPy ISTFT. Runtime dependencies only: numpy, onnxruntime (or openvino), tokenizers; never
torch or transformers (except `use_torch_istft=True`, a cross-check).

Pipeline per call: normalise and split the text (`pipeline_lib.text`, upstream-identical), cut any
sentence whose prompt exceeds `max_prompt_tokens`, run the LM over the sentences in batches of
`batch_size`, decode every sentence's hidden states to a spectrum, ISTFT, and concatenate the
sentences' audio in order. A sentence with n hidden vectors gives (n - 1) * samples_per_token
samples: upstream `infer_batch` keeps exactly that many from the end of the decoder output, which
is all of it.

Streaming (`infer_stream`) decodes sliding windows that carry `stream_context` tokens of context on
each side, enough that every emitted sample equals the full-sequence decode (see
`stream_context_tokens`) for a decoder that computes each frame alone (fp32; OpenVINO's int8 where it
computes in f32). A decoder that quantises activations per call (ONNX Runtime's dynamic int8) rounds a
window differently from the whole sentence: close, not equal (README, "Runtime").
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import wave
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline_lib.audio.istft import IstftConfig, istft
from pipeline_lib.certificate import CERTIFICATE_FILE
from pipeline_lib.certificate import status as certificate_status
from pipeline_lib.cpuinfo import default_threads, read_cpuinfo, warn_if_oversubscribed
from pipeline_lib.errors import InputError, MissingBackendError, ModelFileError, UnsupportedCpuError
from pipeline_lib import registry
from pipeline_lib.registry import (
    DECODER_CONFIG_SUFFIX,
    DECODER_DIR,
    DECODER_FILE,
    LM_CONFIG_SUFFIX,
    LM_DIR,
    LM_FILE,
    STATEFUL_FILE,
    TOKENIZER_FILE,
    normalize_backend,
)
from pipeline_lib.runtime.backends import (
    HOW_TO_PRODUCE,
    OpenVinoLM,
    load_backends,
    release_free_heap,
    require_file,
)
from pipeline_lib.runtime.generate import (
    GenerationTimings,
    LMSpec,
    generate,
    generate_steps,
    validate_max_new_tokens,
)
from pipeline_lib.runtime.sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULTS, SamplingParams, row_generators, validate_seed
from pipeline_lib.text import SPECIAL_TOKENS, SentencePrompt, fit_to_positions, prepare_prompts

__all__ = ["SopranoTTS", "stream_context_tokens", "write_wav", "LM_FILE", "DECODER_FILE"]

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
# Upstream's decoder layout, used when the ISTFT config lacks the "decoder" section.
_DEFAULT_DECODER = {"num_layers": 8, "dw_kernel": 3, "input_channels": 512}


def stream_context_tokens(decoder: dict[str, Any], cfg: IstftConfig) -> int:
    """Tokens of context a decoded window needs on each side of the samples it emits, so that they
    equal the full-sequence decode (up to float rounding).

    Sample 2048*c (a token boundary) sits at spectral frame centre upscale*c. The ISTFT adds the
    frames within n_fft/2 samples of it: frames down to upscale*c - (n_fft/(2*hop) - 1). Each such
    frame must be clear of the window edge by the depthwise convolutions' reach (num_layers *
    (kernel // 2) frames: their zero padding corrupts that many frames at a window edge). The
    frame-level interpolation, the k=1 input conv and the per-frame norms and MLPs are local.
    Soprano: 8 * 1 + 2048 / 1024 - 1 = 9 frames -> ceil(9 / 4) = 3 tokens.

    Measured on the tiny checkpoint (float64 torch reference, windows around tokens 15..17 of 30):
    3 tokens each side reproduce the full decode exactly (0.0), 2 tokens leave 6.5e-9 of peak with
    the random weights but 5e-5 of peak with the weights scaled by 5, 1 token 5e-5 (5.7e-2 scaled).
    So 3 is what structure requires, whatever the weights; fewer only happens to be close enough.
    """
    frames = int(decoder["num_layers"]) * (int(decoder["dw_kernel"]) // 2) + math.ceil(cfg.n_fft / (2 * cfg.hop_length)) - 1
    return max(1, math.ceil(frames / cfg.upscale_factor))


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Mono 16-bit PCM WAV (stdlib `wave`); samples clipped to [-1, 1]. Written atomically (a temporary
    file beside ``path``, renamed onto it): a failure leaves any old file at ``path`` as it was."""
    from pipeline_lib.fsutil import atomic_file

    path = Path(path)
    pcm = np.round(np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2")
    with atomic_file(path) as tmp, wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return path


def _config_beside(model_path: Path, suffix: str, canonical: str) -> Path:
    """`{stem}{suffix}` beside the model, else the canonical export name in the same folder."""
    own = model_path.with_name(model_path.stem + suffix)
    if own.is_file():
        return own
    fallback = model_path.with_name(canonical + suffix)
    return fallback if fallback.is_file() else own


_TOKENIZER_FIX = ("the tokenizer does not belong to this LM export: copy the checkpoint's tokenizer.json beside the LM "
                  "(or pass tokenizer_path)")
_AUDIO_TOKEN = re.compile(r"\[\d+\]")  # audio token k is "[k]"


def _load_tokenizer(path: Path, spec: LMSpec) -> Any:
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


def _check_not_swapped(lm_path: Path, decoder_path: Path) -> None:
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


def _check_names(kind: str, path: Path, config: Path, expected: Sequence[str], found: Sequence[str]) -> None:
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


def _lm_file(lm_dir: Path, backend: registry.Backend, stateful: bool, dec_dir: Path | None = None) -> Path:
    """The LM file of a folder for `backend`: its IR (stateful first, unless `stateful` is False) where the
    backend has one and the folder holds it (and, when dec_dir is given, the decoder's IR too, so that an
    export folder with ONNX files only is run from ONNX), else the ONNX step model."""
    ext = backend.suffix
    if ext != ".onnx" and (dec_dir is None or (dec_dir / f"{DECODER_FILE}{ext}").is_file()):
        for lm_file in (STATEFUL_FILE, LM_FILE) if stateful and backend.stateful_lm else (LM_FILE,):
            if (lm_dir / f"{lm_file}{ext}").is_file():
                return lm_dir / f"{lm_file}{ext}"
    return lm_dir / f"{LM_FILE}.onnx"


def _decoder_file(dec_dir: Path, backend: registry.Backend) -> Path:
    """The decoder file of a folder for `backend`: its IR where present, else the ONNX model."""
    ir = dec_dir / f"{DECODER_FILE}{backend.suffix}"
    return ir if backend.suffix != ".onnx" and ir.is_file() else dec_dir / f"{DECODER_FILE}.onnx"


class SopranoTTS:
    """Soprano text-to-speech on CPU from exported models.

    lm_path / decoder_path: the LM step model and the pre-ISTFT decoder (.onnx; .xml IR also for
    backend "openvino_cpu"). Their JSON configs and tokenizer.json are found beside them (tokenizer:
    beside the LM, then beside the decoder) unless given. `max_prompt_tokens` (default
    max_position_embeddings // 2 = 256) bounds a sentence prompt; longer sentences are cut at
    sentence marks, clause marks or spaces into several prompts, so text of any length is spoken.
    `low_memory` (default True): ONNX Runtime without its CPU memory arena and with a fixed glibc mmap
    threshold, so freed load-time and batch buffers go back to the OS (80M model: 655 instead of
    930-960 MiB peak over the benchmark, at the same speed; see backends._ort_session), and one sentence per
    decoder call. False: ORT's defaults and `decoder_batch_size` = batch_size. `decoder_batch_size`:
    at most this many sentences of equal length per decoder call (no padding, same audio).
    `warm_up` (default True): run a few tokens through both models at construction (see warm_up).
    `num_threads`: threads per model (default: cpuinfo.default_threads(), the physical cores this process may use
    within its cgroup quota); more than the CPUs available to the process (cpuinfo.available_cpus)
    logs a warning. Before loading the models, a ModelFileError for: a missing file, lm_path and
    decoder_path swapped (told by the configs beside them), a tokenizer that is not the LM's (see
    _load_tokenizer); after loading, for models whose input / output names differ from their configs
    (LM and decoder files renamed onto each other are reported as swapped).
    `static_decode_width` (openvino_cpu only; default 640, None: off): one-row decode steps run on a
    second compilation of the LM with fixed input shapes at this cache width, which is faster than
    OpenVINO's dynamic shapes but holds a second copy of the weights (see backends.OpenVinoLM).
    `backend` runs the LM; `decoder_backend` (default: `backend`) runs the decoder, so the two models can
    come from different backends and precisions (e.g. an ONNX Runtime int4 LM with an OpenVINO bf16
    decoder; see from_dir's `precision`).
    """

    def __init__(
        self,
        lm_path: str | Path,
        decoder_path: str | Path,
        backend: str = "onnx_cpu",
        num_threads: int | None = None,
        tokenizer_path: str | Path | None = None,
        use_torch_istft: bool = False,
        *,
        lm_config_path: str | Path | None = None,
        decoder_config_path: str | Path | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_prompt_tokens: int | None = None,
        low_memory: bool = True,
        decoder_batch_size: int | None = None,
        warm_up: bool = True,
        static_decode_width: int | None = OpenVinoLM.STATIC_DECODE_WIDTH,
        decoder_backend: str | None = None,
    ) -> None:
        self.backend = normalize_backend(backend)
        self.decoder_backend = normalize_backend(decoder_backend) if decoder_backend is not None else self.backend
        self.lm_path, self.decoder_path = Path(lm_path), Path(decoder_path)
        require_file(self.lm_path, "LM step model")
        require_file(self.decoder_path, "decoder model")
        _check_not_swapped(self.lm_path, self.decoder_path)
        lm_cfg = Path(lm_config_path) if lm_config_path else _config_beside(self.lm_path, LM_CONFIG_SUFFIX, LM_FILE)
        dec_cfg = (Path(decoder_config_path) if decoder_config_path
                   else _config_beside(self.decoder_path, DECODER_CONFIG_SUFFIX, DECODER_FILE))
        self.spec = LMSpec.from_json(lm_cfg)
        require_file(dec_cfg, "decoder ISTFT config JSON")
        self.istft_config = IstftConfig.from_json(dec_cfg)
        dec_meta = json.loads(dec_cfg.read_text(encoding="utf-8"))
        self.decoder_dims = {**_DEFAULT_DECODER, **(dec_meta.get("decoder") or {})}
        onnx_meta = dec_meta.get("onnx") or {}
        dec_in = (onnx_meta.get("input") or {}).get("name", "hidden_states")
        dec_out = (onnx_meta.get("output") or {}).get("name", "spectrum")
        if int(self.decoder_dims["input_channels"]) != self.spec.hidden_size:
            raise ModelFileError(
                f"{dec_cfg}: decoder input_channels {self.decoder_dims['input_channels']} differ from the LM's "
                f"hidden_size {self.spec.hidden_size} ({lm_cfg.name}); the two come from different checkpoints."
            )
        if tokenizer_path is None:
            candidates = [self.lm_path.with_name(TOKENIZER_FILE), self.decoder_path.with_name(TOKENIZER_FILE)]
            tokenizer_path = next((c for c in candidates if c.is_file()), candidates[0])
        self.tokenizer_path = require_file(Path(tokenizer_path), TOKENIZER_FILE)
        self.tokenizer = _load_tokenizer(self.tokenizer_path, self.spec)

        if num_threads is None:
            num_threads = default_threads()
        self.num_threads = num_threads
        warn_if_oversubscribed(num_threads)
        self.low_memory = bool(low_memory)
        self.lm, self.decoder = load_backends(
            self.backend, self.lm_path, self.decoder_path, num_threads, self.low_memory, static_decode_width,
            self.decoder_backend,
        )
        _check_names("input", self.lm_path, lm_cfg, self.spec.input_names, self.lm.input_names)
        _check_names("output", self.lm_path, lm_cfg, self.spec.output_names, self.lm.output_names)
        self.spec.check_interface()
        _check_names("input", self.decoder_path, dec_cfg, [dec_in], self.decoder.input_names)
        _check_names("output", self.decoder_path, dec_cfg, [dec_out], self.decoder.output_names)

        self.use_torch_istft = bool(use_torch_istft)
        if self.use_torch_istft:
            try:
                import torch  # noqa: F401
            except ImportError as exc:
                raise MissingBackendError("use_torch_istft=True needs torch: pip install 'soprano-onnx[export]'") from exc
        self.batch_size = self._positive_int("batch_size", batch_size)
        # Sentences with the same number of hidden vectors share a decoder call, up to this many (no
        # padding: identical audio). On CPU it does not pay: 8 x 128 tokens of the 80M decoder take
        # 0.79 s one by one, 0.79 s in pairs, 0.87 s at once, and raise the peak RSS by 120 MiB. So
        # low_memory decodes one sentence per call unless told otherwise.
        self.decoder_batch_size = self._positive_int(
            "decoder_batch_size",
            decoder_batch_size if decoder_batch_size is not None else (1 if self.low_memory else self.batch_size),
        )
        self.max_prompt_tokens = self._positive_int(
            "max_prompt_tokens", max_prompt_tokens if max_prompt_tokens is not None else self.spec.max_position_embeddings // 2
        )
        self.sample_rate = self.istft_config.sample_rate
        self.samples_per_token = self.istft_config.samples_per_token
        self.stream_context = stream_context_tokens(self.decoder_dims, self.istft_config)
        self.last_timings: dict[str, float] = {}
        self.choice: registry.Choice | None = None  # set by from_dir(precision=...)
        if warm_up:
            self.warm_up()

    def warm_up(self, ids: list[list[int]] | None = None) -> None:
        """One short streamed sentence (prefill, stream_context + 2 tokens, two small decoder windows):
        the sessions' first-run costs (thread pool start, kernel selection, first allocations) are
        paid here rather than by the first call, which matters most for infer_stream's first chunk."""
        if ids is None:
            ids = self.prepare(["Hello world 1."])[1][:1]
        n = min(self.stream_context + 2, self.spec.max_position_embeddings)
        for _ in self._stream(ids, None, 1, n, DEFAULTS, False):
            pass
        self._release_heap()

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, stateful: bool = True, precision: str | None = None,
                 objective: str = "stream", **kwargs: Any) -> SopranoTTS:
        """An export folder: soprano_lm_step.onnx, soprano_decoder_preistft.onnx, their JSON configs
        and tokenizer.json; a release bundle (runtime.bundle: `precision` picks its variant: a label, "auto"
        or None for its default; a hub id "owner/name" is downloaded through huggingface_hub); or a pipeline folder with lm/ and decoder/ subfolders (artifacts/export,
        artifacts/<backend>/<precision>). With backend "openvino_cpu", .xml IR files are preferred, and
        of the LM the stateful one (soprano_lm_stateful.xml, KV cache in OpenVINO state) where present,
        unless `stateful` is False: then the step IR that takes the cache as inputs
        (soprano_lm_step.xml), which a batching server needs (see runtime.scheduler).

        With `precision`, model_dir is a ROOT holding <backend>/<precision>/{lm,decoder} (the artifacts/
        folder after `dvc repro`, or `soprano-onnx convert --out ROOT/<backend>/<precision>` outputs), and
        precision names which: a target ("onnx-int8": both models), a pair "LM+DECODER"
        ("onnx-int4+openvino-bf16": each model from its own target and backend), or "auto": the first of
        pipeline_lib.recommend's rule for this CPU's features and `objective` ("stream", "first_chunk",
        "batch") that ROOT holds, this CPU runs and whose certificates passed (pipeline_lib.certificate), logged
        with the reason and the certificates relied on. A target named explicitly loads whatever its
        certificate says (failed, unchecked, stale or none: a warning). The backends then come from the
        choice; a `backend` argument is an error."""
        from pipeline_lib.runtime import bundle

        d = bundle.resolve(model_dir)  # a hub id -> its downloaded folder
        if bundle.is_bundle(d):
            return cls._from_bundle(d, precision, objective, kwargs)
        if precision is not None:
            return cls._from_root(d, precision, objective, stateful, kwargs)
        if not d.is_dir():
            raise ModelFileError(f"{d}: model folder not found; {HOW_TO_PRODUCE}.")
        lm_dir, dec_dir = (d / LM_DIR, d / DECODER_DIR) if (d / LM_DIR).is_dir() and (d / DECODER_DIR).is_dir() else (d, d)
        if (d / CERTIFICATE_FILE).is_file():  # a target folder with its certificate: say when it did not pass
            cert = certificate_status(d)
            if not cert.passed:
                log.warning("%s: %s certificate: %s", d, cert.state, cert.why)
        backend = registry.backend(kwargs.get("backend", "onnx_cpu"))
        lm = _lm_file(lm_dir, backend, stateful, dec_dir)
        # both models of one kind: IR files where both are there, else the ONNX files
        decoder = _decoder_file(dec_dir, backend) if lm.suffix == backend.suffix else dec_dir / f"{DECODER_FILE}.onnx"
        return cls(lm, decoder, **kwargs)

    @classmethod
    def _from_bundle(cls, d: Path, precision: str | None, objective: str, kwargs: dict) -> SopranoTTS:
        from pipeline_lib import recommend
        from pipeline_lib.runtime import bundle

        backend = registry.backend(kwargs.pop("backend", "onnx_cpu"))
        if backend.name != "onnx":
            raise InputError(f"{d}: a release bundle holds ONNX models; leave backend out (or use onnx)")
        recommend.check_objective(objective)
        v = bundle.variant(d, precision, objective)
        tts = cls(v.lm, v.decoder, backend=backend.runtime, tokenizer_path=d / TOKENIZER_FILE, **kwargs)
        tts.choice = registry.choice(v.label)
        return tts

    @classmethod
    def _from_root(cls, root: Path, precision: str, objective: str, stateful: bool, kwargs: dict) -> SopranoTTS:
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
        tts = cls(_lm_file(dirs[LM_DIR], lm_b, stateful), _decoder_file(dirs[DECODER_DIR], dec_b),
                  backend=lm_b.runtime, decoder_backend=dec_b.runtime, **kwargs)
        tts.choice = choice
        return tts

    @staticmethod
    def _positive_int(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InputError(f"{name} must be an int >= 1, got {v!r}")
        return int(v)

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer.encode(prompt).ids)

    def prepare(self, texts: Sequence[str]) -> tuple[list[SentencePrompt], list[list[int]]]:
        """Sentence prompts (each at most max_prompt_tokens tokens) and their token ids."""
        try:
            prompts = fit_to_positions(prepare_prompts(list(texts)), self.count_tokens, self.max_prompt_tokens)
        except InputError:
            raise
        except ValueError as exc:  # max_prompt_tokens too small for any text
            raise InputError(str(exc)) from exc
        ids = [e.ids for e in self.tokenizer.encode_batch([p.prompt for p in prompts])]
        return prompts, ids

    def _decode(self, hidden: np.ndarray) -> tuple[np.ndarray, float, float]:
        """[B, T, H] hidden states -> [B, (T-1) * samples_per_token] audio, decoder and ISTFT seconds."""
        t0 = time.perf_counter()
        spec = self.decoder.run(np.ascontiguousarray(hidden.transpose(0, 2, 1), dtype=np.float32))
        t1 = time.perf_counter()
        audio = istft(spec, self.istft_config, use_torch=self.use_torch_istft)
        return audio, t1 - t0, time.perf_counter() - t1

    def decode_window(self, hidden: np.ndarray, start: int, end: int) -> np.ndarray:
        """The streaming window cut, shared by `infer_stream` and the server's scheduler: the audio of
        sample blocks [start, end) of one sentence (block j lies between tokens j and j + 1), from
        `hidden` [n, H], the sentence's hidden vectors so far. The decoder sees `stream_context`
        tokens on each side where they exist ([max(0, start - ctx), min(end + ctx, n - 1)]), so a
        block is exact (equal to decoding the whole sentence) once token j + 1 + ctx exists, or the
        sentence ended."""
        ctx, spt = self.stream_context, self.samples_per_token
        a, last = max(0, start - ctx), min(end + ctx, len(hidden) - 1)
        audio, _, _ = self._decode(hidden[None, a:last + 1])
        return audio[0, (start - a) * spt:(end - a) * spt]

    def _decode_sentences(self, hidden: list[np.ndarray]) -> tuple[list[np.ndarray], float, float]:
        """Per sentence audio; sentences of equal length are decoded together (no padding)."""
        audio: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(hidden)
        t_dec = t_istft = 0.0
        by_len: dict[int, list[int]] = {}
        for i, h in enumerate(hidden):
            if len(h) >= 2:  # 0 or 1 hidden vectors: no samples
                by_len.setdefault(len(h), []).append(i)
        for n, idx in by_len.items():
            for start in range(0, len(idx), self.decoder_batch_size):
                group = idx[start:start + self.decoder_batch_size]
                out, td, ti = self._decode(np.stack([hidden[i] for i in group]))
                t_dec, t_istft = t_dec + td, t_istft + ti
                keep = (n - 1) * self.samples_per_token
                for row, i in enumerate(group):
                    audio[i] = out[row, out.shape[1] - keep:]
                del out
                self._release_heap()
        return audio, t_dec, t_istft

    def _release_heap(self) -> None:
        """low_memory: hand freed heap pages back to the OS between passes (see release_free_heap)."""
        if self.low_memory:
            release_free_heap()

    def _run(
        self,
        texts: Sequence[str],
        max_new_tokens: int,
        params: SamplingParams,
        seed: int | None,
        batch_size: int | None,
        hallucination_guard: bool,
    ) -> dict[str, Any]:
        t_start = time.perf_counter()
        seed = validate_seed(seed)
        max_new_tokens = validate_max_new_tokens(max_new_tokens, self.spec.max_position_embeddings)
        batch_size = self._positive_int("batch_size", batch_size if batch_size is not None else self.batch_size)
        prompts, ids = self.prepare(texts)
        gens = None if params.greedy else row_generators(seed, range(len(prompts)))
        hidden: list[np.ndarray] = []
        reasons: list[str] = []
        lm_t = GenerationTimings()
        t_lm = time.perf_counter()
        with self.lm.stream() as lm:  # this call's own binding / infer request (see backends)
            for start in range(0, len(prompts), batch_size):
                out = generate(
                    lm, self.spec, ids[start:start + batch_size], max_new_tokens=max_new_tokens, params=params,
                    generators=None if gens is None else gens[start:start + batch_size],
                    hallucination_guard=hallucination_guard,
                )
                hidden += out.hidden
                reasons += out.finish_reasons
                lm_t.add(out.timings)
                del out
                self._release_heap()
        t_lm = time.perf_counter() - t_lm
        sentence_audio, t_dec, t_istft = self._decode_sentences(hidden)
        per_text: list[list[np.ndarray]] = [[] for _ in texts]
        for p, a in zip(prompts, sentence_audio):  # prompts are in (text, sentence) order
            per_text[p.text_index].append(a)
        audios = [np.concatenate(a).astype(np.float32, copy=False) if a else np.zeros(0, np.float32) for a in per_text]
        timings = {
            "prefill": lm_t.prefill_s,
            "per_token": lm_t.per_step_s,
            "lm_total": t_lm,
            "decoder": t_dec,
            "istft": t_istft,
            "total": time.perf_counter() - t_start,
        }
        self.last_timings = timings
        return {
            "audios": audios,
            "sample_rate": self.sample_rate,
            "num_tokens": int(sum(len(h) for h in hidden)),
            "sentences": len(prompts),
            "sentence_texts": [p.text for p in prompts],
            "hidden_lengths": [len(h) for h in hidden],
            "finish_reasons": reasons,
            "timings": timings,
        }

    def synthesize(
        self,
        text: str,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = DEFAULTS.temperature,
        top_p: float = DEFAULTS.top_p,
        top_k: int = DEFAULTS.top_k,
        repetition_penalty: float = DEFAULTS.repetition_penalty,
        seed: int | None = None,
        batch_size: int | None = None,
        hallucination_guard: bool = False,
    ) -> dict[str, Any]:
        """Speak `text`. Returns audio (float32 mono), sample_rate, num_tokens (audio tokens
        generated), sentences (count), finish_reasons (per sentence: "stop", "length" or
        "hallucination"), hidden_lengths, and timings in seconds (prefill, per_token = mean decode
        step, lm_total, decoder, istft, total)."""
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        res = self._run([text], max_new_tokens, params, seed, batch_size, hallucination_guard)
        res["audio"] = res.pop("audios")[0]
        return res

    def infer(
        self,
        text: str,
        out_path: str | Path | None = None,
        top_p: float = DEFAULTS.top_p,
        temperature: float = DEFAULTS.temperature,
        repetition_penalty: float = DEFAULTS.repetition_penalty,
        **kwargs: Any,
    ) -> np.ndarray:
        """Upstream-compatible: audio as a float32 array; also a 16-bit WAV at out_path if given.
        An out_path that cannot be written (no such folder, a folder) is an InputError before synthesis."""
        if out_path:
            from pipeline_lib.fsutil import check_output_file

            check_output_file(out_path, "out_path")
        audio = self.synthesize(text, top_p=top_p, temperature=temperature, repetition_penalty=repetition_penalty, **kwargs)["audio"]
        if out_path:
            write_wav(out_path, audio, self.sample_rate)
        return audio

    def infer_batch(
        self,
        texts: Sequence[str],
        out_dir: str | Path | None = None,
        top_p: float = DEFAULTS.top_p,
        temperature: float = DEFAULTS.temperature,
        repetition_penalty: float = DEFAULTS.repetition_penalty,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        top_k: int = DEFAULTS.top_k,
        seed: int | None = None,
        batch_size: int | None = None,
        hallucination_guard: bool = False,
    ) -> list[np.ndarray]:
        """Upstream-compatible: one float32 array per text (all sentences share LM batches);
        writes out_dir/{i}.wav if out_dir is given (created if missing; one that cannot be is an
        InputError before synthesis)."""
        if isinstance(texts, str):
            raise InputError("infer_batch expects a list of texts; use infer() for one text")
        if out_dir:
            from pipeline_lib.fsutil import check_output_dir, check_output_file

            check_output_dir(out_dir, "out_dir")
            if Path(out_dir).is_dir():
                for i in range(len(texts)):
                    check_output_file(Path(out_dir) / f"{i}.wav", "out_dir file")
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        audios = self._run(list(texts), max_new_tokens, params, seed, batch_size, hallucination_guard)["audios"]
        if out_dir:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            for i, a in enumerate(audios):
                write_wav(out / f"{i}.wav", a, self.sample_rate)
        return audios

    def infer_stream(
        self,
        text: str,
        chunk_size: int = 1,
        top_p: float = DEFAULTS.top_p,
        temperature: float = DEFAULTS.temperature,
        repetition_penalty: float = DEFAULTS.repetition_penalty,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        top_k: int = DEFAULTS.top_k,
        seed: int | None = None,
        hallucination_guard: bool = False,
    ) -> Iterator[np.ndarray]:
        """Yield float32 audio chunks of `chunk_size` tokens (chunk_size * samples_per_token samples;
        a sentence's last chunk holds the rest) as soon as generation allows. Lossless: the chunks
        concatenate to `infer`'s audio for the same text, settings and seed."""
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        chunk_size = self._positive_int("chunk_size", chunk_size)
        seed = validate_seed(seed)
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        max_new_tokens = validate_max_new_tokens(max_new_tokens, self.spec.max_position_embeddings)
        prompts, ids = self.prepare([text])  # errors surface here, before the first next()
        gens = None if params.greedy else row_generators(seed, range(len(prompts)))
        return self._stream(ids, gens, chunk_size, max_new_tokens, params, hallucination_guard)

    def _stream(
        self,
        ids: list[list[int]],
        gens: list[np.random.Generator] | None,
        chunk_size: int,
        max_new_tokens: int,
        params: SamplingParams,
        hallucination_guard: bool,
    ) -> Iterator[np.ndarray]:
        with self.lm.stream() as lm:  # this stream's own binding / infer request (see backends)
            yield from self._stream_rows(lm, ids, gens, chunk_size, max_new_tokens, params, hallucination_guard)

    def _stream_rows(
        self,
        lm: Any,
        ids: list[list[int]],
        gens: list[np.random.Generator] | None,
        chunk_size: int,
        max_new_tokens: int,
        params: SamplingParams,
        hallucination_guard: bool,
    ) -> Iterator[np.ndarray]:
        ctx = self.stream_context
        for row, prompt in enumerate(ids):
            buf = np.zeros((max_new_tokens, self.spec.hidden_size), dtype=np.float32)
            n = 0  # hidden vectors so far
            done = 0  # sample blocks (one per pair of neighbouring tokens) already yielded

            for ev in generate_steps(
                lm, self.spec, [prompt], max_new_tokens=max_new_tokens, params=params,
                generators=None if gens is None else [gens[row]], hallucination_guard=hallucination_guard,
            ):
                if ev.keep[0]:
                    buf[n] = ev.hidden[0]
                    n += 1
                if ev.finished:
                    break
                while n - 1 - ctx - done >= chunk_size:  # block j is exact once token j + 1 + ctx exists
                    yield self.decode_window(buf[:n], done, done + chunk_size)
                    done += chunk_size
            if n - 1 > done:
                yield self.decode_window(buf[:n], done, n - 1)

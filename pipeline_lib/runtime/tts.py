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
import time
import wave
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline_lib import registry
from pipeline_lib.audio.istft import IstftConfig, istft
from pipeline_lib.cpuinfo import default_threads, warn_if_oversubscribed
from pipeline_lib.errors import InputError, MissingBackendError, ModelFileError
from pipeline_lib.registry import (
    DECODER_CONFIG_SUFFIX,
    DECODER_FILE,
    LM_CONFIG_SUFFIX,
    LM_FILE,
    TOKENIZER_FILE,
    normalize_backend,
)
from pipeline_lib.runtime import model_files
from pipeline_lib.runtime.backends import OpenVinoLM, load_backends, release_free_heap, require_file
from pipeline_lib.runtime.generate import LMSpec, validate_max_new_tokens
from pipeline_lib.runtime.rules import DEFAULT_GUARD, DEFAULT_HOLDBACK, GuardSettings, seed_base
from pipeline_lib.runtime.sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULTS, SamplingParams, validate_seed
from pipeline_lib.runtime.sentences import generate_sentences, stream_sentences
from pipeline_lib.text import SentencePrompt, fit_to_positions, prepare_prompts

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




class SopranoTTS:
    """Soprano text-to-speech on CPU from exported models.

    lm_path / decoder_path: the LM step model and the pre-ISTFT decoder (.onnx; .xml IR also for
    backend "openvino_cpu"). Their JSON configs and tokenizer.json are found beside them (tokenizer:
    beside the LM, then beside the decoder) unless given. `max_prompt_tokens` (default
    max_position_embeddings // 2 = 256) bounds a sentence prompt; longer sentences are cut at
    sentence marks, clause marks or spaces into several prompts, so text of any length is spoken.
    `low_memory` (default True): ONNX Runtime without its CPU memory arena and with a fixed glibc mmap
    threshold, so freed load-time and batch buffers go back to the OS (80M model: 655 instead of
    930-960 MiB peak over the benchmark, at the same speed; see ort_backend.ort_session), and one sentence per
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
        model_files.check_not_swapped(self.lm_path, self.decoder_path)
        lm_cfg = Path(lm_config_path) if lm_config_path else model_files.config_beside(self.lm_path, LM_CONFIG_SUFFIX, LM_FILE)
        dec_cfg = (Path(decoder_config_path) if decoder_config_path
                   else model_files.config_beside(self.decoder_path, DECODER_CONFIG_SUFFIX, DECODER_FILE))
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
        self.tokenizer = model_files.load_tokenizer(self.tokenizer_path, self.spec)

        if num_threads is None:
            num_threads = default_threads()
        self.num_threads = num_threads
        warn_if_oversubscribed(num_threads)
        self.low_memory = bool(low_memory)
        self.lm, self.decoder = load_backends(
            self.backend, self.lm_path, self.decoder_path, num_threads, self.low_memory, static_decode_width,
            self.decoder_backend,
        )
        model_files.check_names("input", self.lm_path, lm_cfg, self.spec.input_names, self.lm.input_names)
        model_files.check_names("output", self.lm_path, lm_cfg, self.spec.output_names, self.lm.output_names)
        self.spec.check_interface()
        model_files.check_names("input", self.decoder_path, dec_cfg, [dec_in], self.decoder.input_names)
        model_files.check_names("output", self.decoder_path, dec_cfg, [dec_out], self.decoder.output_names)

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
        for _ in self._stream(ids, 0, 1, n, DEFAULTS, DEFAULT_GUARD):
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
            lm, decoder, kwargs, choice = model_files.bundle_files(d, precision, objective, kwargs)
        elif precision is not None:
            lm, decoder, kwargs, choice = model_files.root_files(d, precision, objective, stateful, kwargs)
        else:
            lm, decoder, kwargs, choice = model_files.folder_files(d, stateful, kwargs)
        tts = cls(lm, decoder, **kwargs)
        if choice is not None:
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
        guard: GuardSettings,
    ) -> dict[str, Any]:
        t_start = time.perf_counter()
        seed = validate_seed(seed)
        max_new_tokens = validate_max_new_tokens(max_new_tokens, self.spec.max_position_embeddings)
        batch_size = self._positive_int("batch_size", batch_size if batch_size is not None else self.batch_size)
        prompts, ids = self.prepare(texts)
        t_lm = time.perf_counter()
        with self.lm.stream() as lm:  # this call's own binding / infer request (see backends)
            hidden, reasons, retries, lm_t = generate_sentences(
                lm, self.spec, ids, max_new_tokens=max_new_tokens, params=params, base=seed_base(seed),
                batch_size=batch_size, guard=guard, after_pass=self._release_heap,
            )
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
            "retries": int(sum(retries)),
            "sentence_retries": retries,
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
        retries: int = DEFAULT_GUARD.retries,
    ) -> dict[str, Any]:
        """Speak `text`. Returns audio (float32 mono), sample_rate, num_tokens (audio tokens
        generated), sentences (count), finish_reasons (per sentence: "stop", "length" or
        "hallucination"), hidden_lengths, retries (sentences generated again, in all) and
        sentence_retries (per sentence), and timings in seconds (prefill, per_token = mean decode
        step, lm_total, decoder, istft, total).

        `hallucination_guard` (or `retries` > 0, as upstream's `retries`) runs the guard
        (runtime.rules): a flagged sentence is generated again up to `retries` times, each retry a
        new draw (a greedy call's retries sample at rules.RETRY_TEMPERATURE); a sentence still
        flagged keeps only its audio before the run of near-repeats (finish reason "hallucination")."""
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        res = self._run([text], max_new_tokens, params, seed, batch_size, GuardSettings.of(hallucination_guard, retries))
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
        retries: int = DEFAULT_GUARD.retries,
    ) -> list[np.ndarray]:
        """Upstream-compatible: one float32 array per text (all sentences share LM batches);
        writes out_dir/{i}.wav if out_dir is given (created if missing; one that cannot be is an
        InputError before synthesis). `hallucination_guard` / `retries`: as `synthesize`."""
        if isinstance(texts, str):
            raise InputError("infer_batch expects a list of texts; use infer() for one text")
        if out_dir:
            from pipeline_lib.fsutil import check_output_dir, check_output_file

            check_output_dir(out_dir, "out_dir")
            if Path(out_dir).is_dir():
                for i in range(len(texts)):
                    check_output_file(Path(out_dir) / f"{i}.wav", "out_dir file")
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        guard = GuardSettings.of(hallucination_guard, retries)
        audios = self._run(list(texts), max_new_tokens, params, seed, batch_size, guard)["audios"]
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
        retries: int = DEFAULT_GUARD.retries,
        holdback: str = DEFAULT_HOLDBACK,
    ) -> Iterator[np.ndarray]:
        """Yield float32 audio chunks of `chunk_size` tokens (chunk_size * samples_per_token samples;
        a sentence's last chunk holds the rest) as soon as generation allows. Lossless: the chunks
        concatenate to `infer`'s audio for the same text, settings and seed.

        With the guard on (`hallucination_guard`, or `retries` > 0), `holdback` (rules.HOLDBACKS)
        decides what of a running sentence may be yielded, so that no block of a flagged run is
        ever yielded; a flagged sentence none of which was yielded is generated again (up to
        `retries` times), otherwise it ends at its clean blocks (close to, not equal to, `infer`'s
        cut decode at that edge)."""
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        chunk_size = self._positive_int("chunk_size", chunk_size)
        seed = validate_seed(seed)
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        guard = GuardSettings.of(hallucination_guard, retries, holdback)
        max_new_tokens = validate_max_new_tokens(max_new_tokens, self.spec.max_position_embeddings)
        prompts, ids = self.prepare([text])  # errors surface here, before the first next()
        return self._stream(ids, seed_base(seed), chunk_size, max_new_tokens, params, guard)

    def _stream(
        self,
        ids: list[list[int]],
        base: int,
        chunk_size: int,
        max_new_tokens: int,
        params: SamplingParams,
        guard: GuardSettings,
    ) -> Iterator[np.ndarray]:
        with self.lm.stream() as lm:  # this stream's own binding / infer request (see backends)
            yield from stream_sentences(
                lm, self.spec, ids, base, chunk_size, max_new_tokens, params, guard, self.stream_context, self.decode_window,
            )

"""The engines the benchmark wraps: one per backend, each with one interface:

    engine.synthesize(text, max_new_tokens) -> Synthesis   (audio + per-stage times)
    engine.first_chunk_s(text)               -> float | None (streaming: time to the first chunk)
    engine.batch(texts, max_new_tokens)      -> (audio_s, wall_s) | None

- onnx / openvino: the runtime (`pipeline_lib.runtime.SopranoTTS`) on exported / converted files.
- torch: our torch reference (pipeline_lib.model), the same greedy KV-cache loop in torch.
- upstream: the `soprano-tts` package (`soprano.tts.SopranoTTS`, transformers backend). By itself it
  generates until [STOP] or 512 tokens (with random weights: 512); the engine wraps its model's
  `generate` so that `max_new_tokens` is the bench's token count, the same as ours: the comparison
  is token for token (`infer`, `infer_batch`). Its streaming path (`infer_stream`) has its own loop,
  unchanged; the first chunk comes long before 512 tokens anyway.

`ENGINES` maps a `--backend` to its engine class, built from a `BenchConfig`
(pipeline_lib.bench.config); `measure` (pipeline_lib.bench.measure) times the engine's calls.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pipeline_lib import registry
from pipeline_lib.bench.config import BenchConfig
from pipeline_lib.errors import InputError, MissingBackendError, SopranoOnnxError
from pipeline_lib.registry import BACKENDS


NAN = float("nan")


@dataclass
class Synthesis:
    """One synthesize() call: audio and the per-stage times (seconds; NaN where not measured)."""

    audio_samples: int
    sample_rate: int
    num_tokens: int
    stop_emitted: bool = False
    prefill_s: float = NAN
    per_token_s: list[float] = field(default_factory=list)
    lm_s: float = NAN
    decoder_s: float = NAN
    istft_s: float = NAN
    wall_s: float = NAN

    @property
    def audio_s(self) -> float:
        return self.audio_samples / self.sample_rate


def _seconds(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return NAN
    return v


def _num_samples(audio: Any) -> int:
    if audio is None:
        return 0
    if hasattr(audio, "detach"):  # torch tensor
        audio = audio.detach().cpu().numpy()
    return int(np.asarray(audio).shape[-1]) if np.ndim(audio) else 0


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def resolve_model_file(path: Path, stem: str | tuple[str, ...], backend: str) -> Path:
    """A model file as given, or the one in a folder: the backend's own kind first (openvino: an IR,
    .xml), then ONNX; the `stem` names (the export's file names, in order of preference) first, then the
    folder's only model file of that kind."""
    path = Path(path)
    if not path.is_dir():
        return path
    stems = (stem,) if isinstance(stem, str) else tuple(stem)
    exts = tuple(dict.fromkeys((registry.backend(backend).suffix, ".onnx")))
    for ext in exts:
        for name in stems:
            if (path / f"{name}{ext}").is_file():
                return path / f"{name}{ext}"
        found = sorted(path.glob(f"*{ext}"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InputError(f"{path}: several {ext} files ({', '.join(f.name for f in found)}); pass the file itself")
    raise InputError(f"{path}: no {' or '.join(exts)} model file in this folder")


class _TimedLM:
    """Wraps the runtime's LM backend to time every forward: start/end per call, prefill flagged
    (a call of several tokens: decode steps feed one token per row, prompts have more). Everything else
    is delegated."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: list[tuple[float, float, bool]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def stream(self) -> Iterator[_TimedLM]:
        """The runtime leases a context per generation: time that one, into the same record."""
        with self._inner.stream() as ctx:
            timed = _TimedLM(ctx)
            timed.calls = self.calls
            yield timed

    def run(self, feed: Any) -> Any:
        prefill = feed["input_ids"].shape[1] > 1  # a prompt (the fused graph's mask is as wide as its buffer)
        start = time.perf_counter()
        out = self._inner.run(feed)
        self.calls.append((start, time.perf_counter(), prefill))
        return out

    def per_token_s(self) -> list[float]:
        """Per generated token: start of a decode forward to the start of the next one (sampling,
        cache handling and the forward itself); the last forward of a sequence counts by its own time."""
        out: list[float] = []
        for (s0, e0, p0), (s1, _, p1) in zip(self.calls, self.calls[1:] + [(math.nan, math.nan, True)]):
            if p0:
                continue
            out.append(e0 - s0 if p1 else s1 - s0)
        return out


class RuntimeEngine:
    """The runtime on ONNX Runtime or OpenVINO files (pipeline_lib.runtime.SopranoTTS)."""

    def __init__(self, cfg: BenchConfig) -> None:
        try:
            from pipeline_lib.runtime.tts import SopranoTTS
        except ImportError as exc:
            raise MissingBackendError(
                f"--backend {cfg.backend}: the runtime (pipeline_lib.runtime.tts.SopranoTTS) cannot be imported: {exc}"
            ) from exc
        backend = registry.backend(cfg.backend)
        lm_stems = (registry.STATEFUL_FILE, registry.LM_FILE) if backend.stateful_lm else registry.LM_FILE  # stateful first
        dec_backend = registry.backend(cfg.decoder_backend or cfg.backend)
        lm = resolve_model_file(Path(cfg.lm), lm_stems, cfg.backend)
        decoder = resolve_model_file(Path(cfg.decoder), registry.DECODER_FILE, dec_backend.name)
        self.tts = SopranoTTS(lm, decoder, backend=backend.runtime, num_threads=cfg.threads,
                              decoder_backend=dec_backend.runtime)
        self.sample_rate = int(getattr(self.tts, "sample_rate", 32000))
        self.timed_lm = _TimedLM(self.tts.lm) if hasattr(self.tts, "lm") else None
        if self.timed_lm is not None:
            self.tts.lm = self.timed_lm

    def synthesize(self, text: str, max_new_tokens: int) -> Synthesis:
        if self.timed_lm is not None:
            self.timed_lm.calls.clear()
        start = time.perf_counter()
        out = self.tts.synthesize(text, max_new_tokens=max_new_tokens)
        wall = time.perf_counter() - start
        t = out.get("timings", {}) or {}
        if self.timed_lm is not None:
            per_token = self.timed_lm.per_token_s()
        else:  # the runtime reports the mean decode step only
            mean = _seconds(t.get("per_token"))
            per_token = [] if math.isnan(mean) else [mean]
        n = int(out.get("num_tokens", 0))
        reasons = out.get("finish_reasons") or []
        return Synthesis(
            audio_samples=_num_samples(out.get("audio")),
            sample_rate=int(out.get("sample_rate", self.sample_rate)),
            num_tokens=n,
            stop_emitted="stop" in reasons if reasons else n < max_new_tokens,
            prefill_s=_seconds(t.get("prefill")),
            per_token_s=per_token,
            lm_s=_seconds(t.get("lm_total")),
            decoder_s=_seconds(t.get("decoder")),
            istft_s=_seconds(t.get("istft")),
            wall_s=wall,
        )

    def first_chunk_s(self, text: str, max_new_tokens: int) -> float | None:
        stream = getattr(self.tts, "infer_stream", None)
        if stream is None:
            return None
        kwargs: dict[str, Any] = {"chunk_size": 1}
        if _accepts(stream, "max_new_tokens"):
            kwargs["max_new_tokens"] = max_new_tokens
        start = time.perf_counter()
        gen = stream(text, **kwargs)
        try:
            next(iter(gen))
        except StopIteration:
            return None
        finally:
            close = getattr(gen, "close", None)
            if close:
                close()
        return time.perf_counter() - start

    def batch(self, texts: Sequence[str], max_new_tokens: int) -> tuple[float, float] | None:
        fn = getattr(self.tts, "infer_batch", None)
        if fn is None:
            return None
        kwargs = {"max_new_tokens": max_new_tokens} if _accepts(fn, "max_new_tokens") else {}
        start = time.perf_counter()
        out = fn(list(texts), **kwargs)
        wall = time.perf_counter() - start
        samples = sum(_num_samples(item.get("audio") if isinstance(item, dict) else item) for item in out)
        return samples / self.sample_rate, wall


class TorchEngine:
    """Our torch reference: the LM step model with its KV cache, the decoder, torch.istft."""

    REPETITION_PENALTY = 1.2  # upstream's default, Hugging Face semantics

    def __init__(self, cfg: BenchConfig) -> None:
        import torch
        from tokenizers import Tokenizer

        from pipeline_lib.model import decoder as dec
        from pipeline_lib.model.lm import load_lm

        torch.set_num_threads(cfg.threads)
        ckpt = Path(cfg.lm)
        self.lm = load_lm(ckpt)
        self.decoder = dec.load_decoder(Path(cfg.decoder) if cfg.decoder else ckpt / "decoder.pth",
                                        expected_input_channels=self.lm.cfg.hidden_size)
        self.tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        self.stop_id = self.tokenizer.token_to_id("[STOP]")
        if self.stop_id is None:
            raise SopranoOnnxError(f"{ckpt / 'tokenizer.json'}: no [STOP] token; not a Soprano tokenizer.")
        self.sample_rate = self.decoder.dims.sample_rate
        self._spectrum_to_audio = dec.spectrum_to_audio

    def _prompt_ids(self, text: str) -> list[list[int]]:
        from pipeline_lib.text import prepare_prompts

        prompts = [self.tokenizer.encode(p.prompt, add_special_tokens=False).ids for p in prepare_prompts([text])]
        limit = self.lm.cfg.max_position_embeddings
        for ids in prompts:
            if not ids:
                raise InputError("the prompt tokenised to nothing")
            if len(ids) >= limit:
                raise InputError(f"a prompt of {len(ids)} tokens does not fit the {limit} positions; shorten the text")
        return prompts

    def _generate(self, ids: list[int], max_new_tokens: int) -> tuple[Any, float, list[float], bool]:
        """Greedy decoding with repetition penalty: (hidden [1, C, n], prefill_s, per-token s, stopped)."""
        import torch

        from pipeline_lib.model.lm import extend_cache

        lm = self.lm
        max_new = min(max_new_tokens, lm.cfg.max_position_embeddings - len(ids))
        seen = torch.zeros(lm.cfg.vocab_size, dtype=torch.bool)
        seen[torch.tensor(ids)] = True
        inp = torch.tensor([ids])
        mask = torch.ones(1, len(ids), dtype=torch.int64)
        pos = torch.arange(len(ids))[None]
        start = time.perf_counter()
        logits, hidden, *past = lm(inp, mask, pos, *lm.empty_cache(1))  # new keys / values: the cache
        prefill = time.perf_counter() - start
        hiddens, per_token, stopped = [], [], False
        for k in range(max_new):
            start = time.perf_counter()  # a token's time: choosing it, then its forward step
            scores = logits[0, -1].clone()
            s = scores[seen]
            scores[seen] = torch.where(s < 0, s * self.REPETITION_PENALTY, s / self.REPETITION_PENALTY)
            tok = int(scores.argmax())
            if tok == self.stop_id:
                stopped = True
                break
            hiddens.append(hidden[:, -1])
            seen[tok] = True
            if k == max_new - 1:
                break
            n = mask.shape[1]
            mask = torch.ones(1, n + 1, dtype=torch.int64)
            logits, hidden, *new = lm(torch.tensor([[tok]]), mask, torch.tensor([[n]]), *past)
            past = extend_cache(past, new)
            per_token.append(time.perf_counter() - start)
        return torch.stack(hiddens, dim=2), prefill, per_token, stopped  # [1, C, n]

    def synthesize(self, text: str, max_new_tokens: int) -> Synthesis:
        import torch

        wall_start = time.perf_counter()
        prefill = lm_s = dec_s = istft_s = 0.0
        per_token: list[float] = []
        samples = tokens = 0
        stopped = False
        with torch.inference_mode():
            for ids in self._prompt_ids(text):
                start = time.perf_counter()
                hidden, p, steps, stop = self._generate(ids, max_new_tokens)
                lm_s += time.perf_counter() - start
                prefill += p
                per_token += steps
                stopped |= stop
                tokens += hidden.shape[2]
                if hidden.shape[2] < 2:
                    continue  # one hidden vector decodes to no audio
                start = time.perf_counter()
                spec = self.decoder(hidden)
                dec_s += time.perf_counter() - start
                start = time.perf_counter()
                audio = self._spectrum_to_audio(spec, self.decoder.dims.n_fft, self.decoder.dims.hop_length)
                istft_s += time.perf_counter() - start
                samples += int(audio.shape[-1])
        return Synthesis(audio_samples=samples, sample_rate=self.sample_rate, num_tokens=tokens, stop_emitted=stopped,
                         prefill_s=prefill, per_token_s=per_token, lm_s=lm_s, decoder_s=dec_s, istft_s=istft_s,
                         wall_s=time.perf_counter() - wall_start)

    def first_chunk_s(self, text: str, max_new_tokens: int) -> float | None:
        return None

    def batch(self, texts: Sequence[str], max_new_tokens: int) -> tuple[float, float] | None:
        return None


class UpstreamEngine:
    """The upstream package on the checkpoint directory (transformers backend, CPU)."""

    def __init__(self, cfg: BenchConfig) -> None:
        try:
            import torch
            from soprano.tts import SopranoTTS
        except ImportError as exc:
            raise MissingBackendError(
                f"--backend upstream needs the soprano-tts package (pip install --no-deps soprano-tts): {exc}"
            ) from exc
        torch.set_num_threads(cfg.threads)

        class _NoWarmup(SopranoTTS):
            """Upstream's constructor runs a warm-up synthesis; skip it so load time is load time only."""

            loading = True

            def infer(self, *args: Any, **kwargs: Any) -> Any:
                return None if self.loading else super().infer(*args, **kwargs)

        if cfg.lm is None or not Path(cfg.lm).is_dir():
            raise InputError(f"--backend upstream: --lm must be the checkpoint directory, got {cfg.lm}")
        self.tts = _NoWarmup(device="cpu", backend="transformers", model_path=str(cfg.lm))
        self.tts.loading = False
        self.sample_rate = 32000
        self._times: dict[str, float] = {}
        self._responses: list[dict] = []
        pipeline_infer = self.tts.pipeline.infer
        decoder = self.tts.decoder

        def timed_infer(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = pipeline_infer(*args, **kwargs)
            self._times["lm"] = self._times.get("lm", 0.0) + time.perf_counter() - start
            self._responses.extend(out)
            return out

        self.tts.pipeline.infer = timed_infer
        original_forward = decoder.forward

        def timed_forward(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = original_forward(*args, **kwargs)
            self._times["decoder"] = self._times.get("decoder", 0.0) + time.perf_counter() - start
            return out

        decoder.forward = timed_forward
        # Token for token: upstream's pipeline asks generate() for 512 new tokens; ask for ours.
        self.max_new_tokens = int(cfg.num_tokens)
        model = self.tts.pipeline.model
        original_generate = model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            kwargs["max_new_tokens"] = self.max_new_tokens
            return original_generate(*args, **kwargs)

        model.generate = generate

    def synthesize(self, text: str, max_new_tokens: int) -> Synthesis:
        self.max_new_tokens = int(max_new_tokens)
        self._times.clear()
        self._responses.clear()
        start = time.perf_counter()
        audio = self.tts.infer(text)
        wall = time.perf_counter() - start
        tokens = sum(int(r["hidden_state"].shape[0]) for r in self._responses)
        stopped = any(r.get("finish_reason") == "stop" for r in self._responses)
        return Synthesis(audio_samples=_num_samples(audio), sample_rate=self.sample_rate, num_tokens=tokens,
                         stop_emitted=stopped, lm_s=self._times.get("lm", NAN),
                         decoder_s=self._times.get("decoder", NAN), wall_s=wall)

    def first_chunk_s(self, text: str, max_new_tokens: int) -> float | None:
        """Upstream's `infer_stream` (chunk_size=1): call to its first yielded chunk."""
        import contextlib
        import io

        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its own latency line
            gen = self.tts.infer_stream(text, chunk_size=1)
            try:
                next(iter(gen))
            except StopIteration:
                return None
            finally:
                gen.close()
        return time.perf_counter() - start

    def batch(self, texts: Sequence[str], max_new_tokens: int) -> tuple[float, float] | None:
        """Upstream's `infer_batch` on the texts (its LM batches all sentences; decoder in batches)."""
        self.max_new_tokens = int(max_new_tokens)
        start = time.perf_counter()
        out = self.tts.infer_batch(list(texts))
        wall = time.perf_counter() - start
        return sum(_num_samples(a) for a in out) / self.sample_rate, wall


# Every registry backend runs in the runtime; the references (registry.REFERENCES) have engines of their own.
ENGINES: dict[str, Callable[[BenchConfig], Any]] = {
    **{b: RuntimeEngine for b in BACKENDS},
    "torch": TorchEngine,
    "upstream": UpstreamEngine,
}

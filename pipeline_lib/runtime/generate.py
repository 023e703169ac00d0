"""The LM loop in NumPy: batched prefill, then one-token decode steps over an explicit KV cache.

* Prefill runs each prompt alone (see `_prefill`), and the rows' caches are gathered into one
  KVCache (runtime.kv_cache has the contract: each row's tokens in its columns [0, len)); each
  row's positions count its own tokens only.
* Each decode step feeds the sampled token of every still-running row with the KV cache as
  `past_*` inputs. A row stops on its own by rules.RowRules (the one stop / length / guard rule,
  shared with the server's scheduler): at [STOP] (finish reason "stop"),
  after `max_new_tokens` tokens ("length") or, with the hallucination guard on, when its hidden
  states repeat ("hallucination"). Finished rows leave the batch at once (the cache arrays are
  sliced to the running rows, and narrowed to the longest of them), so they cost nothing afterwards.
* The KV cache (`KVCache`) lives in preallocated arrays whose width grows in multiples of
  `kv_bucket` columns (a bucket at a time for the traced graph, half its width for the in-place one:
  KVCache._grown_width); the unused columns are masked out (attention_mask 0), which leaves every
  attention result unchanged (masked scores get exactly zero weight). Per step, the new token's
  key and value go into each row's next column: the fused graph writes them itself (in-place
  buffers), the traced graph's `new_*` outputs are copied there.
  So the step model's input shapes change once per bucket instead of every step, and nothing is
  reallocated per step: with OpenVINO, a shape change re-plans the whole graph (measured on the
  80M LM: about 1.2-2.4 ms of a 5-7 ms int8 step).
  A backend may ask for a fixed width instead (`LMBackend.static_kv_width`): OpenVINO runs one-row
  decode steps of the plain IR on a fixed-shape compilation, so a one-row cache stays at that width,
  masked, until it is full.
* A stateful backend (`stateful` True: OpenVINO's stateful LM) keeps the keys and values itself:
  the prompts are prefilled in one left-padded call, and `StateCache` feeds only the attention mask
  and beam_idx (the rows that go on).
* Hidden-state convention (docs/design.md): for each generated token other than [STOP], the final-norm
  hidden state of the forward step that produced it; the first comes from the prompt's last
  position. So a row with n non-[STOP] tokens yields n hidden vectors.

Positions: a row uses prompt + generated positions. RoPE is computed from position_ids inside the
graph, so positions past max_position_embeddings still run (as upstream does: it allows a
512-token prompt plus 512 new tokens); the runtime keeps prompts to at most
max_position_embeddings // 2 tokens (see SopranoTTS) so rows stay close to the trained range.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline_lib.errors import InputError, ModelFileError
from pipeline_lib.registry import KV_CACHE_BUFFER, KV_CACHE_INPUTS, KV_CACHE_STATE
from pipeline_lib.runtime.backends import LMBackend
from pipeline_lib.runtime.kv_cache import KV_BUCKET, KVCache, StateCache, prefill_row
from pipeline_lib.runtime.rules import RowRules
from pipeline_lib.runtime.sampling import SamplingParams, select_tokens

__all__ = [
    "LMSpec",
    "KVCache",
    "StateCache",
    "KV_BUCKET",
    "StepEvent",
    "GenerationTimings",
    "GenerationOutput",
    "generate_steps",
    "generate",
    "validate_max_new_tokens",
]

@dataclass(frozen=True)
class LMSpec:
    """What the runtime needs from `soprano_lm_step_config.json`."""

    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    special_tokens: dict[str, int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    stateful: bool = False  # the KV cache is the backend's state (config "kv_cache": registry.KV_CACHE_STATE)
    # The model writes each step's keys / values into the past_* buffers itself (config "kv_cache":
    # registry.KV_CACHE_BUFFER; present_* outputs alias past_*; runtime.kv_cache has the contract).
    in_place: bool = False
    # Ids audio_token_first_id .. + audio_token_count - 1 are the audio tokens [0], [1], ... (None: the
    # config predates these fields; the tokenizer check then takes them from the tokenizer).
    audio_token_first_id: int | None = None
    audio_token_count: int | None = None

    @property
    def stop_id(self) -> int:
        return self.special_tokens["stop"]

    @property
    def past_names(self) -> list[str]:
        return [f"past_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def new_kv_names(self) -> list[str]:
        """The step model's outputs holding this call's keys / values (the cache grows by them); none
        where the backend keeps the cache as its state."""
        if self.stateful or self.in_place:
            return []
        return [f"new_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]

    @classmethod
    def from_json(cls, path: Path | str) -> LMSpec:
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(
                f"{path}: LM config JSON not found; it is written beside the ONNX file by "
                "`soprano-onnx export` (or `dvc repro`)."
            )
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            spec = cls(
                path=path,
                input_names=tuple(i["name"] for i in d["inputs"]),
                output_names=tuple(o["name"] for o in d["outputs"]),
                special_tokens={k: int(d["special_tokens"][k]) for k in ("unk", "text", "start", "stop")},
                num_layers=int(d["num_layers"]),
                num_kv_heads=int(d["num_kv_heads"]),
                head_dim=int(d["head_dim"]),
                hidden_size=int(d["hidden_size"]),
                vocab_size=int(d["vocab_size"]),
                max_position_embeddings=int(d["max_position_embeddings"]),
                stateful=d.get("kv_cache", KV_CACHE_INPUTS) == KV_CACHE_STATE,
                in_place=d.get("kv_cache", KV_CACHE_INPUTS) == KV_CACHE_BUFFER,
                audio_token_first_id=None if d.get("audio_token_first_id") is None else int(d["audio_token_first_id"]),
                audio_token_count=None if d.get("audio_token_count") is None else int(d["audio_token_count"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(
                f"{path}: not a valid LM step config ({type(exc).__name__}: {exc}); re-export it with "
                "`soprano-onnx export` (or `dvc repro`)."
            ) from exc
        return spec

    def check_interface(self) -> None:
        """The names the loop feeds and reads must all be there (for num_layers layers)."""
        needed = ["input_ids", "attention_mask", "position_ids"]
        needed += ["beam_idx"] if self.stateful else self.past_names
        produced = ["logits", "hidden_states", *self.new_kv_names]
        produced += [n.replace("past_", "present_") for n in self.past_names] if self.in_place else []
        missing = [n for n in needed if n not in self.input_names] + [n for n in produced if n not in self.output_names]
        if missing:
            raise ModelFileError(
                f"{self.path}: the LM step interface lacks {missing} (expected for {self.num_layers} layers); "
                "re-export with `soprano-onnx export` (or `dvc repro`)."
            )


@dataclass
class StepEvent:
    """One forward pass's result: row `rows[i]` (index into the prompts) got token `tokens[i]`,
    produced by hidden state `hidden[i]`. `keep[i]` is False for [STOP] (no hidden vector for it).
    `finished` lists the rows that ended at this step with their reason; `clean[i]` is row i's
    hidden vectors kept when the guard's counter was last 0 (rules.RowRules.clean)."""

    step: int
    rows: np.ndarray
    tokens: np.ndarray
    hidden: np.ndarray
    keep: np.ndarray
    finished: list[tuple[int, str]]
    clean: np.ndarray | None = None


@dataclass
class GenerationTimings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0

    @property
    def per_step_s(self) -> float:
        return self.decode_s / self.decode_steps if self.decode_steps else 0.0

    def add(self, other: GenerationTimings) -> None:
        self.prefill_s += other.prefill_s
        self.decode_s += other.decode_s
        self.decode_steps += other.decode_steps


@dataclass
class GenerationOutput:
    hidden: list[np.ndarray]  # per prompt: [n_i, hidden_size] float32
    tokens: list[np.ndarray]  # per prompt: generated ids, [STOP] included when it ended the row
    finish_reasons: list[str]
    timings: GenerationTimings = field(default_factory=GenerationTimings)
    clean: list[int] = field(default_factory=list)  # per prompt: rules.RowRules.clean when it ended


def validate_max_new_tokens(max_new_tokens: int, limit: int) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or not 1 <= max_new_tokens <= limit:
        raise InputError(f"max_new_tokens must be an int in 1..{limit} (the model's max_position_embeddings), got {max_new_tokens!r}")
    return int(max_new_tokens)


def _prefill_stateful(
    lm: LMBackend, spec: LMSpec, prompt_ids: Sequence[Sequence[int]], mask: np.ndarray, kv_bucket: int
) -> tuple[dict[str, np.ndarray], StateCache]:
    """A stateful backend: empty its state, then one call with the prompts left-padded (padding ids are
    masked out; results equal a call per row). Returns the last position's logits / hidden states."""
    lm.reset_state()
    ids = np.zeros(mask.shape, dtype=np.int64)
    for r, prompt in enumerate(prompt_ids):
        ids[r, mask.shape[1] - len(prompt):] = prompt
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(mask.cumsum(axis=1) - 1, 0),
            "beam_idx": np.arange(mask.shape[0], dtype=np.int32)}
    out = lm.run(feed)
    last = {name: np.array(out[name][:, -1:], dtype=np.float32) for name in ("logits", "hidden_states")}
    return last, StateCache(mask, kv_bucket)


def _cache_bucket(lm: LMBackend, rows: int, kv_bucket: int) -> int:
    """The cache's width step for `rows` rows: the backend's fixed decode width where it has one
    (OpenVINO's static one-row model: the cache stays at that width, masked, until it is full, then
    grows by that width and runs on the dynamic model), otherwise `kv_bucket`."""
    width = lm.static_kv_width(rows) if hasattr(lm, "static_kv_width") else None
    return int(width) if width else kv_bucket


def _left_pad_mask(prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """[B, longest prompt] attention mask of the prompts left-padded to one width (1 = real token)."""
    lengths = np.array([len(p) for p in prompt_ids])
    if lengths.min() < 1:
        raise InputError("every prompt needs at least one token")
    width = int(lengths.max())
    return (np.arange(width)[None, :] >= (width - lengths)[:, None]).astype(np.int64)


def _prefill(
    lm: LMBackend, spec: LMSpec, prompt_ids: Sequence[Sequence[int]], mask: np.ndarray, kv_bucket: int
) -> tuple[dict[str, np.ndarray], KVCache]:
    """Run each prompt alone (kv_cache.prefill_row) and gather the rows into one KVCache (each row's
    tokens in its columns [0, n)); returns the last position's logits / hidden states [B, 1, ...] and
    the cache.

    One row at a time rather than one padded batch: the results are the same (a padded batch gives
    each row the same attention over its own tokens), the time too (prefill is compute bound), but
    the runtime's transient memory scales with the rows x tokens of one call: ONNX Runtime's peak
    RSS rose by ~80-130 MiB for 8 prompts of ~45 tokens in one call (80M LM, fp32)."""
    batch, width = mask.shape
    logits = np.empty((batch, 1, spec.vocab_size), dtype=np.float32)
    hidden = np.empty((batch, 1, spec.hidden_size), dtype=np.float32)
    kv = [np.zeros((batch, spec.num_kv_heads, width, spec.head_dim), dtype=np.float32) for _ in spec.past_names]
    lens = [len(p) for p in prompt_ids]
    for r, prompt in enumerate(prompt_ids):
        row, logits[r, 0], hidden[r, 0] = prefill_row(lm, spec, prompt)
        for dst, src in zip(kv, row):
            dst[r, :, : lens[r]] = src[0]
    return {"logits": logits, "hidden_states": hidden}, KVCache(spec.past_names, kv, lens, kv_bucket, spec.in_place)


def generate_steps(
    lm: LMBackend,
    spec: LMSpec,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    generators: Sequence[np.random.Generator] | None = None,
    hallucination_guard: bool = False,
    timings: GenerationTimings | None = None,
    kv_bucket: int = KV_BUCKET,
) -> Iterator[StepEvent]:
    """Run the LM on a batch of tokenised prompts, yielding one `StepEvent` per forward pass."""
    max_new_tokens = validate_max_new_tokens(max_new_tokens, spec.max_position_embeddings)
    if not prompt_ids:
        return
    timings = timings if timings is not None else GenerationTimings()
    gens = list(generators) if generators is not None else None
    if not params.greedy and (gens is None or len(gens) != len(prompt_ids)):
        raise ValueError("sampling needs one numpy Generator per prompt")
    batch = len(prompt_ids)
    mask = _left_pad_mask(prompt_ids)  # the batch's left-padded layout (prefill runs row by row)
    seen = np.zeros((batch, spec.vocab_size), dtype=bool)
    for r, p in enumerate(prompt_ids):
        seen[r, np.asarray(p, dtype=np.int64)] = True
    next_pos = mask.sum(axis=1)  # position of the next token of each row
    rows = np.arange(batch)
    rules = RowRules(batch, spec.hidden_size, spec.stop_id, max_new_tokens, hallucination_guard)
    new_kv_names = spec.new_kv_names

    stateful = bool(getattr(lm, "stateful", False))
    if stateful != spec.stateful:
        raise ModelFileError(f"{spec.path}: the config says the KV cache is {'the backend state' if spec.stateful else 'fed as inputs'}, "
                             f"the model {'keeps it as state' if stateful else 'takes it as inputs'}; the model and config do not belong together.")
    t0 = time.perf_counter()
    prefill = _prefill_stateful if stateful else _prefill
    out, cache = prefill(lm, spec, prompt_ids, mask, _cache_bucket(lm, batch, kv_bucket))
    timings.prefill_s += time.perf_counter() - t0
    t_step = time.perf_counter()
    for step in range(max_new_tokens):
        logits = out["logits"][:, -1, :]
        hidden = np.array(out["hidden_states"][:, -1, :], dtype=np.float32)  # a copy: outputs may be reused
        tokens = select_tokens(logits, seen, params, gens)
        seen[np.arange(len(rows)), tokens] = True
        keep, reasons = rules.take(tokens, hidden)
        ended = [i for i, reason in enumerate(reasons) if reason]
        finished = [(int(rows[i]), reasons[i]) for i in ended]
        event = StepEvent(step, rows, tokens, hidden, keep, finished, np.array(rules.clean))
        if step > 0:
            timings.decode_s += time.perf_counter() - t_step
            timings.decode_steps += 1
        yield event
        if len(ended) == len(reasons):
            return
        t_step = time.perf_counter()
        if step > 0:
            cache.append([out[name] for name in new_kv_names])
        if ended:
            idx = np.array([i for i, reason in enumerate(reasons) if not reason])
            rows, tokens, next_pos, seen = rows[idx], tokens[idx], next_pos[idx], seen[idx]
            cache.select(idx, _cache_bucket(lm, len(idx), kv_bucket))
            if gens is not None:
                gens = [gens[i] for i in idx]
            rules.select(idx)
        feed = cache.feed()
        feed["input_ids"] = tokens[:, None]
        feed["position_ids"] = next_pos[:, None]
        next_pos = next_pos + 1
        # Hold no old outputs or cache arrays across the run: where shapes change (a new KV bucket),
        # the backend and KVCache replace their big arrays one by one, each freed once replaced.
        del out, logits
        out = lm.run(feed)
        del feed


def generate(
    lm: LMBackend,
    spec: LMSpec,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    generators: Sequence[np.random.Generator] | None = None,
    hallucination_guard: bool = False,
    kv_bucket: int = KV_BUCKET,
) -> GenerationOutput:
    """Run `generate_steps` to the end and collect each prompt's hidden states and tokens."""
    batch = len(prompt_ids)
    timings = GenerationTimings()
    max_new_tokens = validate_max_new_tokens(max_new_tokens, spec.max_position_embeddings)
    hidden = np.zeros((batch, max_new_tokens, spec.hidden_size), dtype=np.float32)
    tokens = np.zeros((batch, max_new_tokens), dtype=np.int64)
    n_tokens = np.zeros(batch, dtype=np.int64)
    n_hidden = np.zeros(batch, dtype=np.int64)
    reasons = [""] * batch
    clean = [0] * batch
    for ev in generate_steps(
        lm, spec, prompt_ids, max_new_tokens=max_new_tokens, params=params, generators=generators,
        hallucination_guard=hallucination_guard, timings=timings, kv_bucket=kv_bucket,
    ):
        tokens[ev.rows, ev.step] = ev.tokens
        n_tokens[ev.rows] += 1
        kept = ev.rows[ev.keep]
        hidden[kept, ev.step] = ev.hidden[ev.keep]  # [STOP] is always a row's last token
        n_hidden[kept] += 1
        for row, reason in ev.finished:
            reasons[row] = reason
            clean[row] = int(ev.clean[list(ev.rows).index(row)])
    return GenerationOutput(
        hidden=[hidden[r, : n_hidden[r]].copy() for r in range(batch)],
        tokens=[tokens[r, : n_tokens[r]].copy() for r in range(batch)],
        finish_reasons=reasons,
        timings=timings,
        clean=clean,
    )

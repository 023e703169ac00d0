"""Next-token selection in NumPy, vectorised over the batch, with Hugging Face semantics.

Order (as `transformers` generate applies its processors): repetition penalty on the raw logits,
then temperature, top-k, top-p, then a draw from the softmax. Temperature 0 is greedy: the argmax
of the penalised logits (top-k / top-p never remove the top token, so they cannot change it).

* repetition penalty (RepetitionPenaltyLogitsProcessor): for every id already seen in the prompt or
  the output, score < 0 -> score * p, else score / p. "Seen" is a boolean [B, V] mask that the
  caller keeps up to date, so no per-step Python sets.
* temperature (TemperatureLogitsWarper): scores / T.
* top-k (TopKLogitsWarper): keep the scores >= the k-th largest (ties at the k-th value stay).
* top-p (TopPLogitsWarper): sort ascending, drop the tokens whose cumulative probability is
  <= 1 - top_p, always keep the most likely one.

Each row draws from its own `numpy.random.Generator`, so a row's samples do not depend on which
other rows share its batch: batched and unbatched runs with the same seed agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline_lib.errors import InputError

__all__ = [
    "SamplingParams",
    "DEFAULTS",
    "DEFAULT_MAX_NEW_TOKENS",
    "apply_repetition_penalty",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "process_logits",
    "select_tokens",
    "row_generators",
    "validate_seed",
]


@dataclass(frozen=True)
class SamplingParams:
    """A row's sampling settings. The field defaults are the project's defaults, written here only
    (`DEFAULTS`): the library, the CLI, the scheduler and the web page read them from this class."""

    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.2

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
                raise InputError(f"{name} must be a finite number, got {v!r}")
            return float(v)

        if number("temperature") < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        top_p = number("top_p")
        if not 0.0 < top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise InputError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if number("repetition_penalty") <= 0:
            raise InputError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


DEFAULTS = SamplingParams()
# Audio tokens per sentence when a caller does not say (about 33 s of audio; the LM allows more).
DEFAULT_MAX_NEW_TOKENS = 512


def apply_repetition_penalty(scores: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF repetition penalty on [B, V] scores for the ids where `seen` [B, V] is True (new array)."""
    if penalty == 1.0:
        return scores
    out = np.array(scores, copy=True)
    picked = out[seen]  # only the seen ids change: a few hundred of the vocabulary
    out[seen] = np.where(picked < 0, picked * np.float32(penalty), picked / np.float32(penalty))
    return out


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    if temperature == 1.0:
        return scores
    return (scores / np.float32(temperature)).astype(scores.dtype, copy=False)


def top_k_filter(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Set every score below the k-th largest of its row to -inf (k = 0: off)."""
    vocab = scores.shape[-1]
    if top_k <= 0 or top_k >= vocab:
        return scores
    kth = np.partition(scores, vocab - top_k, axis=-1)[..., vocab - top_k, None]
    return np.where(scores < kth, -np.inf, scores).astype(scores.dtype, copy=False)


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def top_p_filter(scores: np.ndarray, top_p: float) -> np.ndarray:
    """HF TopPLogitsWarper: keep the smallest set of most likely tokens with mass >= top_p."""
    if top_p >= 1.0:
        return scores
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(_softmax(sorted_scores), axis=-1)
    remove_sorted = cumulative <= (1.0 - top_p)
    remove_sorted[..., -1] = False  # keep at least the most likely token
    remove = np.empty_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores).astype(scores.dtype, copy=False)


def process_logits(logits: np.ndarray, seen: np.ndarray | None, params: SamplingParams) -> np.ndarray:
    """Penalty, temperature, top-k, top-p: the scores a token is drawn from (greedy: penalty only)."""
    scores = logits
    if seen is not None:
        scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    if params.greedy:
        return scores
    scores = apply_temperature(scores, params.temperature)
    scores = top_k_filter(scores, params.top_k)
    return top_p_filter(scores, params.top_p)


def select_tokens(
    logits: np.ndarray,
    seen: np.ndarray | None,
    params: SamplingParams,
    generators: Sequence[np.random.Generator] | None = None,
) -> np.ndarray:
    """Next token per row of [B, V] logits: argmax when greedy, else a draw (one generator per row)."""
    scores = process_logits(logits, seen, params)
    if params.greedy:
        return np.argmax(scores, axis=-1).astype(np.int64)
    if generators is None or len(generators) != scores.shape[0]:
        raise ValueError("sampling needs one numpy Generator per row")
    probs = _softmax(scores.astype(np.float64))
    cumulative = np.cumsum(probs, axis=-1)
    # u in (0, 1]: the first index whose cumulative mass reaches u * total has non-zero probability.
    u = 1.0 - np.fromiter((g.random() for g in generators), dtype=np.float64, count=len(generators))
    target = u[:, None] * cumulative[:, -1:]
    tokens = np.sum(cumulative < target, axis=-1)
    return np.minimum(tokens, scores.shape[-1] - 1).astype(np.int64)


def validate_seed(seed: object) -> int | None:
    """`seed` as given to a public entry point: None, or an int >= 0 (a bool is not an int), whatever the
    temperature, so that a bad seed fails under greedy decoding too. An InputError otherwise."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be an int >= 0 or None (no seed: fresh entropy), got {seed!r}")
    return int(seed)


def row_generators(seed: int | None, rows: Sequence[int]) -> list[np.random.Generator]:
    """One generator per row, keyed by (seed, row index): a row samples the same way whatever batch it is in.

    seed None draws fresh OS entropy once and derives the rows from it; anything else validate_seed rejects.
    """
    seed = validate_seed(seed)
    base = int(np.random.SeedSequence().entropy) if seed is None else seed
    return [np.random.default_rng([base, int(r)]) for r in rows]

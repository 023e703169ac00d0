"""The per-row generation rules, in one place for the library (generate.py, tts.py) and the server's
scheduler: when a row ends ([STOP], max_new_tokens, the hallucination guard), which of its audio may
be heard while it runs (holdback), and how a flagged sentence is drawn again (retries).

* `RowRules` keeps, for B rows (B = 1 in the scheduler, one per row; the whole batch in
  generate_steps), the tokens taken, the hidden vectors kept, and the guard's state. `take` applies
  the rule to one step's tokens and hidden states and says which rows ended and why:
  "stop" ([STOP] sampled; no hidden vector for it), "length" (max_new_tokens tokens taken),
  "hallucination" (guard on, flagged). A token's hidden state is kept unless it is [STOP].
* The hallucination guard is upstream soprano-tts's rule, run online: a counter per row grows by one
  for each new hidden state within L1 distance 300 of the previous one and shrinks by one (not below
  0) otherwise; the row is flagged when it exceeds 16. `clean[i]` is the number of hidden vectors
  kept when row i's counter was last 0: a flag's run of near-repeats starts at or after that
  vector, so the blocks of audio before it (block j lies between vectors j and j + 1) are free of
  it. A flagged sentence keeps those blocks only (`kept_after_flag`).
* Holdback (streams with the guard on): "clean" releases a running row's blocks before `clean`
  (what the guard can no longer flag); "sentence" releases nothing until the sentence has ended
  unflagged. Either way no block of a flagged run is ever sent. A flag with nothing of the sentence
  sent yet is retried (up to `retries` times); after audio of it was sent, a retry would repeat what
  the listener heard, so the sentence ends at its clean blocks instead (see `may_retry`).
* Retries draw again: retry k of sentence s uses its own generator, keyed by (seed, s, k), and a
  greedy request's retries sample at RETRY_TEMPERATURE (greedy would repeat the flagged tokens
  exactly: upstream 0.2.0 retries with the caller's settings, so its greedy retries repeat).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from pipeline_lib.errors import InputError
from pipeline_lib.runtime.sampling import SamplingParams

__all__ = [
    "HALLUCINATION_DIFF_THRESHOLD",
    "HALLUCINATION_MAX_RUNLENGTH",
    "HOLDBACKS",
    "DEFAULT_HOLDBACK",
    "MAX_RETRIES",
    "RETRY_TEMPERATURE",
    "GuardSettings",
    "RowRules",
    "release_blocks",
    "kept_after_flag",
    "may_retry",
    "retry_params",
    "retry_generator",
    "seed_base",
]

# Upstream's hallucination_detector constants: a run of near-identical consecutive hidden states.
HALLUCINATION_DIFF_THRESHOLD = 300.0  # L1 distance below which two consecutive states count as "same"
HALLUCINATION_MAX_RUNLENGTH = 16
HOLDBACKS = ("clean", "sentence")
DEFAULT_HOLDBACK = "clean"  # chosen from the figures in docs/design.md (2026-12-07, the guard)
MAX_RETRIES = 4  # the most a request may ask for: each retry is a whole sentence generated again
# A greedy request's retries sample at this temperature (with its own top_p / top_k / penalty): a
# mild draw, enough to leave a loop. Chosen, not measured on a trained checkpoint (none here).
RETRY_TEMPERATURE = 0.3


@dataclass(frozen=True)
class GuardSettings:
    """Whether the guard runs, how many times a flagged sentence is generated again, and what a stream
    holds back. The defaults (off, 0, DEFAULT_HOLDBACK) are the library's and the server's."""

    enabled: bool = False
    retries: int = 0
    holdback: str = DEFAULT_HOLDBACK

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, (bool, np.bool_)):
            raise InputError(f"hallucination_guard must be true or false, got {self.enabled!r}")
        r = self.retries
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 <= r <= MAX_RETRIES:
            raise InputError(f"hallucination_retries must be an int in 0..{MAX_RETRIES}, got {r!r}")
        if self.holdback not in HOLDBACKS:
            raise InputError(f"holdback must be one of {', '.join(HOLDBACKS)}, got {self.holdback!r}")

    @classmethod
    def of(cls, guard: bool, retries: int, holdback: str = DEFAULT_HOLDBACK) -> GuardSettings:
        """The library's arguments: `retries` > 0 turns the guard on (as upstream's `retries` does)."""
        s = cls(bool(guard) if isinstance(guard, (bool, np.bool_)) else guard, retries, holdback)  # validates
        return replace(s, enabled=s.enabled or s.retries > 0)


DEFAULT_GUARD = GuardSettings()


class RowRules:
    """The stop / length / guard rule for `rows` rows that started together (module docstring). Per-row
    counters are Python lists (`steps`, `kept`, `clean`, `run`): batches are a few rows, and the
    scheduler keeps one per row, where numpy's per-call cost would exceed the rule's work."""

    def __init__(self, rows: int, hidden_size: int, stop_id: int, max_new_tokens: int, guard: bool) -> None:
        self.stop_id, self.max_new_tokens, self.guard = int(stop_id), int(max_new_tokens), bool(guard)
        self.steps = [0] * rows  # tokens taken
        self.kept = [0] * rows  # hidden vectors kept
        self.clean = [0] * rows  # hidden vectors kept when the guard's counter was last 0
        self.run = [0] * rows
        self.prev = np.zeros((rows, hidden_size), dtype=np.float32) if guard else None

    def take(self, tokens: np.ndarray, hidden: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """One step: row i took `tokens[i]`, produced by `hidden[i]`. Returns (keep: the hidden state
        is kept, i.e. the token is not [STOP]; reasons: "" for a row that goes on, else why it ended)."""
        dist = np.abs(hidden - self.prev).sum(axis=-1).tolist() if self.prev is not None else None
        keep, reasons = [], []
        for i, token in enumerate(np.asarray(tokens).tolist()):
            k = token != self.stop_id
            self.steps[i] += 1
            reason = "" if k else "stop"
            if dist is not None and k:
                if self.kept[i] > 0:  # a near-repeat of the previous kept state counts up, else down
                    self.run[i] = self.run[i] + 1 if dist[i] < HALLUCINATION_DIFF_THRESHOLD else max(self.run[i] - 1, 0)
                self.prev[i] = hidden[i]  # type: ignore[index]
                if self.run[i] > HALLUCINATION_MAX_RUNLENGTH:
                    reason = "hallucination"
            self.kept[i] += k
            if self.run[i] == 0:
                self.clean[i] = self.kept[i]
            if not reason and self.steps[i] >= self.max_new_tokens:
                reason = "length"
            keep.append(k)
            reasons.append(reason)
        return np.array(keep, dtype=bool), reasons

    def select(self, idx: np.ndarray) -> None:
        """Keep rows `idx` only (the rows that go on)."""
        pick = np.asarray(idx).tolist()
        self.steps, self.kept = [self.steps[i] for i in pick], [self.kept[i] for i in pick]
        self.clean, self.run = [self.clean[i] for i in pick], [self.run[i] for i in pick]
        if self.prev is not None:
            self.prev = self.prev[idx]


def release_blocks(holdback: str | None, clean: int, finished: bool, reason: str) -> float:
    """How many of a row's audio blocks a stream may send now (the decoder's own exactness rule comes
    on top): all once it ended unflagged; a flagged row its `clean` blocks (kept_after_flag); a
    running row, with holdback "clean" the blocks before its last clean vector, with "sentence"
    none; holdback None (guard off): all."""
    if holdback is None or (finished and reason != "hallucination"):
        return float("inf")
    if finished:
        return float(kept_after_flag(clean))
    return float(max(0, clean - 1)) if holdback == "clean" else 0.0


def kept_after_flag(clean: int) -> int:
    """Blocks of audio a flagged sentence keeps: those before its clean point (`clean` hidden vectors
    give clean - 1 blocks)."""
    return max(0, int(clean) - 1)


def may_retry(retries_done: int, retries: int, blocks_sent: int) -> bool:
    """A flagged sentence is generated again while retries are left and none of it was sent."""
    return retries_done < retries and blocks_sent == 0


def retry_params(params: SamplingParams) -> SamplingParams:
    """The settings of a retry: the caller's, at RETRY_TEMPERATURE when the caller is greedy."""
    return replace(params, temperature=RETRY_TEMPERATURE) if params.greedy else params


def retry_generator(base: int, sentence: int, attempt: int) -> np.random.Generator:
    """Retry `attempt` (1, 2, ...) of sentence `sentence`: its own stream, keyed by the call's seed base
    (the seed, or the entropy drawn once for the call) so a seeded call retries the same way."""
    return np.random.default_rng([int(base), int(sentence), 1_000_000 + int(attempt)])


def seed_base(seed: int | None) -> int:
    """The key a call's generators derive from: its seed, or fresh entropy drawn once."""
    return int(np.random.SeedSequence().entropy) if seed is None else int(seed)

"""A row's life in the scheduler's batch: its record, its tokens, its end, its audio in sentence order.

`Row` is one sentence of one job in a running batch (its sampling settings and generator, its
hidden vectors, the blocks already decoded, the audio it holds back, its KV history while parked).
`RowPhase` is the part of BatchScheduler that acts on rows once they are admitted: each row samples
its next token with its own settings and generator (rows grouped by settings, sampling.select_tokens)
and takes it under the generation rule (rules.RowRules: stop, length, the hallucination guard); a
row that ends leaves the batch (its slot is free at once, SlotCache.remove) and drains until its
last window is decoded; a row the guard flagged is generated again while retries are left and none
of it was sent (rules.may_retry), otherwise it is cut to its clean blocks (rules.kept_after_flag);
a job's sentences are emitted in order once complete, and a job that ends (done, failed or
cancelled) takes its rows with it. The loop, admission and backpressure are the scheduler's
(pipeline_lib.runtime.scheduler); which windows are decoded when is windows.WindowPhase's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from pipeline_lib.runtime.jobs import SpeechJob
from pipeline_lib.runtime.rules import RowRules, kept_after_flag, may_retry
from pipeline_lib.runtime.sampling import SamplingParams, select_tokens

if TYPE_CHECKING:
    from pipeline_lib.runtime.kv_cache import SlotCache

__all__ = ["Row", "RowPhase"]


class Row:
    """One sentence of one job in the running batch."""

    def __init__(self, job: SpeechJob, index: int, prompt: list[int], vocab: int, hidden_size: int, first_chunk: int) -> None:
        r = job.request
        self.job, self.index = job, index
        self.params = r.params
        self.gen = job._gens[index] if job._gens is not None else None
        self.max_new_tokens = r.max_new_tokens
        self.seen = np.zeros(vocab, dtype=bool)
        self.seen[np.asarray(prompt, dtype=np.int64)] = True
        self.next_pos = len(prompt)
        self.hidden = np.zeros((r.max_new_tokens, hidden_size), dtype=np.float32)
        self.n = 0  # hidden vectors so far
        self.steps = 0  # tokens sampled so far
        self.emitted = 0  # sample blocks already decoded
        self.chunk = first_chunk
        self.logits: np.ndarray | None = None  # of the last forward, not yet sampled
        self.last_hidden: np.ndarray | None = None
        self.token = 0
        self.finished = False
        self.pending: list[np.ndarray] = []  # audio held while an earlier sentence of the job runs
        self.kv: list[np.ndarray] | None = None  # its own KV history while parked (backpressure)
        self.rules: RowRules | None = None  # when it ends (rules.RowRules; the scheduler sets it on admission)
        self.reason = ""  # why it ended (rules.RowRules.take)
        self.attempt = 0  # 0, or which retry of its sentence this row is (rules)


class RowPhase:
    """BatchScheduler's row phase (a mixin: the scheduler owns the state it acts on; `_push`, the
    audio's way to its job, is windows.WindowPhase's)."""

    tts: Any
    rows: list[Row]
    _draining: list[Row]
    _parked: list[Row]
    _jobs: list[SpeechJob]
    _cache: SlotCache
    observer: Any
    _push: Callable[[SpeechJob, np.ndarray], None]

    def _sample(self, rows: list[Row]) -> None:
        """Every row samples its next token from its last logits, with its own settings and generator."""
        for group in _by_params([r for r in rows if r.logits is not None]):
            logits = np.stack([r.logits for r in group])
            seen = np.stack([r.seen for r in group])
            gens = None if group[0].params.greedy else [r.gen for r in group]
            tokens = select_tokens(logits, seen, group[0].params, gens)
            for r, tok in zip(group, tokens):
                self._take_token(r, int(tok))

    def _take_token(self, r: Row, token: int) -> None:
        """The generation rule (rules.RowRules, as generate.generate_steps): the hidden state of the
        forward that produced a token other than [STOP] is kept; the rule says when the row ends."""
        assert r.rules is not None  # set on admission
        keep, reasons = r.rules.take(np.array([token]), r.last_hidden[None])
        r.seen[token] = True
        r.token = token
        r.steps += 1
        r.job.tokens += 1
        if keep[0]:
            r.hidden[r.n] = r.last_hidden
            r.n += 1
            if r.n > 1:  # n hidden vectors give n - 1 blocks of audio
                r.job.generated_samples += self.tts.samples_per_token
        if reasons[0]:
            r.finished, r.reason = True, reasons[0]
        r.logits = None

    def _flagged(self, r: Row) -> bool:
        """The guard flagged `r` (it left the batch): True when its sentence is generated again (none
        of it was sent, retries left: rules.may_retry), else it is cut to its clean blocks."""
        job, spt = r.job, self.tts.samples_per_token
        job.hallucinations += 1
        sent = r.emitted if r.index == job._next_emit else 0  # a later sentence's audio waits unsent
        retry = may_retry(r.attempt, job.request.guard.retries, sent)
        hook = getattr(self.observer, "on_hallucination", None)
        if hook is not None:
            hook(retry)
        assert r.rules is not None
        keep = 0 if retry else kept_after_flag(int(r.rules.clean[0])) + 1  # hidden vectors it keeps
        job.generated_samples -= max(0, r.n - max(keep, 1)) * spt
        if retry:
            job.retries += 1
            job._retry.append((r.index, r.attempt + 1))
            r.n, r.pending = 0, []  # nothing of this attempt is ever decoded or sent
            return True
        r.n = min(r.n, keep)
        return False

    def _remove_row(self, r: Row) -> None:
        """Take `r` out of the batch: the last row moves into its slot (SlotCache.remove)."""
        i = self.rows.index(r)
        moved = self._cache.remove(i)
        if moved is not None:
            self.rows[i] = self.rows[moved]
        self.rows.pop()

    def _leave_batch(self, r: Row) -> None:
        """A finished row leaves the batch (its slot, and its job's turn to start another sentence,
        are free) and waits in `_draining` until its last window is decoded."""
        self._remove_row(r)
        r.job._active -= 1
        if r.reason == "hallucination" and self._flagged(r):
            return  # its sentence starts again (job._retry); this row is dropped
        self._draining.append(r)

    def _complete_row(self, r: Row) -> None:
        """All of a finished row's audio is decoded: emit the job's sentences that are complete, in order."""
        job = r.job
        job._finished_rows[r.index] = r
        while job._next_emit in job._finished_rows:  # flush sentences that ended, in order
            done = job._finished_rows.pop(job._next_emit)
            for a in done.pending:
                self._push(job, a)
            done.pending = []
            job._next_emit += 1
            nxt = next((x for x in [*self.rows, *self._draining, *self._parked]
                        if x.job is job and x.index == job._next_emit), None)
            if nxt is not None:  # the next sentence is running: what it has so far goes out now
                for a in nxt.pending:
                    self._push(job, a)
                nxt.pending = []
        if job._next_emit == len(job._ids):
            self._end_job(job, None)

    def _end_job(self, job: SpeechJob, error: BaseException | None) -> None:
        """Finish `job` (with `error`, if given) and take its rows out of the batch."""
        for r in [x for x in self.rows if x.job is job]:
            self._remove_row(r)
        self._draining = [x for x in self._draining if x.job is not job]
        self._parked = [x for x in self._parked if x.job is not job]
        job._active = 0
        if job in self._jobs:
            self._jobs.remove(job)
        job._finish(error)


def _by_params(rows: list[Row]) -> list[list[Row]]:
    """Rows grouped by sampling settings (greedy rows together), in batch order within a group."""
    groups: dict[SamplingParams, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.params, []).append(r)
    return list(groups.values())

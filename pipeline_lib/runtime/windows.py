"""The scheduler's decoder phase: which rows' audio windows are decoded between two LM steps.

`WindowPhase` is the part of BatchScheduler that decides, each iteration, which windows to decode
(first audio, urgent listeners, early windows, ended rows' rests), which rows step (the first-audio
lane), and emits the audio to each job in sentence order. It reads the scheduler's state (rows,
draining rows, jobs, periods) and the rules in pipeline_lib.runtime.pacing; the window cut and
decode is SopranoTTS.decode_window. Its rows are rows.Row; what a row does once admitted (its
tokens, its end, its job's sentences flushed in order) is rows.RowPhase's.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline_lib.runtime.jobs import SpeechJob
from pipeline_lib.runtime.pacing import can_skip, early_window, need_blocks, ready_blocks, running_dry
from pipeline_lib.runtime.rows import Row
from pipeline_lib.runtime.rules import release_blocks

if TYPE_CHECKING:
    from pipeline_lib.runtime.kv_cache import SlotCache

__all__ = ["WindowPhase"]


class WindowPhase:
    """BatchScheduler's decoder phase (a mixin: the scheduler owns the state it reads)."""

    tts: Any
    rows: list[Row]
    _draining: list[Row]
    _parked: list[Row]
    _jobs: list[SpeechJob]
    _queue: Any
    _cache: SlotCache
    observer: Any
    lane: bool
    priority: bool
    margin_s: float
    min_window: int
    max_chunk: int
    chunk_growth: int
    costs: Any
    _period: float
    _row_period: float
    _lane_step: bool
    _stepped: int
    _block_s: float
    _last_decode_at: float | None
    holdback: str

    def _complete_row(self, r: Row) -> None:
        """All of a finished row's audio is decoded (rows.RowPhase's: it emits in sentence order)."""
        raise NotImplementedError

    def _end_job(self, job: SpeechJob, error: BaseException | None) -> None:
        """Finish `job` (rows.RowPhase's: it takes the job's rows out of the batch)."""
        raise NotImplementedError

    def _decode_due(self) -> None:
        """The decoder's work between two decode steps.

        1. First audio: the window of each job that has sent nothing yet, as soon as it is exact.
        2. Later windows (the row has `chunk` exact blocks not yet sent, or it ended): a row whose
           listener has less than `margin` seconds of audio left to play is decoded now, most urgent
           first; a row further ahead waits while any job still waits for its first audio (queued
           or running), since its listener does not need more yet. With nobody waiting for first
           audio: every ended row's rest, and the most urgent of the others, one per step.
        A window decodes every exact block the row has (up to `max_chunk`; an ended row: all of the
        rest), so a window that waited is a longer one: fewer windows, less context decoded twice."""
        now = time.perf_counter()
        if self._last_decode_at is not None:  # at most 1 s a sample: a pause of the worker is no iteration
            sample = min(1.0, now - self._last_decode_at)
            self._period = 0.8 * self._period + 0.2 * sample
            if not self._lane_step:
                self._row_period = 0.8 * self._row_period + 0.2 * sample
                self.costs.record(self._stepped, sample)
        self._last_decode_at = now
        margin = self.margin_s + 2.0 * self._period
        later, early = [], []
        for r in [*self.rows, *self._draining, *self._parked]:
            if self._needs_first_audio(r):
                if r.finished or self._due(r):
                    self._decode_row(r, limit=1)
            elif r.finished or self._due(r):
                later.append(r)
            elif self._early(r, now, margin):
                early.append(r)
        waiting = bool(self._queue) or any(j.first_audio_at is None for j in self._jobs)
        slack = {id(r): self._slack_s(r, now) for r in [*later, *early]}
        later.sort(key=lambda r: slack[id(r)])
        urgent = sorted([r for r in later if slack[id(r)] < margin] + early, key=lambda r: slack[id(r)])
        if waiting:
            todo = urgent
        else:
            rest = [r for r in later if slack[id(r)] >= margin]
            todo = urgent + [r for r in rest if r.finished] + [r for r in rest if not r.finished][:1]
        for r in todo:
            self._decode_row(r, early=r in early)

    def _early(self, r: Row, now: float, margin: float) -> bool:
        """An early window for the row playing next in its job (pacing.early_window)."""
        if r.finished or r.index != r.job._next_emit or r.job.first_audio_at is None:
            return False
        return early_window(self._slack_s(r, now), margin, self._row_period, self._ready(r), self._need(r), r.chunk,
                            r.max_new_tokens - r.steps, self._fast())

    def _fast(self) -> bool:
        """Rows make tokens faster than real time (a whole-batch step per token, _row_period)."""
        return 0.0 < self._row_period < self._block_s

    def _need(self, r: Row) -> int:
        return need_blocks(r.chunk, self.min_window, self._fast())

    def _ready(self, r: Row) -> int:
        """Exact blocks not yet decoded, within what the guard's holdback releases (rules.release_blocks;
        rows without the guard: all)."""
        ready = ready_blocks(r.n, self.tts.stream_context, r.emitted)
        if r.rules is None or not r.rules.guard:
            return ready
        release = release_blocks(self.holdback, int(r.rules.clean[0]), r.finished, r.reason)
        return int(min(ready, release - r.emitted))

    def _lane_start(self) -> int:
        """The first-audio lane (`lane`): while rows wait for their job's first audio, or (with
        `priority`) their listener runs dry, and every other row can sit out a step
        (pacing.can_skip), the step runs those rows only (moved to the
        batch's tail, SlotCache.swap), so their first window is exact after a few short steps instead
        of as many steps of the whole batch. Checked every step. The index of the first row that
        steps (0: the whole batch)."""
        if not self.lane:
            return 0
        now = time.perf_counter()
        lane = [r for r in self.rows if not r.finished and (self._needs_first_audio(r) or self._dry(r, now))]
        if not lane or len(lane) == len(self.rows):
            return 0
        ids = {id(r) for r in lane}
        if any(not self._can_skip(r, now) for r in self.rows if id(r) not in ids):
            return 0
        lo = len(self.rows) - len(lane)
        heads = [i for i in range(lo) if id(self.rows[i]) in ids]
        tails = [i for i in range(lo, len(self.rows)) if id(self.rows[i]) not in ids]
        for i, j in zip(heads, tails):
            self._cache.swap(i, j)
            self.rows[i], self.rows[j] = self.rows[j], self.rows[i]
        return lo

    def _dry(self, r: Row, now: float) -> bool:
        """With `priority`: the row is its job's sentence playing next and its listener is running
        dry (`_listener_dry`)."""
        return r.index == r.job._next_emit and self._listener_dry(r.job, now)

    def _listener_dry(self, job: SpeechJob, now: float) -> bool:
        """With `priority`: the job's listener is running dry (pacing.running_dry, at the decoder
        phase's margin)."""
        return self.priority and running_dry(self._job_slack_s(job, now), self.margin_s + 2.0 * self._period)

    def _can_skip(self, r: Row, now: float) -> bool:
        return can_skip(self._slack_s(r, now), self._ready(r), self._need(r), self._block_s, self._row_period)

    def _needs_first_audio(self, r: Row) -> bool:
        """The row is its job's sentence to emit next, and the job has sent no audio yet."""
        return r.job.first_audio_at is None and r.index == r.job._next_emit

    def _slack_s(self, r: Row, now: float) -> float:
        """Seconds of audio the row's listener still has to play (its job's playback clock). A sentence
        behind an earlier one of its job gets its job's slack (it plays later than that, so this errs
        towards decoding it early); infinite while the job has sent nothing."""
        return self._job_slack_s(r.job, now)

    @staticmethod
    def _job_slack_s(job: SpeechJob, now: float) -> float:
        """Seconds of audio the job's listener still has to play; infinite while it has sent nothing."""
        return math.inf if job.play_end is None else job.play_end - now

    def _decode_row(self, r: Row, limit: int | None = None, early: bool = False) -> None:
        """Decode the row's due windows (`early`: one window of every exact block, fewer than
        `chunk`); a row out of the batch that has sent all its audio is done. A failure ends the
        row's job only."""
        if r.job.done:  # its job ended (failed) earlier in this decoder phase
            return
        try:
            if r.finished:
                self._decode_ready(r, limit=1 if limit is None else (None if limit == math.inf else limit))
            elif limit is not None:
                self._decode_ready(r, limit=limit)
            else:
                self._decode_ready(r, limit=1, widest=True, need=self._need(r) if early else None)
        except Exception as exc:  # noqa: BLE001 - this job's failure only
            self._end_job(r.job, exc)
            return
        if r.finished and r.emitted >= r.n - 1 and r in self._draining:
            self._draining.remove(r)
            self._complete_row(r)

    def _due(self, r: Row, need: int | None = None) -> bool:
        """The row's next window (`need` exact blocks, default its `chunk`) can be decoded."""
        return self._ready(r) >= (r.chunk if need is None else need)

    def _decode_ready(self, r: Row, limit: int | None = None, widest: bool = False, need: int | None = None) -> None:
        """Decode the row's windows whose samples are exact by now (at most `limit` of them; all of
        the rest once the row ended, in windows of at most max(chunk, max_chunk) blocks, so a
        sentence that waited long does not become one decoder call that holds every other row's
        step). A window is due with `need` exact blocks (default `chunk`). `widest`: a window holds
        every exact block (at least `need`, at most max(chunk, max_chunk)), not `chunk` blocks."""
        ctx = self.tts.stream_context
        done = 0
        if r.finished:
            while r.n - 1 > r.emitted and (limit is None or done < limit):
                end = min(r.n - 1, r.emitted + max(r.chunk, self.max_chunk))
                self._emit(r, self._window(r, r.emitted, end, r.n - 1))
                r.emitted = end
                done += 1
            return
        while self._due(r, need) and (limit is None or done < limit):
            end = r.emitted + r.chunk
            if widest:
                end = r.emitted + min(self._ready(r), max(r.chunk, self.max_chunk))
            self._emit(r, self._window(r, r.emitted, end, end + ctx))
            r.emitted = end
            r.chunk = min(self.max_chunk, r.chunk * self.chunk_growth)
            done += 1

    def _window(self, r: Row, start: int, end: int, last: int) -> np.ndarray:
        """Blocks [start, end) of the row's audio from its hidden vectors up to `last`
        (SopranoTTS.decode_window: the runtime's own window cut)."""
        return self.tts.decode_window(r.hidden[: last + 1], start, end)

    def _emit(self, r: Row, audio: np.ndarray) -> None:
        if r.index == r.job._next_emit:
            self._push(r.job, audio)
        else:
            r.pending.append(audio)

    def _push(self, job: SpeechJob, audio: np.ndarray) -> None:
        if len(audio) == 0:
            return
        first = job.first_audio_at is None
        job._push(audio)
        if first:
            self.observer.on_first_audio(job.first_audio_at - job.submitted_at)
        self.observer.on_audio(len(audio) / job.sample_rate)

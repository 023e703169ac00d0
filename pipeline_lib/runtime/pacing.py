"""The scheduler's rules about time, as pure functions of numbers: no model, no arrays.

Blocks and windows: block j of a sentence's audio lies between its tokens j and j + 1 and is exact
(equal to decoding the whole sentence) once token j + 1 + stream_context exists (SopranoTTS.decode_window).
A listener's playback clock: playing from its first chunk on, pausing when it runs out; its slack is
the audio it still has to play. A row's period: the seconds between two of its tokens (one scheduler
iteration over the whole batch: the step, the decoder's windows and the prefills in it).

The promise these rules keep (README, "Real-time fairness"): an admitted stream is not slowed
mid-stream. So a job's later sentences start only when its listener needs them (`wants_next_sentence`),
and a new request's first row is admitted only while the measured period at one more row still
leaves every running row faster than real time by a margin (`StepCosts.admits`); beyond that the
request waits in the queue (or gets a 429 when the queue is full).
"""

from __future__ import annotations

import math

__all__ = [
    "ready_blocks",
    "need_blocks",
    "early_window",
    "can_skip",
    "wants_next_sentence",
    "running_dry",
    "first_window_blocks",
    "StepCosts",
]


def ready_blocks(tokens: int, stream_context: int, emitted: int) -> int:
    """Exact blocks not yet sent of a sentence with `tokens` hidden vectors, `emitted` blocks sent."""
    return tokens - 1 - stream_context - emitted


def need_blocks(chunk: int, min_window: int, fast: bool) -> int:
    """Exact blocks a row's next window needs: `chunk`, or at most `min_window` while early windows
    run (`fast`: rows make tokens faster than real time)."""
    return min(chunk, min_window) if fast else chunk


def early_window(slack_s: float, margin_s: float, period_s: float, ready: int, need: int, chunk: int,
                 tokens_left: int, fast: bool) -> bool:
    """An early window (fewer than `chunk` blocks) goes now: the batch runs faster than real time, at
    least `need` blocks are exact, the listener has less than `margin_s` left, and the row's next
    regular window (`chunk` blocks, or its end after `tokens_left` tokens) would come after the
    listener ran dry. It waits for the last iteration still in time (two periods and 30 ms of
    decoding ahead of the listener's end), so the window holds as many blocks as it can."""
    if not fast or ready < need:
        return False
    wait = min(chunk - ready, tokens_left) * period_s
    return slack_s < min(margin_s, 2.0 * period_s + 0.03) and slack_s < wait + period_s


def can_skip(slack_s: float, ready: int, need: int, block_s: float, period_s: float) -> bool:
    """A row may sit out one first-audio-lane step: its listener's audio (sent, plus the exact blocks a
    window would send now) lasts beyond the steps the row still needs before its next window (at a
    whole-batch period each), one lane step and 30 ms of decoding. No audio yet: nobody listens."""
    if math.isinf(slack_s):
        return True
    if ready >= need:
        slack_s += ready * block_s
    return slack_s >= (max(0, need - ready) + 1) * period_s + 0.03


def wants_next_sentence(*, first_audio_sent: bool, next_is_emitting: bool, active: int, alone: bool,
                        ahead_s: float, lead_s: float, unread_s: float, max_unread_s: float, dry: bool,
                        sent_s: float) -> bool:
    """A job may start its next sentence (pacing). Never before its first audio unless that sentence
    is the one to emit next (so it does not delay the first audio), never while its client has
    `max_unread_s` or more unread (backpressure), and never while its own listener is running dry
    (`dry`: running_dry) in its first `lead_s` of audio (`sent_s`: sent so far) and any row of the
    job is running (`active` > 0, parked rows included): the new sentence's prefill would hold the
    next window that listener waits for. A small first window (one block, unless sized up under
    load) leaves a listener dry right after its first audio; later in a stream the windows keep
    listeners near the margin on purpose (early_window), so dry is the usual state there and holding
    sentences back would only serialise them. With no row running, the next sentence starts, or
    nothing would. (A retry of a flagged sentence does not ask: BatchScheduler starts it at once.)
    Alone on the engine, as many rows as are free (no one else needs them; BatchScheduler adds one
    per iteration, so a newcomer waits for at most one of their prefills). Beside other jobs: one
    row at a time, a second one only while its listener has less than `lead_s` of audio ahead
    (`ahead_s`: sent, not yet played), so a long request runs one or two rows, not the whole batch."""
    if not (first_audio_sent or next_is_emitting) or unread_s >= max_unread_s:
        return False
    if dry and active > 0 and sent_s < lead_s:
        return False
    if alone or active == 0:
        return True
    return active == 1 and ahead_s < lead_s


def running_dry(slack_s: float, margin_s: float) -> bool:
    """A listener is running dry: it has audio, and less than `margin_s` of it left to play.
    Priority (BatchScheduler `priority`): while one is, the step runs the rows of listeners running
    dry (and of jobs waiting for first audio) without those whose listeners have audio enough to
    sit out a step (`can_skip`), and a job whose listener has `lead_s` or more ahead starts no
    sentence (its prefill would hold the step the dry listener waits for)."""
    return not math.isinf(slack_s) and slack_s < margin_s


def first_window_blocks(first_chunk: int, period_s: float, block_s: float, min_window: int,
                        decode_s: float = 0.03) -> int:
    """Blocks in a job's first window: `first_chunk`, or more while a row's period (`period_s` per
    token, the whole batch's) is so long that the listener would run dry before the next window
    (`min_window` more tokens and `decode_s` of decoding away) could come: enough blocks to cover
    that wait, at most `min_window`. At a fast period (a lone stream) this is `first_chunk`, so the
    first audio is not delayed; under load it costs a token or two of time to first audio."""
    if not 0.0 < period_s < block_s:  # nothing measured, or slower than real time: no window keeps up
        return first_chunk
    need = math.ceil((min_window * period_s + decode_s) / block_s)
    return max(first_chunk, min(need, min_window))


class StepCosts:
    """Measured seconds per whole-batch iteration (step, windows, prefills) by batch size: an
    exponential mean per size, and a prediction for a size not seen yet: between two sizes seen, the
    line through them; beyond the largest, the line through the two largest (never falling; one size
    seen: the same cost). Beyond what was seen the guess is optimistic, so the batch grows one row
    at a time until a measured size says the next row would not keep real time."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.mean: dict[int, float] = {}

    def record(self, rows: int, seconds: float) -> None:
        if rows < 1 or not seconds > 0:
            return
        old = self.mean.get(rows)
        self.mean[rows] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds

    def predict(self, rows: int) -> float | None:
        """Seconds per iteration at `rows` rows (None: nothing measured yet)."""
        if rows in self.mean:
            return self.mean[rows]
        if not self.mean:
            return None
        below = [b for b in self.mean if b < rows]
        above = [b for b in self.mean if b > rows]
        if below and above:
            lo, hi = max(below), min(above)
            t = (rows - lo) / (hi - lo)
            return self.mean[lo] + t * (self.mean[hi] - self.mean[lo])
        sizes = sorted(self.mean)
        if not below:
            return self.mean[sizes[0]]
        if len(sizes) == 1:
            return self.mean[sizes[0]]
        b1, b2 = sizes[-2], sizes[-1]
        slope = max(0.0, (self.mean[b2] - self.mean[b1]) / (b2 - b1))
        return self.mean[b2] + slope * (rows - b2)

    def admits(self, rows: int, block_s: float, headroom: float) -> bool:
        """One more row may join `rows` running ones: the predicted period at rows + 1, times
        (1 + headroom), is at most one block of audio (every row stays faster than real time).
        An empty batch always admits; so does a batch with nothing measured."""
        if rows == 0:
            return True
        p = self.predict(rows + 1)
        return p is None or p * (1.0 + headroom) <= block_s

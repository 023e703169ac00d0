"""The scheduler's rules about time (pipeline_lib.runtime.pacing): pure functions, no model."""

from __future__ import annotations

import math

import numpy as np

from pipeline_lib.runtime.kv_cache import SlotCache
from pipeline_lib.runtime.pacing import (
    StepCosts,
    can_skip,
    early_window,
    first_window_blocks,
    need_blocks,
    ready_blocks,
    running_dry,
    wants_next_sentence,
)


def test_blocks_ready_and_needed():
    assert ready_blocks(tokens=10, stream_context=3, emitted=2) == 4  # block j exact once token j+1+ctx exists
    assert need_blocks(chunk=64, min_window=4, fast=True) == 4
    assert need_blocks(chunk=64, min_window=4, fast=False) == 64
    assert need_blocks(chunk=2, min_window=4, fast=True) == 2


def test_early_window_waits_for_the_last_iteration_in_time():
    kw = dict(margin_s=0.5, period_s=0.03, need=4, chunk=64, tokens_left=100, fast=True)
    assert not early_window(slack_s=0.4, ready=8, **kw)  # 0.4 s left: more than two periods + 30 ms
    assert early_window(slack_s=0.05, ready=8, **kw)  # the last iteration still in time
    assert not early_window(slack_s=0.05, ready=3, **kw)  # too few exact blocks
    assert not early_window(slack_s=0.05, ready=8, **{**kw, "fast": False})  # slower than real time: no early windows
    assert not early_window(slack_s=0.05, ready=63, **{**kw, "period_s": 0.001})  # the regular window comes in time


def test_can_skip_counts_the_audio_a_window_would_send():
    assert can_skip(math.inf, 0, 4, 0.064, 0.03)  # nothing sent: nobody listens
    assert not can_skip(0.10, 1, 4, 0.064, 0.03)  # 3 more steps + 1 + 30 ms = 150 ms > 100 ms
    assert can_skip(0.20, 1, 4, 0.064, 0.03)
    assert can_skip(0.0, 4, 4, 0.064, 0.03)  # 4 exact blocks: 256 ms could go now


def test_pacing_keeps_a_long_request_to_one_or_two_rows_beside_others():
    base = dict(first_audio_sent=True, next_is_emitting=False, alone=False, lead_s=1.5, unread_s=0.0,
                max_unread_s=math.inf, dry=False, sent_s=0.064)
    assert wants_next_sentence(active=0, ahead_s=30.0, **base)  # no row: its listener will need one
    assert not wants_next_sentence(active=1, ahead_s=3.0, **base)  # well ahead: one row is enough
    assert wants_next_sentence(active=1, ahead_s=1.0, **base)  # falling behind: a second row
    assert not wants_next_sentence(active=2, ahead_s=0.0, **base)  # never a third beside others
    assert wants_next_sentence(active=5, ahead_s=30.0, **{**base, "alone": True})  # alone: free rows are its
    assert not wants_next_sentence(active=0, ahead_s=0.0, **{**base, "unread_s": 5.0, "max_unread_s": 5.0})
    assert not wants_next_sentence(active=0, ahead_s=math.inf, **{**base, "first_audio_sent": False})
    assert wants_next_sentence(active=0, ahead_s=math.inf, **{**base, "first_audio_sent": False,
                                                              "next_is_emitting": True})
    # its own listener running dry (right after a one-block first window): the row making that audio
    # goes first, alone or not; with no row running, the next sentence still starts
    assert not wants_next_sentence(active=1, ahead_s=0.06, **{**base, "dry": True})
    assert not wants_next_sentence(active=1, ahead_s=0.06, **{**base, "dry": True, "alone": True})
    assert wants_next_sentence(active=0, ahead_s=0.06, **{**base, "dry": True})
    # later in the stream (lead_s of audio sent) a listener near its margin is the usual state: no hold
    assert wants_next_sentence(active=1, ahead_s=0.06, **{**base, "dry": True, "sent_s": 2.0})


def test_a_listener_runs_dry_below_the_margin_and_only_with_audio():
    assert running_dry(slack_s=0.1, margin_s=0.2)
    assert not running_dry(slack_s=0.3, margin_s=0.2)
    assert not running_dry(slack_s=math.inf, margin_s=0.2)  # no audio yet: the first-audio lane's case
    assert running_dry(slack_s=-1.0, margin_s=0.2)  # already ran out


def test_the_first_window_covers_the_wait_for_the_next_one_under_load():
    kw = dict(first_chunk=1, block_s=0.064, min_window=4)
    assert first_window_blocks(period_s=0.008, **kw) == 1  # a lone stream: 4 tokens in 32 ms, no delay
    assert first_window_blocks(period_s=0.028, **kw) == 3  # 8 clients: 4 x 28 + 30 ms = 142 ms of audio
    assert first_window_blocks(period_s=0.060, **kw) == 4  # at most min_window
    assert first_window_blocks(period_s=0.0, **kw) == 1  # nothing measured yet
    assert first_window_blocks(period_s=0.1, **kw) == 1  # slower than real time: no window keeps up
    assert first_window_blocks(period_s=0.008, **{**kw, "first_chunk": 2}) == 2


def test_step_costs_predict_and_admit():
    c = StepCosts(alpha=1.0)
    assert c.predict(3) is None and c.admits(3, 0.064, 0.25)  # nothing measured: admit
    c.record(1, 0.010)
    assert c.predict(4) == 0.010  # one size seen: flat (optimistic, measured as it grows)
    c.record(2, 0.020)
    c.record(4, 0.040)
    assert c.predict(3) == 0.030  # between sizes: the line through them
    assert abs(c.predict(6) - 0.060) < 1e-12  # beyond: the line through the two largest
    assert c.admits(4, 0.064, 0.25)  # 5 rows: 50 ms * 1.25 = 62.5 ms <= 64 ms (a block)
    assert not c.admits(5, 0.064, 0.25)  # 6 rows: 60 ms * 1.25 > 64 ms
    assert c.admits(0, 0.064, 0.25)  # an empty batch always takes a row
    c.record(4, 0.0)  # a non-positive sample is ignored
    assert c.predict(4) == 0.040


def test_slot_cache_take_then_add_gives_a_row_the_same_history():
    """A parked row (backpressure) leaves with its columns and rejoins with the same history (and so the
    same positions: its length), while the others stepped in between."""
    cache = SlotCache(["k"], capacity=3, kv_heads=1, head_dim=1, bucket=4)

    def row(vals):
        return [np.asarray(vals, dtype=np.float32).reshape(1, 1, -1, 1)]

    cache.add(row([1, 2, 3]))
    cache.add(row([7]))
    cache.append([np.full((1, 1, 1, 1), 9, np.float32)], lo=1)  # only row 1 steps: row 0 stays as it was
    cache.append([np.full((2, 1, 1, 1), 4, np.float32)])
    kv, moved = cache.take(0)
    assert moved == 1 and cache.rows == 1
    assert kv[0][0, 0, :, 0].tolist() == [1, 2, 3, 4]
    cache.append([np.full((1, 1, 1, 1), 5, np.float32)])
    cache.add(kv)
    assert cache.lens[:2].tolist() == [4, 4]
    assert cache.arrays[0][1, 0, :4, 0].tolist() == [1, 2, 3, 4]
    assert cache.arrays[0][0, 0, :4, 0].tolist() == [7, 9, 4, 5]

"""The continuous-batching scheduler behind the server: results equal the runtime's, rows join and
leave a running batch, cancellation, overload, failures stay with their job, draining."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline_lib.errors import InputError
from pipeline_lib.runtime.scheduler import (
    BatchScheduler,
    JobCancelled,
    QueueFullError,
    SchedulerClosedError,
    SlotCache,
    SpeechRequest,
)
from pipeline_lib.runtime.tts import SopranoTTS

TEXTS = [
    "The first voice speaks of rivers and hills.",
    "A second one counts to three, then stops. And then it goes on for a while longer.",
    "Number three asks a question, does it not?",
    "Four is short.",
    "Five talks about the weather in the mountains today.",
    "Six reads a list: apples, pears and plums.",
    "Seven whispers something nobody hears.",
    "Eight ends the row with a long and winding sentence about nothing much.",
]


class _Steps:
    """Observer: the rows of every decode step, and each job's first-audio delay."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.first: list[float] = []
        self.audio_s = 0.0

    def on_step(self, rows, queued, tokens, seconds):
        self.rows.append(rows)

    def on_first_audio(self, seconds):
        self.first.append(seconds)

    def on_audio(self, seconds):
        self.audio_s += seconds


@pytest.fixture(scope="module")
def tts(tiny_export):
    return SopranoTTS.from_dir(tiny_export, num_threads=2)


@pytest.fixture(scope="module")
def openvino_tts(tiny_openvino):
    """OpenVINO on the plain step IR (KV cache as inputs), as the server runs it."""
    d = tiny_openvino
    return SopranoTTS(d / "soprano_lm_step.xml", d / "soprano_decoder_preistft.xml", backend="openvino_cpu", num_threads=2)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("which", ["tts", "openvino_tts"])
def test_eight_requests_in_one_batch_equal_solo_synthesis(request, which):
    tts = request.getfixturevalue(which)
    steps = _Steps()
    sched = BatchScheduler(tts, max_batch=8, observer=steps).start()
    try:
        jobs = [sched.submit(SpeechRequest(t, max_new_tokens=24)) for t in TEXTS]
        got = [j.audio() for j in jobs]
    finally:
        sched.close()
    for t, g in zip(TEXTS, got):
        assert _rel(g, tts.synthesize(t, max_new_tokens=24)["audio"]) <= 1e-4
    assert max(steps.rows) == 8  # all rows decoded together
    assert len(steps.first) == 8 and steps.audio_s == pytest.approx(sum(len(g) for g in got) / tts.sample_rate)


def test_sampled_and_greedy_rows_share_a_batch(tts):
    sched = BatchScheduler(tts, max_batch=4).start()
    try:
        a = sched.submit(SpeechRequest(TEXTS[0], temperature=0.9, top_k=50, seed=11, max_new_tokens=20))
        b = sched.submit(SpeechRequest(TEXTS[2], max_new_tokens=20))
        c = sched.submit(SpeechRequest(TEXTS[4], temperature=0.7, top_p=0.8, seed=5, max_new_tokens=20))
        got = [j.audio() for j in (a, b, c)]
    finally:
        sched.close()
    want = [
        tts.synthesize(TEXTS[0], temperature=0.9, top_k=50, seed=11, max_new_tokens=20)["audio"],
        tts.synthesize(TEXTS[2], max_new_tokens=20)["audio"],
        tts.synthesize(TEXTS[4], temperature=0.7, top_p=0.8, seed=5, max_new_tokens=20)["audio"],
    ]
    for g, w in zip(got, want):
        assert _rel(g, w) <= 1e-4


def test_a_request_arriving_mid_generation_joins_the_running_batch(tts):
    steps = _Steps()
    sched = BatchScheduler(tts, max_batch=4, observer=steps).start()
    try:
        long = sched.submit(SpeechRequest(TEXTS[0], max_new_tokens=120))
        it = iter(long)
        first = next(it)  # the long request is running
        assert not long.done
        short = sched.submit(SpeechRequest(TEXTS[3], max_new_tokens=10))
        short_audio = short.audio()
        assert not long.done  # the short one finished while the long one still runs
        rest = list(it)
    finally:
        sched.close()
    assert 2 in steps.rows  # decode steps with both rows
    assert steps.rows.index(2) > steps.rows.index(1)  # ... after steps with the long one alone
    assert _rel(np.concatenate([first, *rest]), tts.synthesize(TEXTS[0], max_new_tokens=120)["audio"]) <= 1e-4
    assert _rel(short_audio, tts.synthesize(TEXTS[3], max_new_tokens=10)["audio"]) <= 1e-4


def test_cancel_frees_the_rows_at_the_next_step(tts):
    steps = _Steps()
    sched = BatchScheduler(tts, max_batch=4, observer=steps).start()
    try:
        doomed = sched.submit(SpeechRequest(TEXTS[1], max_new_tokens=200))
        other = sched.submit(SpeechRequest(TEXTS[2], max_new_tokens=60))
        it = iter(doomed)
        next(it)
        doomed.cancel()
        with pytest.raises(JobCancelled):
            list(it)
        n_at_cancel = len(steps.rows)
        other_audio = other.audio()
    finally:
        sched.close()
    assert steps.rows[-1] <= 1 and max(steps.rows[n_at_cancel + 1:], default=0) <= 1  # only `other` left
    assert doomed.tokens < 200
    assert _rel(other_audio, tts.synthesize(TEXTS[2], max_new_tokens=60)["audio"]) <= 1e-4


def test_a_long_request_does_not_starve_a_short_one(tts):
    """Two rows; a request of many sentences arrives first, then a one-sentence request: the short
    one gets the first row that frees up, before the long one's later sentences start."""
    many = " ".join(f"This is sentence number {i} of a long request." for i in range(6))
    sched = BatchScheduler(tts, max_batch=2).start()
    try:
        long = sched.submit(SpeechRequest(many, max_new_tokens=16))
        time.sleep(0.05)
        short = sched.submit(SpeechRequest(TEXTS[3], max_new_tokens=16))
        short.audio()
        assert not long.done
        long_audio = long.audio()
    finally:
        sched.close()
    assert short.finished_at < long.finished_at
    assert _rel(long_audio, tts.synthesize(many, max_new_tokens=16)["audio"]) <= 1e-4


def test_queue_limit_and_closing(tts):
    sched = BatchScheduler(tts, max_batch=1, max_queue=1).start()
    try:
        running = sched.submit(SpeechRequest(TEXTS[0], max_new_tokens=150))
        next(iter(running))  # it holds the only row
        waiting = sched.submit(SpeechRequest(TEXTS[2], max_new_tokens=8))
        with pytest.raises(QueueFullError) as exc:
            sched.submit(SpeechRequest(TEXTS[3], max_new_tokens=8))
        assert exc.value.retry_after_s > 0 and "max_queue 1" in str(exc.value)
        running.cancel()
    finally:
        sched.close(drain=True)  # drains: the waiting job completes
    assert waiting.done and waiting.error is None and len(waiting.audio()) > 0
    with pytest.raises(SchedulerClosedError):
        sched.submit(SpeechRequest(TEXTS[0], max_new_tokens=8))


def test_bad_requests_are_refused_before_queueing(tts):
    sched = BatchScheduler(tts)  # not started: nothing may reach the worker
    for req, match in [
        (SpeechRequest("", max_new_tokens=8), "text"),
        (SpeechRequest("hi there", max_new_tokens=0), "max_new_tokens"),
        (SpeechRequest("hi there", temperature=-1), "temperature"),
        (SpeechRequest("hi there", seed="abc"), "seed"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(InputError, match=match):
            sched.submit(req)
    assert sched.queue_depth == 0


def test_one_jobs_failure_leaves_the_others_alone(tts, monkeypatch):
    sched = BatchScheduler(tts, max_batch=4)
    window = sched._window

    def failing(r, *a):
        if r.job is bad:
            raise RuntimeError("decoder fault for this job only")
        return window(r, *a)

    monkeypatch.setattr(sched, "_window", failing)
    good = sched.submit(SpeechRequest(TEXTS[0], max_new_tokens=24))
    bad = sched.submit(SpeechRequest(TEXTS[2], max_new_tokens=24))
    sched.start()
    try:
        with pytest.raises(RuntimeError, match="this job only"):
            bad.audio()
        good_audio = good.audio()
    finally:
        sched.close()
    assert _rel(good_audio, tts.synthesize(TEXTS[0], max_new_tokens=24)["audio"]) <= 1e-4


def test_stateful_lm_is_refused_with_advice():
    fake = type("T", (), {"spec": type("S", (), {"stateful": True})(), "lm_path": "soprano_lm_stateful.xml"})()
    with pytest.raises(InputError, match="soprano_lm_step.xml"):
        BatchScheduler(fake)


def test_slot_cache_rows_join_leave_and_grow():
    names = ["past_key_0", "past_value_0"]
    c = SlotCache(names, capacity=3, kv_heads=1, head_dim=2, bucket=4)
    row = lambda n, v: [np.full((1, 1, n, 2), v, np.float32), np.full((1, 1, n, 2), -v, np.float32)]  # noqa: E731
    c.add(row(2, 1.0))
    assert (c.used, c.width, c.rows, c.slots) == (2, 4, 1, 1)
    c.add(row(3, 2.0))  # no free slot: slots double; each row at its own columns [0, n)
    assert c.feed()["attention_mask"].tolist() == [[1, 1, 0, 0, 1], [1, 1, 1, 0, 1]]  # width 4 + the new token
    assert c.arrays[0][0, 0, :2, 0].tolist() == [1.0, 1.0] and not c.arrays[0][0, 0, 2:].any()
    c.append([np.full((2, 1, 1, 2), 9.0, np.float32)] * 2)  # row 1 fills width 4: grows, keeps all columns
    assert c.used == 4 and c.width == 8 and c.lens[:2].tolist() == [3, 4]
    assert c.mask[:2, :4].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]] and c.arrays[0][0, 0, 2, 0] == 9.0
    assert c.remove(0) == 1  # the last row moves into slot 0
    assert c.rows == 1 and c.mask[0, :4].tolist() == [1, 1, 1, 1] and c.arrays[0][0, 0, 0, 0] == 2.0
    assert c.feed()["past_key_0"].shape == (1, 1, 8, 2)
    c.add(row(1, 3.0))  # into the free slot, at column 0
    assert (c.rows, c.slots) == (2, 2) and c.mask[1, :4].tolist() == [1, 0, 0, 0] and c.arrays[1][1, 0, 0, 0] == -3.0
    c.add(row(1, 4.0))  # no free slot: slots double, up to the capacity (3)
    assert (c.rows, c.slots) == (3, 3) and c.arrays[0][1, 0, 0, 0] == 3.0 and c.arrays[0][2, 0, 0, 0] == 4.0
    assert c.mask[0, :4].tolist() == [1, 1, 1, 1] and c.arrays[0][0, 0, 0, 0] == 2.0  # the other rows kept
    with pytest.raises(RuntimeError, match="full"):
        c.add(row(1, 5.0))
    c.remove(0)  # the longest row (4 tokens) leaves: the width narrows to one bucket
    assert c.width == 4 and c.lens[:2].tolist() == [1, 1] and c.arrays[0][0, 0, 0, 0] == 4.0
    for _ in range(2):
        c.remove(0)
    assert c.rows == 0 and c.used == 0 and c.slots == 0 and c.arrays == []


def test_a_consumer_whose_event_loop_closed_disturbs_no_other_job(tts):
    """An async consumer gives up (wait_for times out) and its event loop closes while its job is still
    queued; the job is then cancelled. The other job, and the worker, go on."""
    import asyncio

    sched = BatchScheduler(tts, max_batch=1).start()
    try:
        busy = sched.submit(SpeechRequest(" ".join(f"Sentence {i} of the busy job." for i in range(4)), max_new_tokens=12))
        queued = [sched.submit(SpeechRequest(TEXTS[3], max_new_tokens=8)) for _ in range(2)]

        async def give_up(job):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(job.__aiter__().__anext__(), 0.01)

        for job in queued:
            asyncio.run(give_up(job))  # each run closes its loop, leaving a waiter behind
            job.cancel()
        assert len(busy.audio()) > 0
        later = sched.submit(SpeechRequest(TEXTS[2], max_new_tokens=8))
        assert len(later.audio()) > 0
        assert sched._thread.is_alive()
    finally:
        sched.close()


def test_one_token_requests_are_refused_and_idle_batches_hold_no_cache(openvino_tts):
    import gc
    import weakref

    held = []

    class Watch(_Steps):
        def on_step(self, rows, queued, tokens, seconds):
            super().on_step(rows, queued, tokens, seconds)
            if rows and sched._cache.arrays:
                held.append(weakref.ref(sched._cache.arrays[0]))

    sched = BatchScheduler(openvino_tts, max_batch=4, observer=Watch())
    with pytest.raises(InputError, match="max_new_tokens 1 .*audio needs at least two"):
        sched.submit(SpeechRequest(TEXTS[0], max_new_tokens=1))
    sched.start()
    try:
        for job in [sched.submit(SpeechRequest(t, max_new_tokens=10)) for t in TEXTS[:3]]:
            job.audio()
        deadline = time.monotonic() + 10
        while sched.active_rows and time.monotonic() < deadline:
            time.sleep(0.01)
        gc.collect()
        assert held and all(ref() is None for ref in held)  # the OpenVINO context let go of the arrays
    finally:
        sched.close()


class _Events:
    """Worker-side events in order: ("prefill", prompt length) and ("window", job, first block)."""

    def __init__(self, sched: BatchScheduler) -> None:
        self.items: list[tuple] = []
        window, prefill = sched._window, sched._prefill

        def on_window(r, start, end, last):
            self.items.append(("window", r.job, start))
            return window(r, start, end, last)

        def on_prefill(lm, prompt):
            self.items.append(("prefill", len(prompt)))
            return prefill(lm, prompt)

        sched._window, sched._prefill = on_window, on_prefill


def _ahead_s(job) -> float:
    return job.play_end - time.perf_counter()


def _long_job_then_a_new_one(tts, ahead_s=0.6, **scheduler):
    """A long request streams until its listener has over `ahead_s` of audio in hand; then a new
    request comes. Default: small later windows (max_chunk 4): the long one has a window due every
    fourth step, so one falls in the new row's wait (its prefill, then four steps). The events, the
    jobs, their audio, the scheduler."""
    scheduler = {"max_batch": 4, "first_chunk": 1, "chunk_growth": 4, "max_chunk": 4, "margin_s": 0.05, **scheduler}
    sched = BatchScheduler(tts, **scheduler)
    events = _Events(sched)
    sched.start()
    try:
        long = sched.submit(SpeechRequest(TEXTS[4], max_new_tokens=400))
        chunks = []
        for chunk in long:
            chunks.append(chunk)
            if _ahead_s(long) > ahead_s:
                break
        assert not long.done  # still running when the new request comes
        new = sched.submit(SpeechRequest(TEXTS[2], max_new_tokens=24))
        new_audio = new.audio()
        long_audio = np.concatenate([*chunks, *long])
    finally:
        sched.close()
    return events.items, long, new, long_audio, new_audio, sched


def _windows_while_waiting(items, long, new):
    """The long job's windows decoded between the new job's prefill and its first window."""
    joined = max(i for i, e in enumerate(items) if e[0] == "prefill")  # the new job's (the long one's came first)
    first = next(i for i, e in enumerate(items) if e[0] == "window" and e[1] is new)
    return [e for e in items[joined:first] if e[0] == "window" and e[1] is long]


def test_a_new_rows_first_audio_does_not_wait_behind_later_windows(tts):
    """Deadline policy: while the new request waits for its first audio, the long one (far ahead of
    real time) decodes nothing; both results still equal solo synthesis."""
    items, long, new, long_audio, new_audio, _ = _long_job_then_a_new_one(tts)
    assert _windows_while_waiting(items, long, new) == []
    assert _rel(long_audio, tts.synthesize(TEXTS[4], max_new_tokens=400)["audio"]) <= 1e-4
    assert _rel(new_audio, tts.synthesize(TEXTS[2], max_new_tokens=24)["audio"]) <= 1e-4


def test_deferred_rows_are_not_starved(tts):
    """Requests keep coming (someone always waits for first audio) while a long one runs: the long
    one's windows still go out before its listener runs dry (its slack falls under the margin), and
    every job finishes with its solo audio."""
    sched = BatchScheduler(tts, max_batch=3, chunk_growth=2, max_chunk=4, margin_s=0.3)
    events = _Events(sched)
    sched.start()
    try:
        long = sched.submit(SpeechRequest(TEXTS[1], max_new_tokens=120))
        jobs, got = [], {}
        deadline = time.monotonic() + 60
        while not long.done and time.monotonic() < deadline:
            jobs.append(sched.submit(SpeechRequest(TEXTS[len(jobs) % 8], max_new_tokens=12)))
            time.sleep(0.01)
            if len(jobs) > 2:
                got[len(jobs) - 3] = jobs[-3].audio()  # at most three in flight besides the long one
        long_audio = long.audio()
        got = [got[i] if i in got else j.audio() for i, j in enumerate(jobs)]
    finally:
        sched.close()
    assert long.done and long.error is None and all(j.done and j.error is None for j in jobs)
    assert len(jobs) >= 3 and len([e for e in events.items if e[0] == "window" and e[1] is long]) >= 3
    assert _rel(long_audio, tts.synthesize(TEXTS[1], max_new_tokens=120)["audio"]) <= 1e-4
    for j, g in zip(jobs, got):
        assert _rel(g, tts.synthesize(j.request.text, max_new_tokens=12)["audio"]) <= 1e-4


def test_a_later_sentence_starts_after_its_jobs_first_audio(tts):
    """Deadline policy: a two-sentence request's second sentence is prefilled only once the first has
    sent audio, so its prefill does not delay that first audio; the audio still equals solo synthesis."""
    sched = BatchScheduler(tts, max_batch=4)
    events = _Events(sched)
    text = TEXTS[1]  # two sentences
    job = sched.submit(SpeechRequest(text, max_new_tokens=20))
    sched.start()
    try:
        audio = job.audio()
    finally:
        sched.close()
    kinds = [e[0] for e in events.items]
    assert kinds[0] == "prefill" and kinds[1] == "window" and kinds.count("prefill") == 2
    assert _rel(audio, tts.synthesize(text, max_new_tokens=20)["audio"]) <= 1e-4


def test_scheduler_settings_are_validated(tts):
    with pytest.raises(InputError, match="margin_s"):
        BatchScheduler(tts, margin_s=-1)
    with pytest.raises(InputError, match="max_unread_s"):
        BatchScheduler(tts, max_unread_s=0)
    with pytest.raises(InputError, match="max_prefill_tokens"):
        BatchScheduler(tts, max_prefill_tokens=0)


def test_deadline_decodes_long_sentences_in_bounded_windows(tts, monkeypatch):
    """A sentence whose windows waited (others waiting for first audio) is never decoded as one call over
    its whole length: every decoder call holds at most max_chunk blocks plus the context on both sides;
    the audio still equals solo synthesis."""
    sizes: list[int] = []
    decode = tts._decode

    def recording(hidden):
        sizes.append(int(hidden.shape[1]))
        return decode(hidden)

    monkeypatch.setattr(tts, "_decode", recording)
    sched = BatchScheduler(tts, max_batch=4, max_chunk=8).start()
    try:
        jobs = [sched.submit(SpeechRequest(t, max_new_tokens=60)) for t in TEXTS[:4]]
        got = [np.concatenate(list(j)) for j in jobs]
    finally:
        sched.close()
    monkeypatch.setattr(tts, "_decode", decode)
    limit = 8 + 2 * tts.stream_context + 1
    assert sizes and max(sizes) <= limit, (max(sizes), limit)
    for g, t in zip(got, TEXTS[:4]):
        assert _rel(g, tts.synthesize(t, max_new_tokens=60)["audio"]) <= 1e-4


def _stream_one(tts, min_window):
    """One long sentence whose second regular window is out of reach of its first chunk's audio
    (first_chunk 1 block = 64 ms, then 256 blocks): blocks per window, the job, its audio."""
    sched = BatchScheduler(tts, max_batch=2, first_chunk=1, chunk_growth=256, max_chunk=256, min_window=min_window)
    blocks: list[int] = []
    window = sched._window

    def recording(r, start, end, last):
        blocks.append(end - start)
        return window(r, start, end, last)

    sched._window = recording
    sched.start()
    try:
        job = sched.submit(SpeechRequest(TEXTS[0], max_new_tokens=300))
        audio = job.audio()
    finally:
        sched.close()
    return blocks, job, audio


def test_an_early_window_keeps_the_listener_playing(tts):
    """Deadline policy: when a row's next regular window (`chunk` blocks) would come after its listener
    ran dry, a shorter window of the blocks already exact (at least min_window) goes out in time.
    Without it (min_window 256, as large as the chunk), the listener waits for the 256-block window
    (a stall); with it, there are windows between the first and the 256-block one, the stall is
    shorter, and the audio is the same solo synthesis."""
    late_blocks, late, late_audio = _stream_one(tts, min_window=256)
    early_blocks, early, early_audio = _stream_one(tts, min_window=4)
    solo = tts.synthesize(TEXTS[0], max_new_tokens=300)["audio"]
    assert _rel(late_audio, solo) <= 1e-4 and _rel(early_audio, solo) <= 1e-4
    assert late_blocks[:2] == [1, 256], late_blocks  # the first block, then the 256-block window
    assert late.stalls >= 1
    middle = early_blocks[1:early_blocks.index(256)] if 256 in early_blocks else early_blocks[1:-1]
    assert len(middle) >= 1 and min(middle) >= 4 and max(middle) < 256, early_blocks
    assert early.stall_s < late.stall_s, (early.stall_s, late.stall_s)


@pytest.mark.parametrize("which", ["tts", "openvino_tts"])
def test_first_audio_lane_steps_new_rows_alone_and_changes_no_audio(request, which):
    """Deadline policy: a request that comes while another's listener is well ahead runs its first
    steps alone (lane steps: the long row skips them, its KV cache keeps a masked gap), and both
    results still equal solo synthesis; with lane=False no step runs a subset of the batch. Both
    backends (OpenVINO: the step IR, whose inputs are then views of the batch's tail rows)."""
    tts = request.getfixturevalue(which)
    scene = {"ahead_s": 1.0, "first_chunk": 1, "chunk_growth": 8, "max_chunk": 64, "margin_s": 0.15}
    _, _, _, long_audio, new_audio, sched = _long_job_then_a_new_one(tts, lane=True, **scene)
    assert sched.lane_steps >= tts.stream_context, sched.lane_steps
    assert _rel(long_audio, tts.synthesize(TEXTS[4], max_new_tokens=400)["audio"]) <= 1e-4
    assert _rel(new_audio, tts.synthesize(TEXTS[2], max_new_tokens=24)["audio"]) <= 1e-4
    _, _, _, long_audio, new_audio, sched = _long_job_then_a_new_one(tts, lane=False, **scene)
    assert sched.lane_steps == 0
    assert _rel(new_audio, tts.synthesize(TEXTS[2], max_new_tokens=24)["audio"]) <= 1e-4


@pytest.mark.parametrize("in_place", [False, True])
def test_slot_cache_keeps_each_rows_history_through_joins_leaves_swaps_and_partial_steps(in_place):
    """SlotCache alone, random operations: rows join (prompts of any length), leave, swap slots, and
    steps run the whole batch or only its tail rows (the first-audio lane), the new keys given as the
    traced model's new_* or written by the model into its buffers (in_place). After each operation every
    row attends exactly its own keys, in order (the mask's ones), and the new token's column."""
    rng = np.random.default_rng(7)
    cache = SlotCache(["k"], capacity=6, kv_heads=1, head_dim=1, bucket=4, in_place=in_place)
    history: list[list[float]] = []  # per slot, the row's keys in order
    value = 0.0

    def keys(n):
        nonlocal value
        out = [value + i for i in range(n)]
        value += n
        return out

    for _ in range(400):
        op = rng.integers(4)
        if (op == 0 or cache.rows == 0) and cache.rows < 6:
            h = keys(int(rng.integers(1, 12)))
            cache.add([np.array(h, dtype=np.float32).reshape(1, 1, -1, 1)])
            history.append(h)
        elif op == 1 and cache.rows > 1:
            r = int(rng.integers(cache.rows))
            moved = cache.remove(r)
            if moved is not None:
                history[r] = history[moved]
            history.pop()
        elif op == 2 and cache.rows > 1:
            i, j = (int(x) for x in rng.choice(cache.rows, 2, replace=False))
            cache.swap(i, j)
            history[i], history[j] = history[j], history[i]
        else:
            lo = int(rng.integers(cache.rows))  # 0: the whole batch
            feed = cache.feed(lo)
            assert feed["k"].shape[0] == feed["attention_mask"].shape[0] == cache.rows - lo
            new = keys(cache.rows - lo)
            if in_place:  # the model writes each row's new column in the fed buffer (a view of the arrays)
                feed["k"][np.arange(cache.rows - lo), 0, cache.lens[lo: cache.rows], 0] = new
                cache.append(lo=lo)
            else:
                cache.append([np.array(new, dtype=np.float32).reshape(-1, 1, 1, 1)], lo)
            for i, v in zip(range(lo, cache.rows), new):
                history[i].append(v)
        for i in range(cache.rows):
            mask = cache.mask[i]
            n = len(history[i])
            if in_place:  # ones over the row's tokens and its new column
                assert mask.tolist() == [1] * (n + 1) + [0] * (cache.width - n - 1)
            else:
                assert mask[cache.width] == 1 and mask[: cache.width].tolist() == [1] * n + [0] * (cache.width - n)
            attended = cache.arrays[0][i, 0, :n, 0]
            assert attended.tolist() == history[i], (i, attended.tolist(), history[i])


def test_a_row_sits_out_a_lane_step_only_while_its_listener_has_audio_enough(tts):
    """_can_skip: the listener's audio (sent, plus the blocks a window would send now) must outlast the
    steps the row still needs before its next window, one more step and 30 ms; blocks too few for a
    window do not count; a job with nothing sent yet has nobody listening."""
    from pipeline_lib.runtime.scheduler import SpeechJob, _Row

    sched = BatchScheduler(tts, first_chunk=1, chunk_growth=8, max_chunk=64, min_window=4)
    sched._row_period = 0.03  # 30 ms per token: faster than real time (a block is 64 ms)
    job = SpeechJob(SpeechRequest(TEXTS[0]), tts.sample_rate)
    row = _Row(job, 0, [1, 2, 3], tts.spec.vocab_size, tts.spec.hidden_size, 1)
    ctx = tts.stream_context
    row.chunk, row.emitted = 64, 10
    now = time.perf_counter()
    assert sched._can_skip(row, now)  # nothing sent yet
    job.first_audio_at = now
    row.n = row.emitted + 1 + ctx + 1  # 1 exact block: fewer than min_window, not counted
    job.play_end = now + 0.10  # needs 3 more steps + 1 + 30 ms = 150 ms
    assert not sched._can_skip(row, now)
    job.play_end = now + 0.20
    assert sched._can_skip(row, now)
    row.n = row.emitted + 1 + ctx + 4  # 4 exact blocks: an early window could send 256 ms now
    job.play_end = now + 0.0
    assert sched._can_skip(row, now)
    sched._row_period = 0.1  # slower than real time: no early windows, a window needs all 64 blocks
    job.play_end = now + 1.0
    assert not sched._can_skip(row, now)


LONG_TEXT = ("123456789 " * 410)[:4096]  # the long request: 97 sentences


def test_a_full_queue_refuses_before_preparing_the_text(tts, monkeypatch):
    """A 429 costs milliseconds: the queue's room is checked before the text is prepared."""
    sched = BatchScheduler(tts, max_queue=1)  # not started: the first job stays queued
    sched.submit(SpeechRequest(TEXTS[0]))
    prepared = []
    monkeypatch.setattr(tts, "prepare", lambda texts: prepared.append(texts))
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        with pytest.raises(QueueFullError):
            sched.submit(SpeechRequest(LONG_TEXT))
        times.append(time.perf_counter() - t0)
    assert prepared == []
    assert sorted(times)[18] < 0.005  # p95 of 20


def test_a_client_that_stops_reading_parks_its_rows_then_resumes_with_the_same_audio(tts):
    """Backpressure: with `max_unread_s` unread the job's rows leave the batch (no token is made
    while the client reads nothing), the unread audio stays bounded, and once the client reads on,
    the rows rejoin with their own KV history: the audio equals solo synthesis."""
    text, n = TEXTS[1], 160  # two sentences of 160 tokens: about 20 s of audio
    sched = BatchScheduler(tts, max_batch=4, max_chunk=8, max_unread_s=1.0).start()
    try:
        job = sched.submit(SpeechRequest(text, max_new_tokens=n))
        chunks = [next(iter(job))]  # one chunk read, then nothing
        _wait_for(lambda: sched.parks >= 1)
        time.sleep(0.2)
        tokens = job.tokens
        time.sleep(0.5)
        assert job.tokens == tokens  # flat while stuck
        assert not job.done and job.unread_s <= 1.0 + 2 * 8 * sched._block_s  # the bound, plus a window or two
        chunks += list(job)
    finally:
        sched.close()
    assert job.error is None
    assert _rel(np.concatenate(chunks), tts.synthesize(text, max_new_tokens=n)["audio"]) <= 1e-4


def test_a_client_that_reads_nothing_for_read_timeout_s_is_cancelled(tts):
    sched = BatchScheduler(tts, max_unread_s=0.5, read_timeout_s=0.5).start()
    try:
        job = sched.submit(SpeechRequest(TEXTS[1], max_new_tokens=200))
        _wait_for(lambda: job.done, timeout=60)
    finally:
        sched.close()
    with pytest.raises(JobCancelled, match="read_timeout_s"):
        job.audio()


def _scene_listener_stall(tts, long_text, long_tokens, delay_s=1.0, **settings):
    """The issue's scene: a listener streams "Hello there." (300 tokens, read as it comes); `delay_s`
    later, if given, a long request comes (read as it comes too), with BatchScheduler `settings`.
    The listener's total stall (s), the most rows in the batch while the listener ran, the long job
    (None without one)."""
    import threading

    sched = BatchScheduler(tts, **settings).start()
    rows_seen = []

    def drain(job):
        for _ in job:
            rows_seen.append(len(sched.rows)) if job is listener else None

    try:
        listener = sched.submit(SpeechRequest("Hello there.", max_new_tokens=300))
        t = threading.Thread(target=drain, args=(listener,))
        t.start()
        long = None
        if long_text is not None:
            time.sleep(delay_s)
            long = sched.submit(SpeechRequest(long_text, max_new_tokens=long_tokens))
            t2 = threading.Thread(target=drain, args=(long,))
            t2.start()
        t.join()
        if long is not None:
            t2.join()
    finally:
        sched.close()
    assert listener.error is None and listener.done
    return listener.stall_s, max(rows_seen), long


@pytest.mark.slow
def test_a_long_request_beside_a_listener_keeps_it_playing(tts):
    """The issue's scene on tiny: a listener, then a many-sentence request. Paced, the long request
    runs one or two rows beside the listener, so the listener's stall stays near what it is alone
    on this machine (twice that plus 1 s: the same test measures both; CI machines are shared, and
    on a loaded one tiny alone stalls too), and the long request completes. Before pacing it took 15 of 16
    rows and the listener stalled for seconds (65 s with the 4096-character text, 2 cores shared)."""
    alone, _, _ = _scene_listener_stall(tts, None, 0)
    stall, rows, long = _scene_listener_stall(tts, LONG_TEXT[:1200], 32)
    assert long.done and long.error is None and len(long._ids) >= 20
    assert rows <= 3  # the listener's row, and at most two of the long request's
    print(f"listener stall alone {alone:.3f} s, beside the long request {stall:.3f} s, rows {rows}")
    assert stall <= 2 * alone + 1.0, (stall, alone)


def _wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_jobs_next_sentence_waits_until_its_listener_is_not_dry(tts):
    """Right after a one-block first window (64 ms of audio, under margin_s) the job's listener is running
    dry: the job, alone on the engine, starts its second sentence only after more windows of its first
    one (pacing.wants_next_sentence's hold), not right after that first window; the audio still equals
    solo synthesis."""
    sched = BatchScheduler(tts, max_batch=4, first_chunk=1, sized_first_window=False)
    events = _Events(sched)
    sched.start()
    try:
        job = sched.submit(SpeechRequest(TEXTS[1], max_new_tokens=48))  # two sentences
        audio = job.audio()
    finally:
        sched.close()
    kinds = [e[0] for e in events.items]
    assert kinds.count("prefill") == 2, kinds
    second = kinds.index("prefill", 1)
    assert kinds[1] == "window" and kinds[1:second].count("window") >= 2, kinds[:second + 1]
    assert _rel(audio, tts.synthesize(TEXTS[1], max_new_tokens=48)["audio"]) <= 1e-4


def test_a_request_arriving_during_a_burst_of_prefills_is_prefilled_next(tts):
    """A job alone on the engine takes every free row for its later sentences, one more per iteration
    (not a burst of prefills in one). A request submitted during the first of them is prefilled next:
    the rest of the long job's sentences wait, since it is no longer alone (one or two rows beside
    another job). Both results still equal solo synthesis."""
    long_text = " ".join(TEXTS[i] for i in (0, 2, 4, 5, 6, 7))  # six sentences (prepare may join short ones)
    sched = BatchScheduler(tts, max_batch=8, max_prefill_tokens=4096)
    prompts: list[tuple[int, ...]] = []
    jobs: dict[str, object] = {}
    prefill = sched._prefill

    def on_prefill(lm, prompt):
        prompts.append(tuple(prompt))
        if len(prompts) == 2:  # the long job's first later sentence, taken while it is alone
            jobs["new"] = sched.submit(SpeechRequest(TEXTS[3], max_new_tokens=24))
        return prefill(lm, prompt)

    sched._prefill = on_prefill
    sched.costs.admits = lambda *args: True  # capacity is not what this test is about (a loaded CI machine)
    sched.start()
    try:
        long = sched.submit(SpeechRequest(long_text, max_new_tokens=48))
        long_audio = long.audio()
        _wait_for(lambda: "new" in jobs)
        new_audio = jobs["new"].audio()
    finally:
        sched.close()
    assert len(long._ids) >= 4 and len(prompts) == len(long._ids) + 1, (len(long._ids), len(prompts))
    assert list(prompts[:2]) == [tuple(long._ids[0]), tuple(long._ids[1])]
    assert prompts[2] == tuple(jobs["new"]._ids[0]), "the newcomer waited behind the burst"
    assert _rel(long_audio, tts.synthesize(long_text, max_new_tokens=48)["audio"]) <= 1e-4
    assert _rel(new_audio, tts.synthesize(TEXTS[3], max_new_tokens=24)["audio"]) <= 1e-4

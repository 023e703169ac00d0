"""The hallucination guard with a model that loops (not random weights): the library (synthesize,
infer_stream), the scheduler and the server detect it, retry the sentence with a new draw, report it,
and never send the flagged run's audio.

`_LoopingLM` wraps the tiny checkpoint's LM: its logits favour one token (LOOP) and never [STOP]; a
forward fed LOOP gives the same hidden state every time, any other token a hidden state of its own,
far apart in L1. So greedy decoding loops from the second token on (the guard flags it after 16
near-repeats), and a retry, which samples (rules.RETRY_TEMPERATURE), leaves the loop."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from typing import Any, Iterator

import numpy as np
import pytest

from pipeline_lib.errors import InputError
from pipeline_lib.runtime.generate import generate
from pipeline_lib.runtime.rules import (
    HALLUCINATION_MAX_RUNLENGTH,
    RowRules,
    release_blocks,
    retry_generator,
    retry_params,
)
from pipeline_lib.runtime.sampling import DEFAULTS
from pipeline_lib.runtime.scheduler import BatchScheduler, SpeechRequest

TWO = "The first voice speaks of rivers and hills. A second one counts to three, then stops."
ONE = "Hello there, how are you?"
TOKENS = 24
SEED = 7
BLOCK = 2048  # samples per token at 32 kHz


class _LoopingLM:
    """See the module docstring. Delegates everything else (stream contexts, widths) to `inner`."""

    def __init__(self, inner: Any, hidden_size: int, vocab: int, stop_id: int, loop: int) -> None:
        self.inner, self.hidden_size, self.vocab, self.stop_id, self.loop = inner, hidden_size, vocab, stop_id, loop

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def stream(self) -> contextlib.AbstractContextManager[Any]:
        @contextlib.contextmanager
        def lease() -> Iterator[Any]:
            with self.inner.stream() as ctx:
                yield _LoopingLM(ctx, self.hidden_size, self.vocab, self.stop_id, self.loop)

        return lease()

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(self.inner.run(feed))
        ids = feed["input_ids"]
        b, s = ids.shape
        logits = np.zeros((b, s, self.vocab), np.float32)
        logits[..., self.loop] = 1.0
        logits[..., self.stop_id] = -100.0
        hidden = np.zeros((b, s, self.hidden_size), np.float32)
        axis = np.arange(self.hidden_size, dtype=np.float32)
        for r in range(b):
            tok = int(ids[r, -1])
            if tok != self.loop:
                hidden[r, -1] = 3.0 * np.sin(0.37 * tok * (axis + 1) + tok)
        out["logits"], out["hidden_states"] = logits, hidden
        return out


@pytest.fixture(scope="module")
def tts(tiny_export):
    from pipeline_lib.runtime.tts import SopranoTTS

    return SopranoTTS.from_dir(tiny_export, num_threads=2)


@pytest.fixture(scope="module")
def looping(tts):
    """The tiny model with its LM replaced by a looping one (the decoder, tokenizer, config kept)."""
    t = copy.copy(tts)
    spec = tts.spec
    loop = 100 if spec.stop_id != 100 else 101
    t.lm = _LoopingLM(tts.lm, spec.hidden_size, spec.vocab_size, spec.stop_id, loop)
    assert t.sample_rate == 32000 and t.samples_per_token == BLOCK
    return t


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_the_rule_flags_a_run_and_marks_the_clean_point():
    rules = RowRules(2, 4, stop_id=3, max_new_tokens=100, guard=True)
    moving = np.array([[0.0, 0, 0, 0], [1000.0, 0, 0, 0]], np.float32)
    reasons = []
    for step in range(40):
        h = np.stack([np.zeros(4, np.float32), moving[step % 2]])  # row 0 repeats, row 1 jumps
        keep, why = rules.take(np.array([5, 5]), h)
        reasons.append(list(why))
        if why[0]:
            break
    assert reasons[-1] == ["hallucination", ""] and len(reasons) == HALLUCINATION_MAX_RUNLENGTH + 2
    assert rules.clean == [1, len(reasons)]  # row 0: clean only at its first vector
    assert release_blocks("clean", 5, False, "") == 4 and release_blocks("sentence", 5, False, "") == 0
    assert release_blocks("clean", 5, True, "hallucination") == 4 and release_blocks("sentence", 5, True, "stop") == np.inf
    assert release_blocks(None, 0, False, "") == np.inf


def test_bad_guard_values_are_input_errors(tts):
    with pytest.raises(InputError, match="hallucination_retries must be an int in 0..4"):
        tts.synthesize(ONE, max_new_tokens=4, retries=9)
    with pytest.raises(InputError, match="holdback must be one of clean, sentence"):
        tts.infer_stream(ONE, max_new_tokens=4, hallucination_guard=True, holdback="later")
    with pytest.raises(InputError, match="hallucination_retries"):
        BatchScheduler(tts).submit(SpeechRequest(ONE, hallucination_retries=-1))


def test_without_the_guard_the_looping_model_runs_to_length(looping):
    r = looping.synthesize(TWO, max_new_tokens=TOKENS)
    assert r["finish_reasons"] == ["length", "length"] and r["retries"] == 0
    assert len(r["audio"]) == 2 * (TOKENS - 1) * BLOCK


def test_library_flags_and_keeps_only_the_clean_audio(looping):
    r = looping.synthesize(TWO, max_new_tokens=TOKENS, hallucination_guard=True)
    assert r["finish_reasons"] == ["hallucination", "hallucination"] and r["retries"] == 0
    # Clean through the 2nd vector (the prompt's and the first LOOP's differ), so one block each.
    assert r["hidden_lengths"] == [2, 2] and len(r["audio"]) == 2 * BLOCK


def test_library_retries_with_a_new_draw_and_keeps_the_retry(looping):
    r = looping.synthesize(TWO, max_new_tokens=TOKENS, retries=1, seed=SEED)
    assert r["finish_reasons"] == ["length", "length"]
    assert r["retries"] == 2 and r["sentence_retries"] == [1, 1]
    # The audio is the retried sentences': each drawn with the retry's own generator and settings.
    _, ids = looping.prepare([TWO])
    hidden = []
    for i, prompt in enumerate(ids):
        out = generate(looping.lm, looping.spec, [prompt], max_new_tokens=TOKENS, params=retry_params(DEFAULTS),
                       generators=[retry_generator(SEED, i, 1)], hallucination_guard=True)
        assert out.finish_reasons == ["length"]
        hidden += out.hidden
    want = np.concatenate(looping._decode_sentences(hidden)[0])
    assert _rel(r["audio"], want) <= 1e-5
    again = looping.synthesize(TWO, max_new_tokens=TOKENS, retries=1, seed=SEED)["audio"]
    np.testing.assert_array_equal(again, r["audio"])  # a seeded call retries the same way


def test_library_stream_retries_when_held_back_and_cuts_when_not(looping):
    whole = looping.synthesize(TWO, max_new_tokens=TOKENS, retries=1, seed=SEED)["audio"]
    held = np.concatenate(list(looping.infer_stream(TWO, max_new_tokens=TOKENS, retries=1, seed=SEED,
                                                    holdback="sentence")))
    assert _rel(held, whole) <= 1e-4
    # "clean": the first block went out before the flag, so no retry (it would repeat it): the
    # sentence ends at its clean block; the looping run is never yielded.
    clean = list(looping.infer_stream(TWO, max_new_tokens=TOKENS, retries=1, seed=SEED, holdback="clean"))
    assert sum(len(c) for c in clean) == 2 * BLOCK


class _Seen:
    def __init__(self) -> None:
        self.flags: list[bool] = []

    def on_step(self, rows, queued, tokens, seconds): ...
    def on_first_audio(self, seconds): ...
    def on_audio(self, seconds): ...

    def on_hallucination(self, retried):
        self.flags.append(retried)


@pytest.mark.parametrize("holdback", ["clean", "sentence"])
def test_scheduler_never_sends_a_flagged_run(looping, holdback):
    seen = _Seen()
    sched = BatchScheduler(looping, max_batch=4, observer=seen, holdback=holdback).start()
    try:
        guarded = sched.submit(SpeechRequest(TWO, max_new_tokens=TOKENS, hallucination_guard=True))
        chunks = list(guarded)
        plain = sched.submit(SpeechRequest(TWO, max_new_tokens=TOKENS))
        plain_audio = plain.audio()
    finally:
        sched.close()
    assert guarded.hallucinations == 2 and guarded.retries == 0 and seen.flags == [False, False]
    assert sum(len(c) for c in chunks) == 2 * BLOCK == guarded.samples  # all it ever pushed
    assert len(plain_audio) == 2 * (TOKENS - 1) * BLOCK and plain.hallucinations == 0


def test_scheduler_retries_as_the_library_does(looping):
    seen = _Seen()
    sched = BatchScheduler(looping, max_batch=4, observer=seen, holdback="sentence").start()
    try:
        job = sched.submit(SpeechRequest(TWO, max_new_tokens=TOKENS, seed=SEED, hallucination_retries=1))
        got = job.audio()
    finally:
        sched.close()
    want = looping.synthesize(TWO, max_new_tokens=TOKENS, retries=1, seed=SEED)["audio"]
    assert _rel(got, want) <= 1e-4
    assert job.hallucinations == 2 and job.retries == 2 and seen.flags == [True, True]


def test_scheduler_clean_holdback_cuts_instead_of_retrying(looping):
    sched = BatchScheduler(looping, max_batch=4, holdback="clean").start()
    try:
        job = sched.submit(SpeechRequest(ONE, max_new_tokens=TOKENS, seed=SEED, hallucination_retries=2))
        got = job.audio()
    finally:
        sched.close()
    assert job.hallucinations == 1 and job.retries == 0 and len(got) == BLOCK


# -- the server ---------------------------------------------------------------------------------


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_server_reports_retries_in_a_header_an_sse_field_and_metrics(looping):
    httpx = pytest.importorskip("httpx")
    from test_server import running, wait_ready

    from pipeline_lib.server.app import create_app
    from pipeline_lib.server.settings import Settings

    app = create_app(Settings(tts=looping, holdback="sentence"))
    body = {"model": "soprano", "input": ONE, "voice": "soprano", "max_new_tokens": TOKENS, "seed": SEED,
            "response_format": "pcm", "sample_rate": 32000}
    with running(app) as url:
        wait_ready(url)
        before = httpx.get(f"{url}/metrics").text
        r = httpx.post(f"{url}/v1/audio/speech", json={**body, "hallucination_retries": 1}, timeout=120)
        assert r.status_code == 200
        assert r.headers["x-soprano-hallucinations"] == "1" and r.headers["x-soprano-hallucination-retries"] == "1"
        want = looping.synthesize(ONE, max_new_tokens=TOKENS, retries=1, seed=SEED)["audio"]
        assert len(r.content) // 2 == len(want)
        plain = httpx.post(f"{url}/v1/audio/speech", json=body, timeout=120)
        assert plain.headers["x-soprano-hallucination-retries"] == "0"
        assert len(plain.content) // 2 == (TOKENS - 1) * BLOCK
        # SSE, guard on, no retries: the done event counts the flag; the flagged run is never sent.
        sse = httpx.post(f"{url}/v1/audio/speech", json={**body, "hallucination_guard": True,
                                                          "stream_format": "sse"}, timeout=120)
        events = [json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: ")]
        done = events[-1]
        assert done["type"] == "speech.audio.done" and done["hallucinations"] == 1 and done["hallucination_retries"] == 0
        import base64

        sent = sum(len(base64.b64decode(e["audio"])) for e in events if e["type"] == "speech.audio.delta")
        assert sent // 2 == BLOCK  # clean through the 2nd vector: the cut keeps 1 block, sent once it ended
        time.sleep(0.1)
        after = httpx.get(f"{url}/metrics").text
    assert _metric(after, "soprano_hallucinations_total") - _metric(before, "soprano_hallucinations_total") == 2
    assert (_metric(after, "soprano_hallucination_retries_total")
            - _metric(before, "soprano_hallucination_retries_total")) == 1

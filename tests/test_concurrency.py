"""One SopranoTTS from many threads and many live streams, on both backends (issue: nothing lost,
nothing corrupted). Calls on an instance are serialised by the backends' locks; each generation
runs on a context of its own (IO binding / infer request, KV state), so results equal solo runs."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from pipeline_lib.runtime.tts import SopranoTTS

TOKENS = 24
TEXTS = [
    "The first voice speaks of rivers and hills.",
    "A second one counts to three, then stops.",
    "Number three asks a question, does it not?",
    "Four is short.",
    "Five talks about the weather in the mountains today.",
    "Six reads a list: apples, pears and plums.",
    "Seven whispers something nobody hears.",
    "Eight ends the row with a long and winding sentence about nothing much.",
]


@pytest.fixture(scope="module", params=["onnx_cpu", "openvino_cpu"])
def engine(request, tiny_export):
    """(tts, solo audio per text, solo stream chunks per text) for one backend."""
    if request.param == "openvino_cpu":
        tts = SopranoTTS.from_dir(request.getfixturevalue("tiny_openvino"), backend="openvino_cpu", num_threads=2)
        assert tts.lm.stateful  # the stateful LM: its KV cache lives in the infer request
    else:
        tts = SopranoTTS.from_dir(tiny_export, num_threads=2)
    solo = [tts.synthesize(t, max_new_tokens=TOKENS)["audio"] for t in TEXTS]
    streams = [list(tts.infer_stream(t, max_new_tokens=TOKENS)) for t in TEXTS]
    return tts, solo, streams


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _in_threads(fn, n: int) -> list:
    results, errors = [None] * n, []

    def work(i: int) -> None:
        try:
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_eight_threads_on_one_instance_equal_solo_runs(engine):
    tts, solo, _ = engine
    worst = 0.0
    for _ in range(20):
        got = _in_threads(lambda i: tts.synthesize(TEXTS[i], max_new_tokens=TOKENS)["audio"], 8)
        worst = max(worst, *(_rel(g, s) for g, s in zip(got, solo)))
    assert worst <= 1e-5, worst


def test_three_interleaved_streams_equal_solo_streams(engine):
    tts, solo, streams = engine
    gens = [tts.infer_stream(TEXTS[i], max_new_tokens=TOKENS) for i in range(3)]
    got: list[list[np.ndarray]] = [[], [], []]
    live = [0, 1, 2]
    while live:  # one chunk from each live stream in turn
        for i in list(live):
            try:
                got[i].append(next(gens[i]))
            except StopIteration:
                live.remove(i)
    for i in range(3):
        assert len(got[i]) == len(streams[i])
        assert _rel(np.concatenate(got[i]), np.concatenate(streams[i])) <= 1e-5
        assert _rel(np.concatenate(got[i]), solo[i]) <= 1e-5  # and streaming stays lossless


def test_streams_in_threads_and_an_abandoned_stream(engine):
    tts, _, streams = engine
    abandoned = tts.infer_stream(TEXTS[7], max_new_tokens=TOKENS)
    next(abandoned)  # a live stream that nobody finishes: others must not see its state
    got = _in_threads(lambda i: np.concatenate(list(tts.infer_stream(TEXTS[i], max_new_tokens=TOKENS))), 4)
    for i in range(4):
        assert _rel(got[i], np.concatenate(streams[i])) <= 1e-5
    rest = list(abandoned)  # and it still finishes correctly afterwards
    assert _rel(np.concatenate([streams[7][0], *rest]), np.concatenate(streams[7])) <= 1e-5


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
def test_stress_mixed_calls_from_eight_threads(engine):
    """200 calls from 8 threads: synthesize, infer_stream abandoned midway, infer_batch. No exception,
    every completed result equal to its solo run, RSS within 10% of its level after warm-up."""
    tts, solo, streams = engine
    rng = random.Random(7)
    plan = [(rng.choice(["synth", "abandon", "batch"]), rng.randrange(8)) for _ in range(200)]
    lock = threading.Lock()
    rss: dict[str, int] = {}
    done = [0]
    worst = [0.0]

    def call(kind: str, i: int) -> None:
        if kind == "synth":
            err = _rel(tts.synthesize(TEXTS[i], max_new_tokens=TOKENS)["audio"], solo[i])
        elif kind == "batch":
            j = (i + 3) % 8
            a, b = tts.infer_batch([TEXTS[i], TEXTS[j]], max_new_tokens=TOKENS)
            err = max(_rel(a, solo[i]), _rel(b, solo[j]))
        else:
            gen = tts.infer_stream(TEXTS[i], max_new_tokens=TOKENS)
            first = next(gen)
            gen.close()  # abandoned midway
            err = _rel(first, streams[i][0])
        with lock:
            worst[0] = max(worst[0], err)
            done[0] += 1
            if done[0] == 40:
                rss["warm"] = _rss_bytes()

    def worker(k: int) -> None:
        for kind, i in plan[k::8]:
            call(kind, i)

    _in_threads(worker, 8)
    rss["end"] = _rss_bytes()
    assert done[0] == 200
    assert worst[0] <= 1e-5, worst[0]
    assert rss["end"] <= 1.10 * rss["warm"], rss

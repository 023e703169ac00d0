"""kv_cache.prefill_row hands the heap's freed pages back after a long prompt (release_free_heap):
ONNX Runtime's prefill of a ~220-token prompt leaves about 4-5 MiB of freed heap resident, which a
server's parked rows (a stuck reader's long request) otherwise keep (docs/design.md, "The scene over
HTTP, committed")."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_lib.runtime import kv_cache


@pytest.fixture(scope="module")
def tts(tiny_export):
    from pipeline_lib.runtime.tts import SopranoTTS

    return SopranoTTS.from_dir(tiny_export, stateful=False, static_decode_width=None, num_threads=2)


def test_a_long_prefill_trims_the_heap_and_a_short_one_does_not(tts, monkeypatch):
    calls = []
    monkeypatch.setattr(kv_cache, "release_free_heap", lambda: calls.append(1) or True)
    rng = np.random.default_rng(0)
    long_prompt = [int(t) for t in rng.integers(10, 500, kv_cache.TRIM_AFTER_PREFILL_TOKENS)]
    short = long_prompt[:kv_cache.TRIM_AFTER_PREFILL_TOKENS - 1]
    kv_cache.prefill_row(tts.lm, tts.spec, short)
    assert calls == []
    kv, logits, hidden = kv_cache.prefill_row(tts.lm, tts.spec, long_prompt)
    assert calls == [1]
    # the trim changes nothing the caller gets: the same row as without it
    monkeypatch.setattr(kv_cache, "TRIM_AFTER_PREFILL_TOKENS", 10**9)
    kv2, logits2, hidden2 = kv_cache.prefill_row(tts.lm, tts.spec, long_prompt)
    assert calls == [1]
    assert kv[0].shape[2] == len(long_prompt)
    for a, b in zip(kv, kv2):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(logits, logits2)
    np.testing.assert_array_equal(hidden, hidden2)

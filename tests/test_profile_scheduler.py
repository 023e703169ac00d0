"""scripts/profile_scheduler.py: the worker's time split under a closed-loop load, on the tiny export."""

from __future__ import annotations


import pytest



@pytest.fixture(scope="module")
def prof(load_script):
    return load_script("profile_scheduler")


def test_run_level_accounts_for_the_worker(prof, tiny_export):
    """Every job completes with audio; every sentence is one prefill and has windows; the timed phases
    fit inside the wall time; steps ran with the clients' rows in the batch."""
    from pipeline_lib.runtime.tts import SopranoTTS

    tts = SopranoTTS.from_dir(tiny_export, num_threads=1, stateful=False, static_decode_width=None)
    r = prof.run_level(tts, clients=3, seconds=0.6, max_new_tokens=8, max_batch=16)
    assert r["jobs"] >= 3
    assert r["xrt"] > 0
    assert r["prefills"] >= r["jobs"]  # one per sentence; texts have 1-2 sentences
    assert r["windows"] >= r["prefills"]  # at least one window per sentence
    assert 0 < r["window_tokens_mean"] <= 8 + 2 * tts.stream_context
    assert r["steps"] > 0 and 1.0 <= r["rows_mean"] <= 3 * 2
    timed = r["step_s"] + r["prefill_s"] + r["decoder_s"] + r["sample_s"]
    assert 0 < timed <= r["wall_s"] * 1.05
    assert 0 < r["ttfa_p50_ms"] <= r["ttfa_p95_ms"]


def test_main_prints_ratios(prof, tiny_export, capsys):
    assert prof.main(["--model", str(tiny_export), "--threads", "1", "--clients", "1", "2", "--seconds", "0.4",
                      "--max-new-tokens", "6", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "clients  1: xRT" in out and "clients  2: xRT" in out
    assert "2 clients over 1: xRT ratio" in out

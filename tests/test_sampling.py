"""Sampling semantics against transformers' logits processors (the oracle; the runtime itself never
imports torch or transformers)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_lib.errors import InputError
from pipeline_lib.runtime.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    process_logits,
    row_generators,
    select_tokens,
    top_k_filter,
    top_p_filter,
)

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")

B, V = 6, 300


def _logits(seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((B, V)) * scale).astype(np.float32)


def _ids(seed: int = 1, length: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=(B, length))


def _seen(ids: np.ndarray) -> np.ndarray:
    seen = np.zeros((B, V), dtype=bool)
    np.put_along_axis(seen, ids, True, axis=1)
    return seen


def _hf(processor, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return processor(torch.from_numpy(ids), torch.from_numpy(scores.copy())).numpy()


@pytest.mark.parametrize("penalty", [1.0, 1.2, 2.5, 0.7])
def test_repetition_penalty_matches_hf(penalty):
    logits, ids = _logits(), _ids()
    ours = apply_repetition_penalty(logits, _seen(ids), penalty)
    ref = _hf(lp.RepetitionPenaltyLogitsProcessor(penalty=penalty), ids, logits)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("temperature", [0.001, 0.3, 1.0, 1.7])
def test_temperature_matches_hf(temperature):
    logits = _logits()
    ref = _hf(lp.TemperatureLogitsWarper(temperature=temperature), _ids(), logits)
    np.testing.assert_allclose(apply_temperature(logits, temperature), ref, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 50, V - 1, V, V + 10])
def test_top_k_matches_hf(k):
    logits = _logits(2)
    ref = _hf(lp.TopKLogitsWarper(top_k=k), _ids(), logits)
    np.testing.assert_array_equal(top_k_filter(logits, k), ref)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.95, 0.999, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_p_matches_hf(p, seed):
    logits = _logits(seed)
    ref = _hf(lp.TopPLogitsWarper(top_p=p), _ids(), logits)
    np.testing.assert_array_equal(top_p_filter(logits, p), ref)


def test_top_p_keeps_at_least_the_best_token():
    logits = np.zeros((2, V), np.float32)
    logits[:, 7] = 50.0
    out = top_p_filter(logits, 1e-6)
    assert np.isfinite(out).sum(axis=1).tolist() == [1, 1] and np.isfinite(out[:, 7]).all()


@pytest.mark.parametrize(
    "params",
    [SamplingParams(0.7, 0.9, 0, 1.2), SamplingParams(1.3, 0.5, 20, 1.5), SamplingParams(0.001, 0.95, 0, 1.2),
     SamplingParams(1.0, 1.0, 7, 1.0)],
)
def test_processing_chain_matches_hf(params):
    logits, ids = _logits(3), _ids(4)
    chain = [lp.RepetitionPenaltyLogitsProcessor(penalty=params.repetition_penalty),
             lp.TemperatureLogitsWarper(temperature=params.temperature)]
    if params.top_k:
        chain.append(lp.TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        chain.append(lp.TopPLogitsWarper(top_p=params.top_p))
    ref = _hf(lp.LogitsProcessorList(chain), ids, logits)
    ours = process_logits(logits, _seen(ids), params)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(ours[fin], ref[fin], rtol=1e-6)


def test_greedy_is_argmax_of_penalised_logits():
    logits, ids = _logits(5), _ids(6)
    ref = _hf(lp.RepetitionPenaltyLogitsProcessor(penalty=1.2), ids, logits).argmax(-1)
    np.testing.assert_array_equal(select_tokens(logits, _seen(ids), SamplingParams()), ref)


def test_sampling_never_picks_filtered_tokens_and_follows_probabilities():
    logits = _logits(7, scale=1.0)[:1]
    params = SamplingParams(temperature=1.0, top_p=0.6, top_k=40, repetition_penalty=1.0)
    scores = process_logits(logits, None, params)
    allowed = np.isfinite(scores[0])
    probs = np.exp(scores[0][allowed] - scores[0][allowed].max())
    probs /= probs.sum()
    rng = row_generators(0, [0])
    n = 20000
    draws = np.array([select_tokens(logits, None, params, rng)[0] for _ in range(n)])
    assert allowed[draws].all()
    counts = np.bincount(draws, minlength=V)[allowed] / n
    assert np.abs(counts - probs).max() < 0.02


def test_seed_reproducible_and_rows_independent_of_batch():
    logits = _logits(8, scale=0.5)
    params = SamplingParams(temperature=1.0, top_p=1.0, repetition_penalty=1.0)

    def run(seed, rows):
        gens = row_generators(seed, rows)
        return np.stack([select_tokens(logits[rows], None, params, gens) for _ in range(30)])

    a, b = run(11, list(range(B))), run(11, list(range(B)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, run(12, list(range(B))))
    # Row 3 alone draws exactly what it drew inside the batch.
    np.testing.assert_array_equal(run(11, [3])[:, 0], a[:, 3])


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-1.0), dict(top_k=-1), dict(top_k=2.5),
     dict(repetition_penalty=0.0), dict(repetition_penalty=-1.2), dict(temperature=float("nan")),
     dict(temperature="hot")],
)
def test_invalid_sampling_params_raise_input_error(kwargs):
    with pytest.raises(InputError):
        SamplingParams(**kwargs)


def test_invalid_seed_raises_input_error():
    with pytest.raises(InputError):
        row_generators(-1, [0])

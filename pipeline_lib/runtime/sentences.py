"""The library's generation over sentence prompts, with the hallucination guard's retries (the rules
are runtime.rules', shared with the server's scheduler): `generate_sentences` runs the prompts in
batched passes (SopranoTTS.synthesize / infer / infer_batch), `stream_sentences` one sentence at a time,
yielding its audio windows as generation allows (SopranoTTS.infer_stream)."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pipeline_lib.runtime.generate import GenerationTimings, LMSpec, generate, generate_steps
from pipeline_lib.runtime.rules import (
    GuardSettings,
    kept_after_flag,
    may_retry,
    release_blocks,
    retry_generator,
    retry_params,
)
from pipeline_lib.runtime.sampling import SamplingParams, row_generators

__all__ = ["generate_sentences", "stream_sentences"]


def generate_sentences(
    lm: Any,
    spec: LMSpec,
    ids: Sequence[list[int]],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    base: int,
    batch_size: int,
    guard: GuardSettings,
    after_pass: Callable[[], Any] = lambda: None,
) -> tuple[list[np.ndarray], list[str], list[int], GenerationTimings]:
    """Every prompt's hidden states, in passes of `batch_size` rows on one LM stream (`lm`). Row i
    samples from row_generators(base)[i] (None: greedy). With the guard on, a flagged sentence is
    generated again (rules.may_retry; a retry's draw is rules.retry_generator / retry_params) and one
    still flagged after its retries keeps its hidden states up to its clean point (rules.kept_after_flag).
    Returns (hidden per prompt, finish reason per prompt, retries per prompt, the LM timings);
    `after_pass` runs after each pass (the caller's heap release)."""
    gens = None if params.greedy else row_generators(base, range(len(ids)))
    hidden: list[np.ndarray] = [np.zeros((0, spec.hidden_size), np.float32)] * len(ids)
    reasons = [""] * len(ids)
    clean = [0] * len(ids)
    retries = [0] * len(ids)  # per sentence: times it was generated again (rules: retries)
    lm_t = GenerationTimings()
    todo, now_params, attempt = list(range(len(ids))), params, 0
    while todo:
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            if now_params.greedy:
                row_gens = None
            elif attempt == 0:
                row_gens = [gens[i] for i in idx]  # type: ignore[index]
            else:
                row_gens = [retry_generator(base, i, attempt) for i in idx]
            out = generate(
                lm, spec, [ids[i] for i in idx], max_new_tokens=max_new_tokens, params=now_params,
                generators=row_gens, hallucination_guard=guard.enabled,
            )
            for k, i in enumerate(idx):
                hidden[i], reasons[i], clean[i] = out.hidden[k], out.finish_reasons[k], out.clean[k]
            lm_t.add(out.timings)
            del out
            after_pass()
        todo = [i for i in todo if reasons[i] == "hallucination" and may_retry(attempt, guard.retries, 0)]
        attempt += 1
        now_params = retry_params(params)
        for i in todo:
            retries[i] += 1
    # A sentence still flagged keeps the audio before its run of near-repeats only (rules).
    hidden = [h[: kept_after_flag(c) + 1] if r == "hallucination" else h for h, r, c in zip(hidden, reasons, clean)]
    return hidden, reasons, retries, lm_t


def stream_sentences(
    lm: Any,
    spec: LMSpec,
    ids: Sequence[list[int]],
    base: int,
    chunk_size: int,
    max_new_tokens: int,
    params: SamplingParams,
    guard: GuardSettings,
    ctx: int,
    decode_window: Callable[[np.ndarray, int, int], np.ndarray],
) -> Iterator[np.ndarray]:
    """The sentences one after another, each yielding `chunk_size` blocks of audio (decode_window:
    SopranoTTS.decode_window) once they are exact (`ctx`: its stream_context) and, with the guard on,
    released by the holdback (rules.release_blocks); a sentence's last window holds the rest. A flagged
    sentence is generated again while rules.may_retry allows (nothing of it sent), else it ends at its
    clean blocks."""
    holdback = guard.holdback if guard.enabled else None
    for row, prompt in enumerate(ids):
        attempt, now_params = 0, params
        gen = None if params.greedy else row_generators(base, [row])[0]
        while True:
            buf = np.zeros((max_new_tokens, spec.hidden_size), dtype=np.float32)
            n = 0  # hidden vectors so far
            done = 0  # sample blocks (one per pair of neighbouring tokens) already yielded
            reason, clean = "", 0
            for ev in generate_steps(
                lm, spec, [prompt], max_new_tokens=max_new_tokens, params=now_params,
                generators=None if gen is None else [gen], hallucination_guard=guard.enabled,
            ):
                if ev.keep[0]:
                    buf[n] = ev.hidden[0]
                    n += 1
                if ev.finished:
                    reason, clean = ev.finished[0][1], int(ev.clean[0])
                    break
                # block j is exact once token j + 1 + ctx exists; holdback may hold it longer
                limit = min(n - 1 - ctx, release_blocks(holdback, int(ev.clean[0]), False, ""))
                while limit - done >= chunk_size:
                    yield decode_window(buf[:n], done, done + chunk_size)
                    done += chunk_size
            if reason == "hallucination" and may_retry(attempt, guard.retries, done):
                attempt += 1
                now_params = retry_params(params)
                gen = retry_generator(base, row, attempt)
                continue
            if reason == "hallucination":  # the sentence ends at its clean blocks (rules)
                n = kept_after_flag(clean) + 1  # never below done + 1: holdback sent no more
            if n - 1 > done:
                yield decode_window(buf[:n], done, n - 1)
            break

"""The text front end: normalisation, sentence splitting and prompt building (upstream-identical).

Runtime-safe: imports only the standard library and unidecode; never torch.
"""

from __future__ import annotations

from pipeline_lib.text.normalize import normalize_text
from pipeline_lib.text.prompt import (
    DEFAULT_MIN_SENTENCE_LENGTH,
    SPECIAL_TOKENS,
    START_TOKEN,
    STOP_TOKEN,
    TEXT_TOKEN,
    UNK_TOKEN,
    SentencePrompt,
    build_prompt,
    fit_to_positions,
    merge_short_sentences,
    prepare_prompts,
)
from pipeline_lib.text.sentences import DEFAULT_MAX_LENGTH, split_sentences

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_MIN_SENTENCE_LENGTH",
    "SPECIAL_TOKENS",
    "START_TOKEN",
    "STOP_TOKEN",
    "TEXT_TOKEN",
    "UNK_TOKEN",
    "SentencePrompt",
    "build_prompt",
    "fit_to_positions",
    "merge_short_sentences",
    "normalize_text",
    "prepare_prompts",
    "split_sentences",
]

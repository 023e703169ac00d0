"""From user texts to per-sentence model prompts.

`prepare_prompts` gives the same prompts, in the same order and with the same (text, sentence)
numbering, as upstream's `SopranoTTS._preprocess_text`, but rejects input that upstream would
silently turn into no audio. `fit_to_positions` then splits any sentence whose prompt is too long
for the model's context, so that arbitrarily long text can be spoken sentence by sentence.
"""

from __future__ import annotations

__all__ = [
    "UNK_TOKEN",
    "TEXT_TOKEN",
    "START_TOKEN",
    "STOP_TOKEN",
    "SPECIAL_TOKENS",
    "DEFAULT_MIN_SENTENCE_LENGTH",
    "SentencePrompt",
    "build_prompt",
    "prepare_prompts",
    "merge_short_sentences",
    "fit_to_positions",
]

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from pipeline_lib.errors import InputError
from pipeline_lib.text.normalize import normalize_text
from pipeline_lib.text.sentences import split_sentences

# Special tokens of the Soprano tokenizer (ids 0..3, in this order).
UNK_TOKEN = "[UNK]"
TEXT_TOKEN = "[TEXT]"
START_TOKEN = "[START]"
STOP_TOKEN = "[STOP]"
SPECIAL_TOKENS = (UNK_TOKEN, TEXT_TOKEN, START_TOKEN, STOP_TOKEN)

DEFAULT_MIN_SENTENCE_LENGTH = 30

_SPEAKABLE_RE = re.compile(r"[a-z0-9]", re.IGNORECASE)


def build_prompt(sentence: str) -> str:
    """The model prompt for one normalised sentence: `[STOP][TEXT]{sentence}[START]`."""
    return f"{STOP_TOKEN}{TEXT_TOKEN}{sentence}{START_TOKEN}"


@dataclass(frozen=True)
class SentencePrompt:
    """One normalised sentence of one input text.

    text_index: position of the source text in the batch; sentence_index: position of this
    sentence within that text (both from 0).
    """

    text: str
    text_index: int
    sentence_index: int

    @property
    def prompt(self) -> str:
        return build_prompt(self.text)

    def as_upstream(self) -> tuple[str, int, int]:
        """The tuple upstream's `_preprocess_text` yields: (prompt, text_idx, sentence_idx)."""
        return (self.prompt, self.text_index, self.sentence_index)


def merge_short_sentences(sentences: Sequence[str], min_length: int = DEFAULT_MIN_SENTENCE_LENGTH) -> list[str]:
    """Merge every sentence shorter than `min_length` characters into a neighbour (upstream's rule).

    A short sentence joins the previous kept sentence; a short sentence with nothing kept before it
    is carried forward and prefixed to the next one (which is then judged with that prefix). A
    single sentence is never changed, and `min_length <= 0` disables merging.
    """
    kept: list[str] = []
    carried: str | None = None
    for position, sentence in enumerate(sentences):
        if carried is not None:
            sentence = f"{carried} {sentence}".strip()
            carried = None
        if len(sentence) >= min_length:
            kept.append(sentence)
        elif kept:
            kept[-1] = f"{kept[-1]} {sentence}".strip()
        elif position + 1 < len(sentences):
            carried = sentence
        else:
            kept.append(sentence)
    return kept


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, (str, bytes)):
        raise InputError(
            f"expected a sequence of texts, got a single {type(texts).__name__}: "
            "wrap it in a list, e.g. prepare_prompts([text])"
        )
    for index, item in enumerate(texts):
        if not isinstance(item, str):
            raise InputError(
                f"text {index} is a {type(item).__name__}, not a str: pass every text as a Python str"
            )


def prepare_prompts(texts: Sequence[str], min_length: int = DEFAULT_MIN_SENTENCE_LENGTH) -> list[SentencePrompt]:
    """Normalise, split and merge each text; one `SentencePrompt` per resulting sentence.

    Equal to upstream `SopranoTTS._preprocess_text(texts, min_length)` (as `.as_upstream()` tuples)
    for every input upstream accepts. Raises `InputError` for a non-str item, for empty or
    whitespace-only text, and for text with nothing speakable left after normalisation
    (upstream yields no prompts, so no audio, for those).
    """
    _check_texts(texts)
    prompts: list[SentencePrompt] = []
    for text_index, raw in enumerate(texts):
        stripped = raw.strip()
        where = f"text {text_index}" if len(texts) > 1 else "text"
        if not stripped:
            raise InputError(f"{where} is empty: pass at least one speakable word")
        normalized = normalize_text(stripped)
        if not _SPEAKABLE_RE.search(normalized):
            shown = stripped if len(stripped) <= 40 else stripped[:37] + "..."
            raise InputError(
                f"{where} has nothing speakable: {shown!r} holds no letters or digits after "
                "normalisation (symbols, punctuation and emoji are not read aloud); "
                "pass at least one word or number"
            )
        sentences = merge_short_sentences(split_sentences(normalized), min_length)
        prompts.extend(
            SentencePrompt(sentence, text_index, sentence_index)
            for sentence_index, sentence in enumerate(sentences)
        )
    return prompts


# Coarse to fine: after sentence marks, after clause marks, at spaces. The mark stays with the
# piece before the cut, and every cut is at whitespace, so joining pieces with spaces restores
# the text's words.
_CUT_LEVELS = (
    re.compile(r"(?<=[.!?])\s+"),
    re.compile(r"(?<=[,;:])\s+"),
    re.compile(r"\s+"),
)


def _cut_hard(word: str, fits: Callable[[str], bool]) -> list[str]:
    """Cut a word with no allowed break into the longest prefixes that fit."""
    pieces: list[str] = []
    rest = word
    while rest:
        if fits(rest):
            pieces.append(rest)
            break
        if not fits(rest[:1]):
            raise ValueError(
                f"max_prompt_tokens leaves no room for text: even the one-character prompt "
                f"{build_prompt(rest[:1])!r} does not fit; raise max_prompt_tokens"
            )
        good, bad = 1, len(rest)  # rest[:good] fits, rest[:bad] does not
        while bad - good > 1:
            mid = (good + bad) // 2
            if fits(rest[:mid]):
                good = mid
            else:
                bad = mid
        pieces.append(rest[:good])
        rest = rest[good:]
    return pieces


def _pack(text: str, fits: Callable[[str], bool], level: int = 0) -> list[str]:
    """Split `text` into as few pieces as the cut levels allow, each one fitting."""
    if level == len(_CUT_LEVELS):
        return _cut_hard(text, fits)
    units = [u for u in _CUT_LEVELS[level].split(text) if u]
    pieces: list[str] = []
    current = ""
    for unit in units:
        candidate = f"{current} {unit}" if current else unit
        if fits(candidate):
            current = candidate
            continue
        if current:
            pieces.append(current)
        if fits(unit):
            current = unit
        else:
            *done, current = _pack(unit, fits, level + 1)
            pieces.extend(done)
    if current:
        pieces.append(current)
    return pieces


def fit_to_positions(
    prompts: Iterable[SentencePrompt],
    count_tokens: Callable[[str], int],
    max_prompt_tokens: int,
) -> list[SentencePrompt]:
    """Split every sentence whose prompt has more than `max_prompt_tokens` tokens.

    `count_tokens(prompt_string)` counts the tokens of a full prompt (special tokens included).
    Long sentences are cut after sentence marks, then after clause marks (`,;:`), then at spaces,
    and only as a last resort inside a word. Sentences that fit are kept as they are; the
    sentence indexes of a text are shifted to stay consecutive after a split.
    """
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")

    def fits(sentence: str) -> bool:
        return count_tokens(build_prompt(sentence)) <= max_prompt_tokens

    result: list[SentencePrompt] = []
    shift: dict[int, int] = {}  # text_index -> extra sentences inserted so far
    for item in prompts:
        offset = shift.get(item.text_index, 0)
        if fits(item.text):
            pieces = [item.text]
        else:
            pieces = _pack(item.text.strip(), fits)
            if not pieces:
                raise ValueError(
                    f"max_prompt_tokens={max_prompt_tokens} does not even fit the empty prompt "
                    f"{build_prompt('')!r}; raise max_prompt_tokens"
                )
        for k, piece in enumerate(pieces):
            result.append(SentencePrompt(piece, item.text_index, item.sentence_index + offset + k))
        shift[item.text_index] = offset + len(pieces) - 1
    return result

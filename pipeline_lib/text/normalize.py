"""Text normalisation: turn free text into the lower-case, mostly-letters form Soprano was trained on.

`normalize_text` is written to give exactly the same string as upstream soprano-tts'
`soprano.utils.text_normalizer.clean_text` (the test-suite checks that on a corpus and by fuzzing).
The stages run in upstream's order:

    em dash -> unidecode -> one line per sentence -> numbers -> links/dashes/dots/brackets
    -> abbreviations -> CamelCase -> symbols -> lower-case -> drop unknown characters
    -> whitespace -> repeated punctuation -> repeated letters

A few upstream behaviours are plainly bugs; they are reproduced on purpose (the goal is identical
prompts, so the model sees what it saw in training) and marked "UPSTREAM QUIRK" below.

Only the standard library and unidecode are used. Numbers are read by `pipeline_lib.text.numbers`,
which gives the words upstream gets from the inflect package (tests check it against inflect).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from unidecode import unidecode

from pipeline_lib.text.numbers import NumberTooLongError, cardinal, digit_pairs, ordinal, ordinal_word

__all__ = ["normalize_text"]


def _spell_digits(digits: str) -> str:
    # Beyond inflect's range (more than 36 digits) upstream raises; we read the digits one by one.
    return " ".join(cardinal(int(d)) for d in digits)


def _open_em_dashes(text: str) -> str:
    # The em dash becomes a spaced hyphen, which the dash rule below reads as a pause (", ").
    # Other dashes are left to unidecode (en dash -> "-").
    return text.replace("\u2014", " - ")


def _terminate_lines(text: str) -> str:
    """Each non-empty line ends with sentence punctuation; lines are then joined by spaces."""
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if line and line[-1] not in ".!?":
            line += "."
        out.append(line)  # empty lines stay as empty strings: extra spaces, collapsed later
    return " ".join(out)


_SCALE_WORDS = {"k": "thousand", "m": "million", "b": "billion", "t": "trillion"}


def _say_scaled(m: re.Match[str]) -> str:
    return f"{m.group('digits')} {_SCALE_WORDS[m.group('scale').lower()]}"


def _drop_group_commas(m: re.Match[str]) -> str:
    return m.group().replace(",", "")


def _say_date(m: re.Match[str]) -> str:
    # "1/2/2025" -> "1 dash 2 dash 2025" (the numbers are spelled later).
    fields = re.split(r"[/-]", m.group("date"))
    return m.group("before") + " dash ".join(fields) + m.group("after")


def _say_phone(m: re.Match[str]) -> str:
    digits = [ch for ch in m.group() if ch in "0123456789"]  # always 10 by construction
    return ", ".join(" ".join(group) for group in (digits[:3], digits[3:6], digits[6:]))


def _oh_prefixed(field: str) -> str:
    return f"oh {field}" if field.startswith("0") else field


def _say_clock(m: re.Match[str]) -> str:
    fields = m.group().split(":")
    if len(fields) == 2:
        hours, minutes = fields
        if minutes == "00":
            if int(hours) == 0:
                return "0"
            # UPSTREAM QUIRK: "13:00" is read "13 minutes".
            return f"{hours} minutes" if int(hours) > 12 else f"{hours} o'clock"
        if minutes.startswith("0"):
            minutes = "oh " + minutes[1:]
        return f"{hours} {minutes}"

    hours, minutes, seconds = fields
    if int(hours) != 0:
        if minutes == "00":
            middle = "oh oh"
        elif minutes.startswith("0"):
            middle = f"oh {minutes}"
        else:
            # UPSTREAM QUIRK: upstream formats a one-element *set* here, so "1:15:30" becomes
            # "1 {'15'} 30"; the braces are later read as a bracketed aside.
            middle = str({minutes})
        tail = "" if seconds == "00" else _oh_prefixed(seconds)
        return f"{hours} {middle} {tail}"
    if minutes != "00":
        tail = "oh oh" if seconds == "00" else _oh_prefixed(seconds)
        return f"{minutes} {tail}"
    return seconds


def _as_int(field: str) -> int:
    # Upstream calls int() on the raw field and raises ValueError for leftovers such as "$1,.50"
    # (a comma that the digit-group rule did not remove); we read such commas as separators.
    field = field.replace(",", "")
    return int(field) if field else 0


def _say_dollars(m: re.Match[str]) -> str:
    amount = m.group("amount")
    fields = amount.split(".")
    if len(fields) > 2:
        return amount + " dollars"
    whole = _as_int(fields[0])
    # UPSTREAM QUIRK: the cents field is read as an integer, so "$1.5" is "1 dollar, 5 cents".
    cents = _as_int(fields[1]) if len(fields) == 2 else 0

    def unit(count: int, singular: str) -> str:
        return f"{count} {singular if count == 1 else singular + 's'}"

    spoken = [unit(n, name) for n, name in ((whole, "dollar"), (cents, "cent")) if n]
    return ", ".join(spoken) if spoken else "zero dollars"


def _say_decimal(m: re.Match[str]) -> str:
    head, *fractions = m.group().split(".")
    return " point ".join([head] + [" ".join(frac) for frac in fractions])


def _say_slashed(m: re.Match[str]) -> str:
    fields = m.group().split("/")
    return (" over " if len(fields) == 2 else " slash ").join(fields)


def _say_ordinal(m: re.Match[str]) -> str:
    digits = m.group()[:-2]  # the suffix is not checked ("2st" is "second"), as with inflect
    try:
        return ordinal(int(digits))
    except NumberTooLongError:
        *head, last = _spell_digits(digits).split(" ")
        return " ".join(head + [ordinal_word(last)])


def _say_year_like(value: int) -> str:
    """1001..2999 are read like years: "nineteen ninety-nine", "two thousand five", "fifteen hundred"."""
    if value == 2000:
        return "two thousand"
    if 2000 < value < 2010:
        return "two thousand " + cardinal(value % 100)
    if value % 100 == 0:
        return cardinal(value // 100) + " hundred"
    return digit_pairs(value)


def _say_integer(m: re.Match[str]) -> str:
    value = int(m.group())
    if 1000 < value < 3000:
        return _say_year_like(value)
    try:
        return cardinal(value)
    except NumberTooLongError:
        return _spell_digits(m.group())


# (pattern, replacement), applied in order. The order is upstream's and it matters: e.g. digit-group
# commas go before dates and phone numbers, dates before the arithmetic rules.
_NUMBER_RULES: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(r"#(\d)"), r"number \1"),
    (re.compile(r"\b(?P<digits>\d+)(?P<scale>[kmbt])\b", re.IGNORECASE), _say_scaled),
    (re.compile(r"\d[\d,]+\d"), _drop_group_commas),
    # The characters around a date are consumed (not look-arounds), as upstream: that decides
    # which of two adjacent dates is read as a date.
    (
        re.compile(r"(?P<before>^|[^/])(?P<date>\d{1,2}[/-]\d{1,2}[/-](?:\d{4}|\d{2}))(?P<after>$|[^/])"),
        _say_date,
    ),
    (re.compile(r"\(?\d{3}\)?[-.\s]\d{3}[-.\s]?\d{4}"), _say_phone),
    (re.compile(r"\d{1,2}:\d{2}(?::\d{2})?"), _say_clock),
    # UPSTREAM QUIRK: unreachable in the full pipeline (unidecode has already turned "£" into "PS").
    (re.compile(r"£(?P<amount>[\d,]*\d+)"), r"\g<amount> pounds"),
    (re.compile(r"\$(?P<amount>[\d.,]*\d+)"), _say_dollars),
    (re.compile(r"\d+(?:\.\d+)+"), _say_decimal),
    (re.compile(r"(\d\s?)\*(\s?\d)"), r"\1 times \2"),
    (re.compile(r"(\d\s?)/(\s?\d)"), r"\1 over \2"),
    (re.compile(r"(\d\s?)\+(\s?\d)"), r"\1 plus \2"),
    # Also reads a leading "-" as "minus" (negative numbers), and "10-20" as "10 minus 20".
    (re.compile(r"(\d?\s?)-(\s?\d)"), r"\1 minus \2"),
    (re.compile(r"\d+(?:/\d+)+"), _say_slashed),
    (re.compile(r"\d+(?:st|nd|rd|th)"), _say_ordinal),
    # A space between every digit/letter pair: "45pm" -> "45 pm", "a1b2" -> "a 1 b 2".
    (re.compile(r"(?<=\d)(?=[A-Za-z])|(?<=[A-Za-z])(?=\d)"), " "),
    (re.compile(r"\d+"), _say_integer),
)


def _spell_numbers(text: str) -> str:
    if not any(ch in "0123456789" for ch in text):
        return text  # nothing to do
    for pattern, replacement in _NUMBER_RULES:
        text = pattern.sub(replacement, text)
    return text


def _flatten_brackets(m: re.Match[str]) -> str:
    span = re.sub(r"[(\[{]", ", ", m.group())
    span = re.sub(r"[)\]}][^$.!?,]", ", ", span)  # a closer followed by a word char etc.
    return re.sub(r"[)\]}]", "", span)


_LAYOUT_RULES: tuple[tuple[re.Pattern[str], Any], ...] = (
    # UPSTREAM QUIRK: "http://" is also spelled "h t t p s ...".
    (re.compile(r"https?://"), "h t t p s colon slash slash "),
    (re.compile(r"(.) - (.)"), r"\1, \2"),
    (re.compile(r"([a-z])\.([a-z])", re.IGNORECASE), r"\1 dot \2"),
    # Greedy: from the first opening bracket to the last closing one.
    (re.compile(r"[(\[{].*[)\]}](?:.|$)"), _flatten_brackets),
)


def _expand_layout(text: str) -> str:
    for pattern, replacement in _LAYOUT_RULES:
        text = pattern.sub(replacement, text)
    return text


# Dotted titles, any case: "Dr." -> "doctor" (the dot is consumed).
_TITLES = {
    "mrs": "misess", "ms": "miss", "mr": "mister", "dr": "doctor", "st": "saint",
    "co": "company", "jr": "junior", "maj": "major", "gen": "general", "drs": "doctors",
    "rev": "reverend", "lt": "lieutenant", "hon": "honorable", "sgt": "sergeant",
    "capt": "captain", "esq": "esquire", "ltd": "limited", "col": "colonel", "ft": "fort",
}
# Whole words, exact case.
_WORDS = {
    "Hz": "hertz", "kHz": "kilohertz",
    "KBs": "kilobytes", "KB": "kilobyte", "MBs": "megabytes", "MB": "megabyte",
    "GBs": "gigabytes", "GB": "gigabyte", "TBs": "terabytes", "TB": "terabyte",
    "APIs": "a p i's", "API": "a p i", "CLIs": "c l i's", "CLI": "c l i",
    "CPUs": "c p u's", "CPU": "c p u", "GPUs": "g p u's", "GPU": "g p u",
    "Ave": "avenue", "etc": "et cetera",
    "Mon": "monday", "Tues": "tuesday", "Wed": "wednesday", "Thurs": "thursday", "Fri": "friday",
    "Sat": "saturday",
    "Jan": "january", "Feb": "february", "Mar": "march", "Apr": "april", "Aug": "august",
    "Sept": "september", "Oct": "october", "Nov": "november", "Dec": "december",
    "and/or": "and or",
}


def _alternation(keys: Any) -> str:
    # Longest first, so "KBs" wins over "KB" at the same position.
    return "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))


# One pass per table is equivalent to upstream's one pass per entry: matches of different entries
# cannot overlap, and no replacement creates or removes a match of another entry.
_TITLE_RE = re.compile(rf"\b({_alternation(_TITLES)})\.", re.IGNORECASE)
_WORD_RE = re.compile(rf"\b(?:{_alternation(_WORDS)})\b")


def _expand_abbreviations(text: str) -> str:
    text = _TITLE_RE.sub(lambda m: _TITLES[m.group(1).lower()], text)
    return _WORD_RE.sub(lambda m: _WORDS[m.group()], text)


_CAPITALISED_RUN_RE = re.compile(r"\b(?:[A-Z][a-z]*)+\b")
_CAPITAL_PART_RE = re.compile(r"[A-Z][a-z]*")


def _split_camel(m: re.Match[str]) -> str:
    word = m.group()
    parts = _CAPITAL_PART_RE.findall(word)
    if len(parts) == 1 or len(parts) == len(word):  # "Word", "NASA"
        return word
    if len(parts) == len(word) - 1 and word.endswith("s"):  # "TPUs" -> "TPU's"
        return word[:-1] + "'s"
    return " ".join(parts)  # "LMDeploy" -> "L M Deploy"


def _split_camel_case(text: str) -> str:
    return _CAPITALISED_RUN_RE.sub(_split_camel, text)


_SYMBOLS_FIRST = {
    "@": " at ", "&": " and ", "%": " percent ", ":": ".", ";": ",", "+": " plus ",
    "\\": " backslash ", "~": " about ",
}
_SYMBOLS_THEN = {
    "<=": " less than or equal to ", ">=": " greater than or equal to ",
    "<": " less than ", ">": " greater than ", "=": " equals ", "/": " slash ", "_": " ", "*": " ",
}
_SYMBOLS_FIRST_RE = re.compile("[" + re.escape("".join(_SYMBOLS_FIRST)) + "]")
# UPSTREAM QUIRK: unreachable, every digit has been spelled out by now.
_HEART_RE = re.compile(r"(?:^| )<3")
_SYMBOLS_THEN_RE = re.compile(_alternation(_SYMBOLS_THEN))


def _name_symbols(text: str) -> str:
    text = _SYMBOLS_FIRST_RE.sub(lambda m: _SYMBOLS_FIRST[m.group()], text)
    text = _HEART_RE.sub(" heart ", text)
    return _SYMBOLS_THEN_RE.sub(lambda m: _SYMBOLS_THEN[m.group()], text)


# What the model's text vocabulary keeps: letters, digits, space and a few marks.
_UNKNOWN_CHAR_RE = re.compile(r"[^A-Za-z0-9 !$%&'*,\-.?]")


def _drop_unknown(text: str) -> str:
    return _UNKNOWN_CHAR_RE.sub("", text)


def _tidy_spaces(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r" (?=[.?!,])", "", text)  # no space before punctuation
    return text.strip()


# Upstream, in order: ",,," -> ","; then each maximal run of [.,] holding a "." -> "."; then each
# run of [.,!] holding a "!" -> "!"; then each run of [.,!?] holding a "?" -> "?".
_PUNCT_RUNS = tuple(
    (re.compile("[" + re.escape(members) + "]+"), winner)
    for members, winner in ((".,", "."), (".,!", "!"), (".,!?", "?"))
)


def _squash_segment(segment: str) -> str:
    segment = re.sub(r",{2,}", ",", segment)
    for run_re, winner in _PUNCT_RUNS:
        segment = run_re.sub(lambda m: winner if winner in m.group() else m.group(), segment)
    return segment


def _dedup_punctuation(text: str) -> str:
    # An ellipsis (three dots or more) is kept as "..." and nothing merges across it.
    return "...".join(_squash_segment(part) for part in re.split(r"\.{3,}", text))


def _shorten_letter_runs(text: str) -> str:
    return re.sub(r"(\w)\1\1+", r"\1\1", text)  # "soooo" -> "soo"


_STAGES: tuple[Callable[[str], str], ...] = (
    _open_em_dashes,
    unidecode,
    _terminate_lines,
    _spell_numbers,
    _expand_layout,
    _expand_abbreviations,
    _split_camel_case,
    _name_symbols,
    str.lower,
    _drop_unknown,
    _tidy_spaces,
    _dedup_punctuation,
    _shorten_letter_runs,
)


def normalize_text(text: str) -> str:
    """Normalise `text` the way upstream Soprano does before prompting the model.

    Numbers, ordinals, decimals, currency, dates, times and arithmetic are spelled out in words,
    abbreviations and units expanded, non-ASCII transliterated (unidecode), everything lower-cased
    and reduced to letters, digits, spaces and a few punctuation marks. Every non-empty line ends
    with sentence punctuation. Output equals upstream `clean_text(text)`.
    """
    for stage in _STAGES:
        text = stage(text)
    return text

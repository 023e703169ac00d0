"""Numbers as English words, in the forms the text front end reads them (upstream's normaliser reads
them with the `inflect` package; these functions give the same words, which tests/test_text.py
checks against inflect over whole ranges).

Written here instead of importing inflect at run time: inflect (and typeguard, which it imports)
took ~1 s to import and 24 MiB of resident memory, a twentieth of the fp32 runtime's footprint.

- cardinal(n): "one thousand, two hundred thirty-four"; no "and" anywhere. Three-digit groups are
  joined by ", ", except that a last group below one hundred joins with a space ("one million
  one", "one million, two hundred thousand thirty-four"). Zero groups are skipped.
- ordinal(n): the cardinal with its last word made ordinal ("twenty-first", "one thousandth").
- ordinal_word(word): one number word made ordinal ("one" -> "first", "twenty" -> "twentieth").
- digit_pairs(n): a four-digit number read two digits at a time, "oh" for a leading zero in the
  second pair ("nineteen ninety-nine", "ten oh one"), as years are read.
"""

from __future__ import annotations

__all__ = ["MAX_DIGITS", "NumberTooLongError", "cardinal", "digit_pairs", "ordinal", "ordinal_word"]

_UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ("", "thousand", "million", "billion", "trillion", "quadrillion", "quintillion", "sextillion",
           "septillion", "octillion", "nonillion", "decillion")
MAX_DIGITS = 3 * len(_SCALES)  # 36: "nine hundred ninety-nine decillion, ..."
_IRREGULAR_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                       "nine": "ninth", "twelve": "twelfth"}


class NumberTooLongError(ValueError):
    """More digits than there are scale words for (MAX_DIGITS)."""


def _below_hundred(n: int) -> str:
    if n < 20:
        return _UNITS[n]
    tens, units = divmod(n, 10)
    return _TENS[tens] + (f"-{_UNITS[units]}" if units else "")


def _below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    if not hundreds:
        return _below_hundred(rest)
    return f"{_UNITS[hundreds]} hundred" + (f" {_below_hundred(rest)}" if rest else "")


def cardinal(n: int) -> str:
    """A non-negative integer in words (see the module docstring); NumberTooLongError past MAX_DIGITS."""
    n = int(n)
    if n < 0:
        raise ValueError(f"cardinal() takes a non-negative integer, got {n}")
    if n == 0:
        return "zero"
    if len(str(n)) > MAX_DIGITS:
        raise NumberTooLongError(f"{len(str(n))} digits: more than the {MAX_DIGITS} that have scale words")
    groups = []  # (value, scale index), most significant first, zero groups skipped
    scale = 0
    while n:
        n, group = divmod(n, 1000)
        if group:
            groups.append((group, scale))
        scale += 1
    groups.reverse()
    words = [_below_thousand(g) + (f" {_SCALES[s]}" if s else "") for g, s in groups]
    if len(words) > 1 and groups[-1][1] == 0 and groups[-1][0] < 100:
        return ", ".join(words[:-1]) + " " + words[-1]
    return ", ".join(words)


def ordinal_word(word: str) -> str:
    """One number word (or a hyphenated "twenty-one") made ordinal."""
    head, sep, last = word.rpartition("-")
    if last in _IRREGULAR_ORDINALS:
        last = _IRREGULAR_ORDINALS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return head + sep + last


def ordinal(n: int) -> str:
    """The ordinal of a non-negative integer: "twenty-first", "one thousand, two hundred thirty-fourth"."""
    words = cardinal(n)
    head, sep, last = words.rpartition(" ")
    return head + sep + ordinal_word(last)


def digit_pairs(n: int) -> str:
    """A four-digit number read in pairs, as a year: 1999 "nineteen ninety-nine", 1905 "nineteen oh
    five", 1001 "ten oh one", 2010 "twenty ten", 1100 "eleven oh oh"."""
    n = int(n)
    if not 1000 <= n <= 9999:
        raise ValueError(f"digit_pairs() reads four-digit numbers, got {n}")
    high, low = divmod(n, 100)
    if low >= 10:
        tail = _below_hundred(low)
    else:
        tail = "oh " + ("oh" if low == 0 else _UNITS[low])
    return f"{_below_hundred(high)} {tail}"

"""Sentence splitting, the way upstream Soprano does it.

`split_sentences` gives the same list as upstream's `split_and_recombine_text` (itself taken from
tortoise-tts) for the same arguments; the test-suite checks that on a corpus and by fuzzing.

How it reads the text: all whitespace runs become one space and curly double quotes become '"'.
A cursor then walks the text one character at a time and cuts a sentence

* after "!" or "?", or after "." followed by a space (or by the end of the text), when not inside
  a double-quoted passage; a run of further ".!?" right after the cut point joins the sentence;
* after a closing quote followed by a space: that only marks a fall-back cut point;
* when the sentence reaches `max_length` characters: back to the last fall-back cut point, else
  back to the last space or sentence mark (a word is cut only if there is none).

UPSTREAM QUIRKS reproduced here (they decide where cuts fall, so they matter for parity):

* "looking ahead" never sees the text's last character: it reads as "nothing", which counts both
  as "a space follows" and as "more punctuation follows" (so a mark just before the last character
  pulls that character into the sentence, whatever it is);
* stepping the cursor back re-toggles the in-quote state on the quote character it lands on, not
  on the one it leaves.
"""

from __future__ import annotations

__all__ = ["split_sentences", "DEFAULT_DESIRED_LENGTH", "DEFAULT_MAX_LENGTH"]

import re

DEFAULT_DESIRED_LENGTH = 1
DEFAULT_MAX_LENGTH = 300

_END_MARKS = "!?"
_CONTINUATION_MARKS = "!?."
_BACKTRACK_STOPS = "!?. "
_PUNCT_ONLY = set(".,;:!?")


class _Cursor:
    """The walking state: position, the sentence being built, pending cut points, quote state."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.last = len(text) - 1
        self.pos = -1
        self.chars: list[str] = []
        self.quoted = False
        self.cut_points: list[int] = []
        self.sentences: list[str] = []

    def step(self) -> str:
        self.pos += 1
        ch = self.text[self.pos]
        self.chars.append(ch)
        if ch == '"':
            self.quoted = not self.quoted
        return ch

    def step_back(self) -> str:
        self.pos -= 1
        self.chars.pop()
        ch = self.text[self.pos]
        if ch == '"':  # UPSTREAM QUIRK: the character landed on, not the one removed
            self.quoted = not self.quoted
        return ch

    def ahead(self, distance: int) -> str:
        """The character `distance` ahead; "" at or past the LAST character (upstream quirk)."""
        index = self.pos + distance
        return self.text[index] if 0 <= index < self.last else ""

    def emit(self) -> None:
        self.sentences.append("".join(self.chars))
        self.chars = []
        self.cut_points = []


def _is_noise(chunk: str) -> bool:
    return all(ch.isspace() or ch in _PUNCT_ONLY for ch in chunk)


def split_sentences(
    text: str,
    desired_length: int = DEFAULT_DESIRED_LENGTH,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> list[str]:
    """Split `text` into sentences of at most about `max_length` characters.

    With the defaults (upstream's) every sentence boundary is a cut. Returned sentences are
    stripped; pieces holding only whitespace and punctuation are dropped.
    """
    text = re.sub(r"\s+", " ", text)
    text = text.replace("\u201c", '"').replace("\u201d", '"')

    cur = _Cursor(text)
    while cur.pos < cur.last:
        ch = cur.step()
        size = len(cur.chars)
        if size >= max_length:
            if cur.cut_points and size > desired_length / 2:
                for _ in range(cur.pos - cur.cut_points[-1]):
                    cur.step_back()
            else:
                while ch not in _BACKTRACK_STOPS and cur.pos > 0 and len(cur.chars) > desired_length:
                    ch = cur.step_back()
            cur.emit()
        elif not cur.quoted and (ch in _END_MARKS or (ch == "." and cur.ahead(1) in ("", " "))):
            while (
                cur.pos < cur.last
                and len(cur.chars) < max_length
                and (cur.ahead(1) == "" or cur.ahead(1) in _CONTINUATION_MARKS)
            ):
                ch = cur.step()
            cur.cut_points.append(cur.pos)
            if len(cur.chars) >= desired_length:
                cur.emit()
        elif cur.quoted and cur.ahead(1) == '"' and cur.ahead(2) in ("", " "):
            cur.step()
            cur.step()
            cur.cut_points.append(cur.pos)
    cur.emit()

    stripped = (s.strip() for s in cur.sentences)
    return [s for s in stripped if s and not _is_noise(s)]

"""Transcript cleaning: what a tokenizer should never see, removed where the user can see it.

Transcripts copied from terminals, subtitle tools, spreadsheets or web pages carry characters nobody meant to say:
ASCII/Latin-1 control codes (NUL, BEL, ...), ANSI colour escapes, zero-width spaces, bidi marks and byte-order marks.
The tokenizer would turn each into byte tokens the model then learns to emit. `clean_transcript` removes them and
collapses whitespace; `data_prep.validate` keeps the row, flags it and lists it in `changes.jsonl`.

Kept on purpose: ZERO WIDTH NON-JOINER / JOINER (U+200C/U+200D) are spelling in Persian, Indic scripts and emoji
sequences, and case and punctuation are what the model learns to write.
"""

from __future__ import annotations

import re
import unicodedata

# ANSI / VT100 escape sequences: CSI (ESC [ ... final, or the 8-bit CSI U+009B), OSC (ESC ] ... BEL or ESC \),
# then any other two-character escape. Removed whole: their parameters ("[31m") are printable.
_ANSI = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]")
# Whitespace-like controls become a space (a tab or newline separates words); every other C0/C1 control goes.
_SPACE_CONTROLS = "\t\n\v\f\r\x1c\x1d\x1e\x1f\x85"
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")
_INVISIBLE = re.compile(
    "[\u200b\u2060\u180e"  # zero-width space, word joiner, Mongolian vowel separator
    "\ufeff\ufffe"  # byte-order marks (and the swapped one a wrong decode leaves)
    "\u200e\u200f\u061c\u202a-\u202e\u2066-\u2069]"  # bidi marks, embeddings, overrides, isolates
)


def _name(char: str) -> str:
    return f"U+{ord(char):04X} {unicodedata.name(char, 'control')}"


def clean_transcript(text: str) -> tuple[str, list[str]]:
    """(cleaned text, what was removed beyond whitespace): escapes, controls and invisible marks dropped, whitespace
    collapsed to single spaces. The list is empty when only whitespace changed."""
    removed = [f"ANSI escape {m.group()!r}" for m in _ANSI.finditer(text)]
    text = _ANSI.sub("", text)
    removed += [_name(c) for c in _CONTROLS.findall(text) + _INVISIBLE.findall(text)]
    text = _INVISIBLE.sub("", _CONTROLS.sub("", text))
    text = text.translate({ord(c): " " for c in _SPACE_CONTROLS})
    return " ".join(text.split()), removed

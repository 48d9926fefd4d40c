"""Cut a long timed recording at word boundaries into segments no longer than a limit."""

from __future__ import annotations

from dataclasses import dataclass

from voxtral_train.manifest import Word


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the clip start
    end: float
    words: list[Word]  # times relative to `start`


def _cut_points(words: list[Word], duration: float) -> list[float]:
    """Where a segment may end after word i: the middle of the gap to word i+1 (never inside word i)."""
    cuts = [max(a.end, (a.end + b.start) / 2) for a, b in zip(words, words[1:])]
    return cuts + [duration]


def plan_segments(words: list[Word], duration: float, max_seconds: float) -> list[Segment]:
    """Greedy: each segment takes as many whole words as fit in `max_seconds`. The first segment starts at
    0 and the last ends at `duration`, so no audio is lost. Raises ValueError if one word cannot fit."""
    if not words:
        raise ValueError("no words to cut at")
    cuts = _cut_points(words, duration)
    spans: list[tuple[float, float, int, int]] = []  # (start, end, first word, last word + 1)
    start, first, last_fit = 0.0, 0, -1
    for j, cut in enumerate(cuts):
        if cut - start > max_seconds and last_fit >= first:
            spans.append((start, cuts[last_fit], first, last_fit + 1))
            start, first = cuts[last_fit], last_fit + 1
        if cut - start > max_seconds:
            raise ValueError(f"word {j} {words[j].word!r} cannot fit in a {max_seconds} s segment starting at {start:.2f} s")
        last_fit = j
    spans.append((start, duration, first, len(words)))
    return [
        Segment(s, e, [Word(w.word, max(w.start - s, 0.0), max(w.end - s, 0.0)) for w in words[a:b]])
        for s, e, a, b in spans
    ]

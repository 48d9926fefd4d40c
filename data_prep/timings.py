"""Word timings for a clip: validate the ones a source gives, or estimate them from the signal's energy.

The model anchors each word at its END, so the heuristic errs late: a word's end is the end of its share
of the speech span. Rows timed here get `timing_source="heuristic"`.
"""

from __future__ import annotations

import numpy as np

from voxtral_train.manifest import Word

FRAME_SECONDS = 0.02
SILENCE_DB = 35.0  # frames this far below the loudest frame count as silence
END_TOLERANCE = 0.05  # seconds a word end may pass the clip end (aligner rounding) before it is an error


def frame_rms(samples: np.ndarray, frame: int) -> np.ndarray:
    """RMS of consecutive frames of `frame` samples (the last partial frame included)."""
    n = -(-len(samples) // frame)
    padded = np.zeros(n * frame, dtype=np.float64)
    padded[: len(samples)] = samples
    return np.sqrt((padded.reshape(n, frame) ** 2).mean(axis=1))


def speech_span(samples: np.ndarray, sr: int, silence_db: float = SILENCE_DB) -> tuple[float, float]:
    """(start, end) seconds from the first to the last frame within `silence_db` of the loudest frame.
    A silent clip gives the whole clip."""
    frame = max(1, int(round(FRAME_SECONDS * sr)))
    rms = frame_rms(samples, frame)
    duration = len(samples) / sr
    if rms.size == 0 or rms.max() == 0:
        return 0.0, duration
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (-silence_db / 20))
    return loud[0] * frame / sr, min((loud[-1] + 1) * frame / sr, duration)


def spread_words(words: list[str], start: float, end: float) -> list[Word]:
    """Share [start, end] among words in proportion to their character counts; each word ends at the
    end of its share (late bias: the model emits a word after it ends)."""
    weights = np.array([len(w) for w in words], dtype=np.float64)
    if weights.size == 0:
        return []
    bounds = start + (end - start) * np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])
    return [Word(w, float(bounds[i]), float(bounds[i + 1])) for i, w in enumerate(words)]


def heuristic_words(text: str, samples: np.ndarray, sr: int) -> list[Word]:
    """Words of `text` spread over the clip's speech span."""
    return spread_words(text.split(), *speech_span(samples, sr))


def check_words(words: list[Word], text: str, duration: float) -> list[Word]:
    """Validate source timings: one word per word of `text` (aligners often drop case and punctuation,
    so the text's spelling is kept), each start <= end, starts and ends never go back, all inside
    [0, duration] (ends up to END_TOLERANCE past it are clipped). Raises ValueError."""
    spelled = text.split()
    if len(spelled) != len(words):
        raise ValueError(f"{len(words)} timed words for a text of {len(spelled)} words")
    checked, prev = [], Word("", 0.0, 0.0)
    for i, w in enumerate(words):
        if w.start < 0 or w.end < w.start or w.start < prev.start or w.end < prev.end:
            raise ValueError(f"word {i} {w.word!r} [{w.start}, {w.end}] is not monotonic after [{prev.start}, {prev.end}]")
        if w.end > duration + END_TOLERANCE:
            raise ValueError(f"word {i} {w.word!r} ends at {w.end} s, after the clip end {duration:.3f} s")
        checked.append(Word(spelled[i], min(w.start, duration), min(w.end, duration)))
        prev = w
    return checked

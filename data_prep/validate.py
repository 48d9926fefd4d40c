"""Turn imported rows into manifest rows or rejects: every input row ends in exactly one of the two.

Text checks (empty, unencodable, duplicate id) run in the main process; audio checks (decode, NaN/inf,
length, timings, segmentation, optional copy to 16 kHz FLAC) run in a process pool, in input order.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import soundfile as sf

from data_prep.timings import check_words, heuristic_words
from voxtral_train.audio import AudioError, read_native, resample
from voxtral_train.manifest import Utterance, Word, segment_utterance
from voxtral_train.protocol import SAMPLE_RATE, SAMPLES_PER_POSITION

TIMING_MODES = ("manifest", "heuristic", "none")


@dataclass
class SourceRow:
    """One imported utterance before validation; `source` is the original row, for the reject report."""

    source: dict[str, Any]
    id: str
    audio: str  # absolute path
    text: str
    offset: float | None = None
    end: float | None = None
    language: str | None = None
    words: list[Word] | None = None
    timing_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reject:
    reason: str
    message: str
    source: dict[str, Any]
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "reason": self.reason, "message": self.message, "source": self.source}


@dataclass(frozen=True)
class PrepOptions:
    max_seconds: float = 30.0  # longer clips are rejected, or cut at word boundaries with `segment`
    segment: bool = False
    timings: str = "manifest"  # manifest: keep source timings; heuristic: else estimate them; none: drop them
    copy_dir: Path | None = None  # write each kept row as 16 kHz mono FLAC here (segments as their own files)

    def __post_init__(self) -> None:
        if self.timings not in TIMING_MODES:
            raise ValueError(f"timings must be one of {TIMING_MODES}, got {self.timings!r}")
        if self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")


@dataclass
class PrepResult:
    kept: list[Utterance]
    rejects: list[Reject]
    n_inputs: int
    audio_seconds: float

    def summary(self) -> str:
        counts = Counter(r.reason for r in self.rejects)
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        line = f"kept {self.n_inputs - len(self.rejects)}, rejected {len(self.rejects)}" + (f" ({detail})" if detail else "")
        if len(self.kept) != self.n_inputs - len(self.rejects):
            line += f"; {len(self.kept)} manifest rows after segmentation"
        return line


def normalise_text(text: str) -> str:
    """Collapse whitespace only: case and punctuation are what the model learns to write."""
    return " ".join(text.split())


def _safe_name(uid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", uid)


def _timed_words(row: SourceRow, samples: np.ndarray, sr: int, duration: float, mode: str) -> tuple[list[Word] | None, str | None]:
    if mode == "none":
        return None, None
    if row.words is not None:
        return check_words(row.words, row.text, duration), row.timing_source or "manifest"
    if mode == "heuristic":
        return heuristic_words(row.text, samples, sr), "heuristic"
    return None, None


def _write_copy(samples: np.ndarray, sr: int, start: float, end: float, path: Path) -> str:
    clip = resample(samples[int(round(start * sr)) : int(round(end * sr))], sr)
    sf.write(path, np.clip(clip, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return str(path)


def check_audio(row: SourceRow, opts: PrepOptions) -> list[Utterance] | Reject:
    """Decode, measure, time and (if needed) segment one row. Runs in a worker process."""
    try:
        samples, sr = read_native(row.audio, row.offset, row.end)
    except AudioError as err:
        return Reject(err.reason, err.message, row.source, row.id)
    duration = len(samples) / sr
    if len(samples) * SAMPLE_RATE < SAMPLES_PER_POSITION * sr:
        return Reject("too_short", f"{duration:.3f} s is shorter than one model position", row.source, row.id)
    try:
        words, timing_source = _timed_words(row, samples, sr, duration, opts.timings)
    except ValueError as err:
        return Reject("bad_word_timings", str(err), row.source, row.id)
    base = Utterance(row.id, row.audio, row.text, duration, row.language, row.offset, row.end, words, timing_source, dict(row.extra))
    if duration <= opts.max_seconds:
        pieces = [(0.0, duration, base)]
    elif not opts.segment or words is None:
        why = "use --segment" if words is not None else "no word timings to cut at"
        return Reject("too_long", f"{duration:.2f} s > {opts.max_seconds} s ({why})", row.source, row.id)
    else:
        try:
            segments = segment_utterance(base, opts.max_seconds)
        except ValueError as err:
            return Reject("unsegmentable", str(err), row.source, row.id)
        origin = row.offset or 0.0
        pieces = [(u.offset - origin, u.end - origin, u) for u in segments]
    if opts.copy_dir is None:
        return [u for _, _, u in pieces]
    return [
        replace(u, audio=_write_copy(samples, sr, start, end, opts.copy_dir / f"{_safe_name(u.id)}.flac"), offset=None, end=None)
        for start, end, u in pieces
    ]


def _check_text(row: SourceRow, seen: set[str], encode: Callable[[str], list[int]] | None, unk_id: int | None) -> Reject | None:
    if not row.text:
        return Reject("empty_transcript", "the transcript is empty", row.source, row.id)
    if encode is not None:
        ids = encode(row.text)
        if not ids or (unk_id is not None and unk_id in ids):
            return Reject("unencodable_text", f"the tokenizer cannot encode {row.text!r}", row.source, row.id)
    if row.id in seen:
        return Reject("duplicate_id", f"id {row.id!r} appeared earlier", row.source, row.id)
    seen.add(row.id)
    return None


def _check_audio_star(args: tuple[SourceRow, PrepOptions]) -> list[Utterance] | Reject:
    return check_audio(*args)


def prepare(
    rows: Iterable[SourceRow | Reject],
    opts: PrepOptions,
    encode: Callable[[str], list[int]] | None = None,
    unk_id: int | None = None,
    workers: int | None = None,
) -> PrepResult:
    """Validate all rows; `encode` (a tokenizer's text -> ids) rejects text it maps to nothing or to `unk_id`."""
    if opts.copy_dir is not None:
        opts.copy_dir.mkdir(parents=True, exist_ok=True)
    rejects: list[Reject] = []
    todo: list[SourceRow] = []
    seen: set[str] = set()
    n_inputs = 0
    for row in rows:
        n_inputs += 1
        if isinstance(row, Reject):
            rejects.append(row)
            continue
        row.text = normalise_text(row.text)
        bad = _check_text(row, seen, encode, unk_id)
        if bad is not None:
            rejects.append(bad)
        else:
            todo.append(row)
    workers = workers or os.cpu_count() or 1
    jobs = [(row, opts) for row in todo]
    if workers == 1 or len(jobs) < 2:
        results = list(map(_check_audio_star, jobs))
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_check_audio_star, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers)))))
    kept: list[Utterance] = []
    for result in results:
        if isinstance(result, Reject):
            rejects.append(result)
        else:
            kept.extend(result)
    return PrepResult(kept, rejects, n_inputs, sum(u.duration or 0.0 for u in kept))

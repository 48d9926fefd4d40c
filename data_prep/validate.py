"""Turn imported rows into manifest rows or rejects: every input row ends in exactly one of the two.

Text checks (cleaning, empty, unencodable, duplicate id) run in the main process; audio checks (header, length,
timings, decode, NaN/inf, segmentation, optional copy to 16 kHz FLAC) run in a process pool, in input order. The
header is read first, so a file that is too long or untimed under `--timings manifest` costs no decode.

Word timings (`timings`): `auto` keeps a row's own, else leaves it to the alignment model the command was given,
else estimates them from the signal energy (`heuristic`); `manifest` rejects untimed rows (`no_word_timings`);
`heuristic` estimates where missing; `none` drops them. Each kept row records its `timing_source`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import soundfile as sf

from data_prep.text import clean_transcript
from data_prep.timings import check_words, heuristic_words
from voxtral_train.audio import AudioError, audio_info, read_native, resample
from voxtral_train.manifest import Utterance, Word, segment_utterance
from voxtral_train.protocol import SAMPLE_RATE, SAMPLES_PER_POSITION

TIMING_MODES = ("auto", "manifest", "heuristic", "none")
# What the summary says when it had to guess timings. The figure is measured on the bundled espeak-ng set (evenly
# paced speech, the heuristic's best case; README "Your own data"): natural speech with pauses is worse.
HEURISTIC_NOTE = ("heuristic timings (the speech span split by character count: word ends ~50 ms off on evenly paced "
                  "speech, far more where the speaker pauses). The model learns when to emit words from them: "
                  "--self-align-model DIR or --ctc-align-model DIR time rows properly")


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
    line: int | None = None  # line of the input table / transcript list this row came from


@dataclass
class Reject:
    reason: str
    message: str
    source: dict[str, Any]
    id: str | None = None
    line: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "line": self.line, "reason": self.reason, "message": self.message, "source": self.source}


def reject(row: SourceRow, reason: str, message: str) -> Reject:
    return Reject(reason, message, row.source, row.id, row.line)


@dataclass
class TextChange:
    """A transcript that cleaning changed beyond whitespace: the row is kept, with both texts in changes.jsonl."""

    id: str
    line: int | None
    original: str
    cleaned: str
    removed: list[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PrepOptions:
    max_seconds: float = 30.0  # longer clips are rejected, or cut at word boundaries with `segment`
    segment: bool = False
    timings: str = "auto"  # see the module doc
    copy_dir: Path | None = None  # write each kept row as 16 kHz mono FLAC here (segments as their own files)
    aligner: bool = False  # an alignment model times untimed rows after validation (auto leaves them untimed here)

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
    changes: list[TextChange] = field(default_factory=list)

    def summary(self) -> str:
        """`kept N, rejected M (reason: count, ...)`, then the rows per timing source, cleaned transcripts, and what
        heuristic timings cost when any were used."""
        counts = Counter(r.reason for r in self.rejects)
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        line = f"kept {self.n_inputs - len(self.rejects)}, rejected {len(self.rejects)}" + (f" ({detail})" if detail else "")
        if len(self.kept) != self.n_inputs - len(self.rejects):
            line += f"; {len(self.kept)} manifest rows after segmentation"
        lines = [line]
        sources = Counter(u.timing_source or "untimed" for u in self.kept)
        if sources:
            lines.append("timings: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())))
        if self.changes:
            lines.append(f"cleaned {len(self.changes)} transcripts (control characters, escapes or invisible marks "
                         "removed): see changes.jsonl")
        if sources.get("heuristic"):
            lines.append(f"note: {sources['heuristic']} rows have {HEURISTIC_NOTE}")
        if sources.get("untimed"):
            lines.append(f"note: {sources['untimed']} rows have no word timings: voxtral-train refuses them until they "
                         "get some (--timings auto)")
        return "\n".join(lines)


def _safe_name(uid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", uid)


def _guesses_timings(row: SourceRow, opts: PrepOptions) -> bool:
    """Whether this row gets heuristic timings here (and so can be segmented)."""
    return row.words is None and (opts.timings == "heuristic" or (opts.timings == "auto" and not opts.aligner))


def _timed_words(row: SourceRow, samples: np.ndarray, sr: int, duration: float,
                 opts: PrepOptions) -> tuple[list[Word] | None, str | None]:
    if opts.timings == "none":
        return None, None
    if row.words is not None:
        return check_words(row.words, row.text, duration), row.timing_source or "manifest"
    if _guesses_timings(row, opts):
        return heuristic_words(row.text, samples, sr), "heuristic"
    return None, None  # auto with an alignment model: timed after validation


def heuristic_fill(utterances: list[Utterance]) -> int:
    """Heuristic timings for rows an alignment model left untimed (`--timings auto`), in place; returns how many."""
    filled = 0
    for u in utterances:
        if u.words is None:
            samples, sr = read_native(u.audio, u.offset, u.end)
            u.words, u.timing_source = heuristic_words(u.text, samples, sr), "heuristic"
            filled += 1
    return filled


def _write_copy(samples: np.ndarray, sr: int, start: float, end: float, path: Path) -> str:
    clip = resample(samples[int(round(start * sr)) : int(round(end * sr))], sr)
    sf.write(path, np.clip(clip, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return str(path)


def _too_long(row: SourceRow, seconds: float, opts: PrepOptions, cuttable: bool) -> Reject:
    if not opts.segment:
        fix = "pass --segment to cut it at word boundaries" if cuttable else "cut it into clips first"
    else:
        fix = ("--segment has no word timings to cut it at (--timings none, or alignment models run after this "
               "check): give the row word timings, or cut it into clips first")
    return reject(row, "too_long", f"{seconds:.2f} s is longer than --max-seconds {opts.max_seconds:g}: {fix}, "
                                   "or raise --max-seconds")


def check_audio(row: SourceRow, opts: PrepOptions) -> list[Utterance] | Reject:
    """Measure (header), time, decode and (if needed) segment one row. Runs in a worker process."""
    try:
        frames, sr = audio_info(row.audio)
    except AudioError as err:
        return reject(row, err.reason, err.message)
    if opts.timings == "manifest" and row.words is None:
        return reject(row, "no_word_timings", "the row has no word timings and --timings manifest keeps only timed "
                                              "rows: use --timings auto to align or estimate them")
    header_seconds = min(frames / sr, row.end or float("inf")) - (row.offset or 0.0)
    cuttable = opts.timings != "none" and (row.words is not None or _guesses_timings(row, opts))
    if header_seconds > opts.max_seconds and not (opts.segment and cuttable):
        return _too_long(row, header_seconds, opts, cuttable)  # no decode: a 45-minute file costs milliseconds
    try:
        samples, sr = read_native(row.audio, row.offset, row.end)
    except AudioError as err:
        return reject(row, err.reason, err.message)
    duration = len(samples) / sr
    if len(samples) * SAMPLE_RATE < SAMPLES_PER_POSITION * sr:
        return reject(row, "too_short", f"{duration:.3f} s is shorter than one model position")
    try:
        words, timing_source = _timed_words(row, samples, sr, duration, opts)
    except ValueError as err:
        return reject(row, "bad_word_timings", str(err))
    base = Utterance(row.id, row.audio, row.text, duration, row.language, row.offset, row.end, words, timing_source, dict(row.extra))
    if duration <= opts.max_seconds:
        pieces = [(0.0, duration, base)]
    elif not opts.segment or words is None:  # the header said it fits; the decoded length (mp3 padding) did not
        return _too_long(row, duration, opts, words is not None)
    else:
        try:
            segments = segment_utterance(base, opts.max_seconds)
        except ValueError as err:
            return reject(row, "unsegmentable", str(err))
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
        return reject(row, "empty_transcript", "the transcript is empty")
    if encode is not None:
        ids = encode(row.text)
        if not ids or (unk_id is not None and unk_id in ids):
            return reject(row, "unencodable_text", f"the tokenizer cannot encode {row.text!r}")
    if row.id in seen:
        return reject(row, "duplicate_id", f"id {row.id!r} appeared earlier")
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
    changes: list[TextChange] = []
    todo: list[SourceRow] = []
    seen: set[str] = set()
    n_inputs = 0
    for row in rows:
        n_inputs += 1
        if isinstance(row, Reject):
            rejects.append(row)
            continue
        cleaned, removed = clean_transcript(row.text)
        if removed:
            changes.append(TextChange(row.id, row.line, row.text, cleaned, removed))
            row.extra["text_cleaned"] = True
        row.text = cleaned
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
    return PrepResult(kept, rejects, n_inputs, sum(u.duration or 0.0 for u in kept), changes)

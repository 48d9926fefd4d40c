"""The manifest the trainer reads: JSONL, one utterance per line.

Keys: `id`, `audio` (path relative to the manifest's folder, or absolute), `text`, and optionally
`duration` (seconds of the segment), `language`, `offset`/`end` (a segment of a longer file, seconds),
`words` (`[{"word", "start", "end"}]`, seconds relative to the segment start) and `timing_source`
(what produced the words: "manifest", "self_align", "ctc_align", "heuristic", "espeak").
NeMo manifests (`audio_filepath`, `duration`, `offset`, no `id`) are read too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from voxtral_train.audio import audio_duration

TIMING_SOURCES = ("manifest", "self_align", "ctc_align", "heuristic", "espeak")
_ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class Word:
    word: str
    start: float  # seconds from the segment start
    end: float


@dataclass
class Utterance:
    id: str
    audio: str  # absolute path once read
    text: str
    duration: float | None = None
    language: str | None = None
    offset: float | None = None
    end: float | None = None
    words: list[Word] | None = None
    timing_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept for the round trip

    def to_json(self, base: Path | None = None) -> dict[str, Any]:
        """The JSON object of this row; `audio` is written relative to `base` when it lies under it."""
        audio = self.audio
        if base is not None:
            try:
                audio = Path(audio).resolve().relative_to(base.resolve()).as_posix()
            except ValueError:
                pass
        row: dict[str, Any] = {"id": self.id, "audio": audio, "text": self.text}
        for key in ("duration", "language", "offset", "end"):
            value = getattr(self, key)
            if value is not None:
                row[key] = round(value, 4) if isinstance(value, float) else value
        if self.words is not None:
            row["words"] = [{"word": w.word, "start": round(w.start, 4), "end": round(w.end, 4)} for w in self.words]
        if self.timing_source is not None:
            row["timing_source"] = self.timing_source
        row.update(self.extra)
        return row


class ManifestError(ValueError):
    pass


def _number(row: dict, key: str, where: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ManifestError(f"{where}: key '{key}' must be a finite number, got {value!r}")
    return float(value)


def _words(value: Any, where: str) -> list[Word]:
    if not isinstance(value, list):
        raise ManifestError(f"{where}: key 'words' must be a list")
    words = []
    for i, w in enumerate(value):
        if not isinstance(w, dict) or not isinstance(w.get("word"), str):
            raise ManifestError(f"{where}: key 'words[{i}]' needs a string 'word'")
        start, end = _number(w, "start", f"{where} words[{i}]"), _number(w, "end", f"{where} words[{i}]")
        if start is None or end is None or end < start:
            raise ManifestError(f"{where}: key 'words[{i}]' needs numbers start <= end, got {w}")
        words.append(Word(w["word"], start, end))
    return words


def utterance_from_json(row: dict[str, Any], base: Path, where: str) -> Utterance:
    """One manifest object -> Utterance, resolving `audio` against `base`. `where` names the row in errors."""
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    row = dict(row)
    audio = row.pop("audio", None) or row.pop("audio_filepath", None)
    if not isinstance(audio, str) or not audio:
        raise ManifestError(f"{where}: key 'audio' (or 'audio_filepath') is missing")
    text = row.pop("text", None)
    if not isinstance(text, str):
        raise ManifestError(f"{where}: key 'text' is missing or not a string")
    offset, end, duration = (_number(row, k, where) for k in ("offset", "end", "duration"))
    for key in ("offset", "end", "duration"):
        row.pop(key, None)
    if offset is not None and end is None and duration is not None:
        end = offset + duration  # NeMo: duration counts from the offset
    uid = row.pop("id", None)
    if uid is None:  # NeMo rows have no id: the file name (and offset) identify the clip
        uid = Path(audio).stem + (f"@{offset:.2f}" if offset else "")
    words = row.pop("words", None)
    timing_source = row.pop("timing_source", None)
    if timing_source is not None and timing_source not in TIMING_SOURCES:
        raise ManifestError(f"{where}: key 'timing_source' must be one of {TIMING_SOURCES}, got {timing_source!r}")
    return Utterance(
        id=str(uid),
        audio=str(audio if os.path.isabs(audio) else (base / audio).resolve()),
        text=text,
        duration=duration,
        language=row.pop("language", None),
        offset=offset,
        end=end,
        words=None if words is None else _words(words, where),
        timing_source=timing_source,
        extra=row,
    )


BUNDLED_PREFIX = "bundled:"  # `bundled:train` names the bundled manifest wherever a manifest path is taken


def jsonl_objects(path: Path) -> Iterator[tuple[str, str, Any, int]]:
    """(`file:line`, the raw line, its parsed object or the JSONDecodeError, the line number) for each non-blank line
    of a JSONL file. A line that is not UTF-8 is a JSONDecodeError too (RFC 8259: JSON text is UTF-8), so it is
    reported as a bad row, not raised from inside the file iterator. Lines end at "\n" (as `ManifestIndex` reads)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                line = raw.decode("utf-8", "replace")
                obj: Any = json.JSONDecodeError(f"not UTF-8 text ({err.reason} at byte {err.start}): write the "
                                                "manifest as UTF-8", line, err.start)
            else:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    obj = err
            yield f"{path}:{lineno}", line.rstrip("\r\n"), obj, lineno


def manifest_path(spec: str | os.PathLike) -> Path:
    """The file a manifest spec names: a path, or `bundled:train` / `bundled:eval` (the bundled speech set)."""
    if str(spec).startswith(BUNDLED_PREFIX):
        return bundled_manifest_path(str(spec).removeprefix(BUNDLED_PREFIX))
    return Path(spec)


def read_manifest(path: str | os.PathLike) -> list[Utterance]:
    """All rows of a JSONL manifest (or `bundled:train` / `bundled:eval`, the bundled speech set); raises
    ManifestError naming the line and key of the first bad row."""
    path = manifest_path(path)
    rows = []
    for where, _, obj, _ in jsonl_objects(path):
        if isinstance(obj, json.JSONDecodeError):
            raise ManifestError(f"{where}: invalid JSON ({obj})")
        rows.append(utterance_from_json(obj, path.parent, where))
    return rows


def write_manifest(path: str | os.PathLike, rows: Iterable[Utterance]) -> None:
    """Write rows as JSONL; audio under the manifest's folder is written as a relative path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.to_json(path.parent), ensure_ascii=False) + "\n")
    tmp.replace(path)


# The bundled sets, by the name `bundled:<name>` gives them: (folder under assets/, manifest file).
BUNDLED_SETS = {
    "train": ("speech", "manifest.jsonl"),  # 56 short sentences, 6 voices: what the tiny demo memorises
    "eval": ("speech", "manifest_eval.jsonl"),  # 8 sentences recombining the training words
    "medical_train": ("medical", "manifest.jsonl"),  # the default run's domain: voxtral-prep synth --domain medical
    "medical_eval": ("medical", "manifest_eval.jsonl"),  # held-out sentences of that domain (no training text)
}


def bundled_manifest_path(split: str = "train") -> Path:
    """A bundled espeak-ng speech set (BUNDLED_SETS): `train` / `eval`, the short-sentence set of the tiny demo, or
    `medical_train` / `medical_eval`, the domain the default run adapts the mini base to
    (data_prep/make_bundled_set.py builds both)."""
    if split not in BUNDLED_SETS:
        raise ValueError(f"bundled set must be one of {sorted(BUNDLED_SETS)}, got {split!r}")
    folder, name = BUNDLED_SETS[split]
    return _ASSETS / folder / name


# --------------------------------------------------------------------------------------------------------------
# Long recordings
# --------------------------------------------------------------------------------------------------------------
def known_seconds(utt: Utterance) -> float | None:
    """Seconds of the segment from the manifest alone: `duration`, else `end - offset`; None when neither is set."""
    if utt.duration is not None:
        return utt.duration
    if utt.end is not None:
        return utt.end - (utt.offset or 0.0)
    return None


def utterance_seconds(utt: Utterance) -> float:
    """Seconds of the segment: from the manifest, else from the audio file's header (no decoding)."""
    seconds = known_seconds(utt)
    return audio_duration(utt.audio) - (utt.offset or 0.0) if seconds is None else seconds


def segment_utterance(utt: Utterance, max_seconds: float) -> list[Utterance]:
    """Cut an utterance longer than `max_seconds` into segments of at most `max_seconds`, between words.

    A cut falls in the middle of the silence between two words (or at the last word's end, if the next one overlaps
    it), never later than `max_seconds` after the segment start. Silence that would push a word out of reach is left
    out at a segment's start and end. Words are re-timed relative to their segment; the ids get `#<n>`.
    """
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    total = known_seconds(utt)
    if total is None:
        raise ValueError(f"utterance {utt.id}: duration unknown, cannot segment it (set 'duration' in the manifest)")
    if total <= max_seconds:
        return [utt]
    if utt.words is None:
        raise ValueError(f"utterance {utt.id} lasts {total:.1f} s > max_seconds={max_seconds} and has no word "
                         "timings to cut at: run data_prep to assign them")

    spans: list[tuple[float, float, list[Word]]] = []
    start, current = 0.0, []
    for word in utt.words:
        if word.end - word.start > max_seconds:
            raise ValueError(f"utterance {utt.id}: word {word.word!r} lasts {word.end - word.start:.1f} s, "
                             f"longer than max_seconds={max_seconds}")
        if current and word.end - start > max_seconds:
            previous_end = current[-1].end
            cut = min(start + max_seconds, max(previous_end, (previous_end + word.start) / 2))
            spans.append((start, cut, current))
            start, current = cut, []
        start = max(start, word.end - max_seconds)  # skip silence that would leave the word out of reach
        current.append(word)
    spans.append((start, min(total, start + max_seconds), current))

    base = utt.offset or 0.0
    return [
        dataclasses.replace(
            utt,
            id=f"{utt.id}#{n}",
            text=" ".join(w.word for w in words),
            duration=stop - begin,
            offset=base + begin,
            end=base + stop,
            words=[Word(w.word, max(0.0, w.start - begin), w.end - begin) for w in words],
            extra=dict(utt.extra),
        )
        for n, (begin, stop, words) in enumerate(spans)
    ]

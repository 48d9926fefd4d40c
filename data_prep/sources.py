"""Importers: each walks one corpus layout and yields `SourceRow`s (or `Reject`s for rows it cannot read),
in a deterministic order. They never decode audio; `data_prep.validate` does that.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from data_prep.validate import Reject, SourceRow
from voxtral_train.manifest import ManifestError, jsonl_objects, utterance_from_json

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif", ".w64", ".caf")
TRANSCRIPT_SUFFIXES = (".txt", ".lab")
AUDIO_KEYS = ("audio", "audio_filepath", "path", "file", "filename", "wav")
TEXT_KEYS = ("text", "sentence", "transcript", "transcription", "normalized_text")
NUMBER_KEYS = ("offset", "end", "duration")

Row = SourceRow | Reject


def _stem_id(path: Path, root: Path) -> str:
    """The path under `root` without its suffix: unique where bare stems may repeat across folders."""
    return path.relative_to(root).with_suffix("").as_posix()


def from_folder(root: Path) -> Iterator[Row]:
    """Audio files with a same-name .txt or .lab transcript beside them, at any depth."""
    root = root.resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    audio_stems = {p.with_suffix("") for p in files if p.suffix.lower() in AUDIO_SUFFIXES}
    for path in files:
        suffix = path.suffix.lower()
        if suffix in TRANSCRIPT_SUFFIXES and path.with_suffix("") not in audio_stems:
            yield Reject("missing_file", f"no audio file beside transcript {path}", {"transcript": str(path)}, _stem_id(path, root))
        if suffix not in AUDIO_SUFFIXES:
            continue
        source = {"audio": str(path)}
        transcript = next((t for t in (path.with_suffix(s) for s in TRANSCRIPT_SUFFIXES) if t.is_file()), None)
        if transcript is None:
            yield Reject("missing_transcript", f"no .txt or .lab beside {path}", source, _stem_id(path, root))
            continue
        source["transcript"] = str(transcript)
        yield SourceRow(source, _stem_id(path, root), str(path), transcript.read_text(encoding="utf-8", errors="replace"))


def _not_text(value: Any, key: str, where: str, source: dict[str, Any], uid: Any, line: int | None) -> Reject:
    """A transcript column holding a number, a list, null...: its own reason, not the one for a missing column."""
    return Reject("transcript_not_text", f"{where}: the transcript '{key}' is {type(value).__name__} {value!r}, "
                                         "not a string", source, None if uid is None else str(uid), line)


def _from_mapping(obj: Any, base: Path, where: str, line: int | None) -> Row:
    """A table/JSONL row with any of the usual column names -> SourceRow, through the manifest parser."""
    if not isinstance(obj, dict):
        return Reject("bad_row", f"{where}: expected an object", {"row": obj}, line=line)
    row = {k: v for k, v in obj.items() if k not in AUDIO_KEYS + TEXT_KEYS}
    audio = next((obj[k] for k in AUDIO_KEYS if isinstance(obj.get(k), str) and obj[k]), None)
    text_key = next((k for k in TEXT_KEYS if k in obj), None)
    if text_key is not None and not isinstance(obj[text_key], str):
        return _not_text(obj[text_key], text_key, where, obj, obj.get("id"), line)
    text = None if text_key is None else obj[text_key]
    for key in NUMBER_KEYS:  # CSV cells are strings
        if isinstance(row.get(key), str):
            try:
                row[key] = float(row[key]) if row[key].strip() else None
            except ValueError:
                pass  # the manifest parser names the bad key
    row.update({"audio": audio, "text": text})
    if audio is not None and "id" not in obj:
        rel = Path(audio).with_suffix("").as_posix()
        row["id"] = rel + (f"@{row['offset']:.2f}" if isinstance(row.get("offset"), float) and row["offset"] else "")
    try:
        u = utterance_from_json(row, base, where)
    except ManifestError as err:
        return Reject("bad_row", str(err), obj, None if obj.get("id") is None else str(obj.get("id")), line)
    return SourceRow(obj, u.id, u.audio, u.text, u.offset, u.end, u.language, u.words, u.timing_source, u.extra, line)


def from_table(path: Path) -> Iterator[Row]:
    """A JSONL (our manifest, NeMo, or any row with audio/text columns), CSV or TSV file; relative audio paths
    are resolved against the file's folder."""
    path = path.resolve()
    if path.suffix.lower() in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            for lineno, obj in enumerate(reader, 2):
                yield _from_mapping(obj, path.parent, f"{path}:{lineno}", lineno)
        return
    for where, line, obj, lineno in jsonl_objects(path):
        if isinstance(obj, json.JSONDecodeError):
            yield Reject("bad_row", f"{where}: invalid JSON ({obj})", {"line": line}, line=lineno)
        else:
            yield _from_mapping(obj, path.parent, where, lineno)


def from_librispeech(root: Path) -> Iterator[Row]:
    """LibriSpeech: SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt lines `UTT_ID TEXT`, audio UTT_ID.flac beside it."""
    for trans in sorted(root.resolve().rglob("*.trans.txt")):
        for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            source = {"transcript": f"{trans}:{lineno}", "line": line}
            yield SourceRow(source, uid, str(trans.parent / f"{uid}.flac"), text, language="en", line=lineno)


def from_common_voice(tsv: Path) -> Iterator[Row]:
    """A Common Voice split file (train.tsv, validated.tsv, ...): `path` and `sentence` columns, clips in clips/."""
    tsv = tsv.resolve()
    with tsv.open(encoding="utf-8", newline="") as f:
        for lineno, obj in enumerate(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 2):
            clip, text = obj.get("path"), obj.get("sentence")
            if not clip or text is None:
                yield Reject("bad_row", f"{tsv}:{lineno}: needs 'path' and 'sentence' columns", dict(obj), line=lineno)
                continue
            yield SourceRow(dict(obj), Path(clip).stem, str(tsv.parent / "clips" / clip), text,
                            language=obj.get("locale") or None, line=lineno)


def from_hf_dataset(
    path: Path, audio_dir: Path, split: str | None = None, audio_column: str | None = None, text_column: str | None = None
) -> Iterator[Row]:
    """A `datasets` dataset saved with `save_to_disk`. The audio column is read undecoded and each clip's
    original bytes are written to `audio_dir` (the manifest needs files)."""
    import datasets  # lazy: heavy, and only this importer needs it

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) != 1:
            raise ValueError(f"{path} has splits {sorted(ds)}: pass --split")
        split = split or next(iter(ds))
        ds = ds[split]
    audio_column = audio_column or next((k for k, v in ds.features.items() if isinstance(v, datasets.Audio)), None)
    text_column = text_column or next((k for k in TEXT_KEYS if k in ds.features), None)
    if audio_column is None or text_column is None:
        raise ValueError(f"{path}: cannot tell the audio and text columns apart in {list(ds.features)}; pass --audio-column/--text-column")
    ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
    audio_dir.mkdir(parents=True, exist_ok=True)
    for index, obj in enumerate(ds):
        audio = obj.pop(audio_column) or {}
        uid = str(obj["id"]) if obj.get("id") is not None else f"{split or 'data'}-{index:07d}"
        source = {k: v for k, v in obj.items() if isinstance(v, (str, int, float, bool, type(None)))}
        source.update({"index": index, "audio_path": audio.get("path")})
        file = audio.get("path")
        if audio.get("bytes"):
            suffix = Path(file).suffix if file and Path(file).suffix else ".wav"
            file = audio_dir / f"{index:07d}{suffix}"
            file.write_bytes(audio["bytes"])
        if not file:
            yield Reject("missing_file", f"row {index} has no audio bytes or path", source, uid)
            continue
        text = obj.get(text_column)
        if not isinstance(text, str):
            yield _not_text(text, text_column, f"{path} row {index}", source, uid, None)
            continue
        yield SourceRow(source, uid, str(Path(file).resolve()), text, language=obj.get("language") or obj.get("locale"))

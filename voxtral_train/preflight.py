"""Pre-flight: everything about the data and the settings that can be known before the model loads, said at once.

`check_run(settings)` reads every manifest row and every audio file's header (no decoding) and refuses the run with
one `PreflightError` listing every problem: a missing, empty or malformed manifest, rows whose audio is missing or
not audio, rows without word timings (with the `voxtral-prep` command that gives them some), segments outside their
file, recordings too long to cut at `data.max_seconds`, an item longer than `data.max_positions_per_batch`, and a
`train.resume` folder that is not a checkpoint. It runs before the run folder exists, so a refused run leaves none.
Without it these surface as a traceback inside a DataLoader worker, after the model has loaded, at whatever step
their batch comes up. It also returns the warnings worth printing (settings that run but cannot be what was meant).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from voxtral_train import protocol
from voxtral_train.audio import AudioError, audio_info
from voxtral_train.checkpoint import CheckpointError, resolve_resume
from voxtral_train.config import DataSettings, Settings
from voxtral_train.manifest import (
    ManifestError,
    Utterance,
    jsonl_objects,
    known_seconds,
    manifest_path,
    segment_utterance,
    utterance_from_json,
)

EXAMPLES = 3  # rows named per kind of problem: enough to find the pattern, short enough to read


class PreflightError(ValueError):
    """The data or settings cannot train; the message lists every problem and what fixes it."""


class UnreadableData(RuntimeError):
    """A whole epoch of training audio stopped reading after the check passed (files moved or deleted mid-run)."""


@dataclass
class CheckedRun:
    train: list[Utterance]  # rows with `duration` read from the headers, ready for StreamingDataset
    eval: list[Utterance] | None
    notes: list[str] = field(default_factory=list)  # warnings and facts to print before the model loads


@dataclass
class _Problems:
    """Rows with one kind of problem: counted, the first few named."""

    what: str
    rows: list[str] = field(default_factory=list)

    def add(self, row: str) -> None:
        self.rows.append(row)

    def describe(self, n_rows: int) -> str:
        named = "; ".join(self.rows[:EXAMPLES]) + ("; ..." if len(self.rows) > EXAMPLES else "")
        return f"{len(self.rows)} of {n_rows} rows {self.what}: {named}"


def _prep_fix(key: str, path: Path, untimed: bool, bad: bool) -> str:
    """The one command that turns this manifest into a trainable one, and what it does."""
    out = path.parent / f"{path.stem}_prepared"
    does = []
    if bad:
        does.append("keeps the good rows and lists the others in rejects.jsonl with their reason")
    if untimed:
        does.append("gives untimed rows heuristic word timings (add --self-align-model DIR for the model's own; "
                    "README 'Your own data')")
    return (f"fix: voxtral-prep validate {path} --out {out}  ({'; '.join(does)}), then train with "
            f"{key}={out / 'manifest.jsonl'}")


def check_manifest(key: str, spec: str, data: DataSettings) -> tuple[list[Utterance], list[str], list[str]]:
    """(rows with durations, problems, notes) of the manifest `spec` given as setting `key`."""
    path = manifest_path(spec)
    if path.is_dir():
        inside = path / "manifest.jsonl"
        hint = f": pass {key}={inside}" if inside.is_file() else ""
        return [], [f"{key}={spec} is a folder, not a JSONL manifest{hint}"], []
    if not path.is_file():
        return [], [f"{key}={spec}: no such file (voxtral-prep writes one: voxtral-prep folder CLIPS/ --out DIR "
                    f"makes DIR/manifest.jsonl)"], []
    malformed = _Problems("are not manifest rows")
    unreadable = _Problems("have audio that cannot be read")
    outside = _Problems("name a segment outside their audio file")
    untimed = _Problems("have no word timings (the targets need them)")
    uncuttable = _Problems(f"are longer than data.max_seconds={data.max_seconds:g} and cannot be cut at word "
                           "boundaries (raise data.max_seconds, or cut those recordings)")
    rows: list[Utterance] = []
    n_rows = 0
    headers: dict[str, tuple[int, int] | AudioError] = {}  # rows often share a file (offset/end segments)
    for where, _, obj, lineno in jsonl_objects(path):
        n_rows += 1
        try:
            if isinstance(obj, json.JSONDecodeError):
                raise ManifestError(f"{where}: invalid JSON ({obj})")
            utt = utterance_from_json(obj, path.parent, where)
        except ManifestError as err:
            malformed.add(f"line {lineno}: " + str(err).removeprefix(f"{where}: "))
            continue
        name = f"line {lineno} ({utt.id})"
        if utt.audio not in headers:
            try:
                headers[utt.audio] = audio_info(utt.audio)
            except AudioError as err:
                headers[utt.audio] = err
        header = headers[utt.audio]
        if isinstance(header, AudioError):
            unreadable.add(f"{name}: {header.reason}: {header.message}")
            continue
        frames, sr = header
        seconds = known_seconds(utt)
        if seconds is None:  # the whole file, or from the offset to its end
            seconds = frames / sr - (utt.offset or 0.0)
        if seconds <= 0 or (utt.offset or 0.0) >= frames / sr:
            outside.add(f"{name}: [{utt.offset}, {utt.end}) in a file of {frames / sr:.2f} s")
            continue
        if utt.words is None:
            untimed.add(utt.id)
        rows.append(dataclasses.replace(utt, duration=seconds))
    if n_rows == 0:
        return [], [f"{key}={spec} has no rows (if voxtral-prep wrote it, its rejects.jsonl says why each row was "
                    "rejected)"], []
    items, n_cut = _items(rows, data.max_seconds, uncuttable)
    kinds = [p for p in (malformed, unreadable, outside, untimed, uncuttable) if p.rows]
    problems = [f"{key}={spec}: {p.describe(n_rows)}" for p in kinds]
    if kinds and kinds != [uncuttable]:
        problems.append(_prep_fix(key, path, untimed=bool(untimed.rows),
                                  bad=bool(malformed.rows or unreadable.rows or outside.rows)))
    if kinds and not rows:
        problems.insert(0, f"none of the {n_rows} rows of {key}={spec} can be trained on")
    problems += _budget_problems(items, data)
    notes = [f"{key}: {n_cut} rows longer than data.max_seconds={data.max_seconds:g} are cut at word boundaries "
             f"({len(items)} items in all)"] if n_cut else []
    return rows, problems, notes


def _items(rows: list[Utterance], max_seconds: float, uncuttable: _Problems) -> tuple[list[Utterance], int]:
    """The training items the rows become (StreamingDataset cuts long ones the same way), and how many rows were cut."""
    items, n_cut = [], 0
    for utt in rows:
        if utt.words is None or utt.duration <= max_seconds:  # untimed rows are already a problem of their own
            items.append(utt)
            continue
        try:
            items += segment_utterance(utt, max_seconds)
            n_cut += 1
        except ValueError as err:
            uncuttable.add(str(err))
    return items, n_cut


def _budget_problems(items: list[Utterance], data: DataSettings) -> list[str]:
    """The longest item must fit one micro-batch at the largest delay it can draw."""
    if not items:
        return []
    longest = max(items, key=lambda u: u.duration)
    max_delay_ms = max(data.delays_ms)
    positions = protocol.n_total_positions(math.ceil(longest.duration * protocol.SAMPLE_RATE),
                                           protocol.delay_ms_to_tokens(max_delay_ms))
    if positions <= data.max_positions_per_batch:
        return []
    return [f"data.max_positions_per_batch={data.max_positions_per_batch}: the longest item ({longest.id}, "
            f"{longest.duration:.1f} s) needs {positions} positions at the largest delay ({max_delay_ms} ms): raise "
            f"data.max_positions_per_batch to at least {positions}, or lower data.max_seconds"]


def settings_warnings(settings: Settings) -> list[str]:
    """Settings that run but cannot be what was meant."""
    t = settings.train
    warnings = []
    if t.warmup_steps >= t.max_steps:
        warnings.append(f"WARNING: train.warmup_steps={t.warmup_steps} >= train.max_steps={t.max_steps}: the learning "
                        f"rate never leaves warmup (it only reaches optim.lr at the last step, if at all); lower "
                        f"train.warmup_steps (e.g. {max(1, t.max_steps // 10)})")
    return warnings


def check_run(settings: Settings) -> CheckedRun:
    """Every manifest of the run checked (headers read, nothing decoded); raises PreflightError listing all problems."""
    data = settings.data
    train, problems, notes = check_manifest("data.train_manifest", data.train_manifest, data)
    held_out = None
    if data.eval_manifest is not None:
        held_out, eval_problems, eval_notes = check_manifest("data.eval_manifest", data.eval_manifest, data)
        problems += eval_problems
        notes += eval_notes
    if settings.train.resume not in (None, "latest"):  # a named folder must be a checkpoint; `latest` may find none
        try:
            resolve_resume(settings.train.resume, Path(settings.train.output_root) / settings.train.name)
        except CheckpointError as err:
            problems.append(str(err))
    if problems:
        raise PreflightError("the run cannot start (nothing was loaded):\n  " + "\n  ".join(problems))
    return CheckedRun(train, held_out, settings_warnings(settings) + notes)


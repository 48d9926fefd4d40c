"""Pre-flight: everything about the data and the settings that can be known before the model loads, said at once.

`check_run(settings)` reads every manifest row (one at a time, through `ManifestIndex`, so a 5 M-row manifest costs
its index and not its rows; in chunks on forked processes from PARALLEL_ROWS rows) and every audio file's header (no
decoding), or a shard corpus's index (`check_shards`:
its rows were checked when it was written), and refuses the run with
one `PreflightError` listing every problem: a missing, empty or malformed manifest, rows whose audio is missing or
not audio, rows without word timings (with the `voxtral-prep` command that gives them some), segments outside their
file, recordings too long to cut at `data.max_seconds`, an item longer than `data.max_positions_per_batch`, and a
`train.resume` folder that is not a checkpoint. It runs before the run folder exists, so a refused run leaves none.
Without it these surface as a traceback inside a DataLoader worker, after the model has loaded, at whatever step
their batch comes up. It also returns the warnings worth printing (settings that run but cannot be what was meant).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voxtral_train import protocol
from voxtral_train.audio import AudioError, audio_info
from voxtral_train.checkpoint import CheckpointError, resolve_resume
from voxtral_train.config import DataSettings, Settings
from voxtral_train.manifest import ManifestError, Utterance, known_seconds, manifest_path, segment_utterance
from voxtral_train.manifest_index import ManifestIndex, cores_per_process
from voxtral_train.shards import ShardError, ShardIndex, is_shard_folder, probe_shard

EXAMPLES = 3  # rows named per kind of problem: enough to find the pattern, short enough to read


class PreflightError(ValueError):
    """The data or settings cannot train; the message lists every problem and what fixes it."""


class UnreadableData(RuntimeError):
    """A whole epoch of training audio stopped reading after the check passed (files moved or deleted mid-run)."""


@dataclass
class CheckedRun:
    train: ManifestIndex | ShardIndex  # the rows with their `duration` (headers read where the manifest had none)
    eval: ManifestIndex | None
    notes: list[str] = field(default_factory=list)  # warnings and facts to print before the model loads


@dataclass
class _Problems:
    """Rows with one kind of problem: counted, the first few named (a count, not a list: 5 M untimed rows)."""

    what: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, row: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(row)

    def describe(self, n_rows: int) -> str:
        named = "; ".join(self.examples) + ("; ..." if self.count > EXAMPLES else "")
        return f"{self.count} of {n_rows} rows {self.what}: {named}"


class _Headers:
    """`audio_info` of recent files, or the AudioError: rows often share a file (offset/end segments, mostly next to
    each other), and a bounded cache keeps the check's heap flat on millions of files."""

    def __init__(self, size: int = 4096) -> None:
        self.size, self._recent = size, OrderedDict[str, tuple[int, int] | AudioError]()

    def __call__(self, audio: str) -> tuple[int, int] | AudioError:
        if audio in self._recent:
            self._recent.move_to_end(audio)
            return self._recent[audio]
        try:
            header: tuple[int, int] | AudioError = audio_info(audio)
        except AudioError as err:
            header = err
        self._recent[audio] = header
        if len(self._recent) > self.size:
            self._recent.popitem(last=False)
        return header


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


def check_manifest(key: str, spec: str, data: DataSettings) -> tuple[ManifestIndex | None, list[str], list[str]]:
    """(the rows with their durations, problems, notes) of the manifest `spec` given as setting `key`.

    The rows are the lazy index of the whole manifest (`ManifestIndex.with_seconds`): when there are problems the
    run is refused, so no caller trains on a manifest with rows left out. One row per checking process is held at a
    time."""
    path = manifest_path(spec)
    if path.is_dir():
        inside = path / "manifest.jsonl"
        hint = f": pass {key}={inside}" if inside.is_file() else ""
        if not hint and any(path.glob("shard-*.tar*")):
            hint = " (its shards have no shards.json: the voxtral-prep shards run that wrote them did not finish; write it again)"
        return None, [f"{key}={spec} is a folder, not a JSONL manifest{hint}"], []
    if not path.is_file():
        return None, [f"{key}={spec}: no such file (voxtral-prep writes one: voxtral-prep folder CLIPS/ --out DIR "
                      f"makes DIR/manifest.jsonl)"], []
    index = ManifestIndex(path)
    checked = _check_all(index, data.max_seconds)
    malformed, unreadable, outside, untimed, uncuttable = checked.problems
    n_good, n_items, n_cut, longest = checked.n_good, checked.n_items, checked.n_cut, checked.longest
    if len(index) == 0:
        return None, [f"{key}={spec} has no rows (if voxtral-prep wrote it, its rejects.jsonl says why each row was "
                      "rejected)"], []
    kinds = [p for p in (malformed, unreadable, outside, untimed, uncuttable) if p.count]
    problems = [f"{key}={spec}: {p.describe(len(index))}" for p in kinds]
    if kinds and kinds != [uncuttable]:
        problems.append(_prep_fix(key, path, untimed=bool(untimed.count),
                                  bad=bool(malformed.count or unreadable.count or outside.count)))
    if kinds and not n_good:
        problems.insert(0, f"none of the {len(index)} rows of {key}={spec} can be trained on")
    problems += _budget_problems(longest, data)
    notes = [f"{key}: {n_cut} rows longer than data.max_seconds={data.max_seconds:g} are cut at word boundaries "
             f"({n_items} items in all)"] if n_cut else []
    return index.with_seconds(checked.seconds), problems, notes


def check_shards(key: str, spec: str, data: DataSettings) -> tuple[ShardIndex | None, list[str], list[str]]:
    """(the shard corpus's verified index, problems, notes) of `spec` given as setting `key`. Reads the index, stats
    the local shards and fetches the first sample of the first shard (a wrong data.shard_url fails here, not after
    an epoch of unreadable shards): every row was checked and timed when the corpus was written, and its length is
    in the index, so nothing else is opened (what makes a 5 M-row corpus start in seconds)."""
    try:
        index = ShardIndex.open(spec, data.shard_url)
    except ShardError as err:
        return None, [f"{key}={spec}: {err}"], []
    problems = []
    if not len(index):
        problems.append(f"{key}={spec} has no rows (its rejects.jsonl says why each was left out)")
    missing = index.missing_shards()
    if missing:
        named = "; ".join(missing[:EXAMPLES]) + ("; ..." if len(missing) > EXAMPLES else "")
        problems.append(f"{key}={spec}: {len(missing)} of {len(index.names)} shards are missing or not the size the "
                        f"index says: {named} (copy them again, or set data.shard_url to where they are)")
    elif len(index.names) and (unreadable := probe_shard(index, 0)):
        problems.append(f"{key}={spec}: {unreadable} (check data.shard_url, and that this machine can read it)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if len(index.names) < world:
        problems.append(f"{key}={spec} has {len(index.names)} shards for {world} processes: each process reads its "
                        "own shards; write the corpus with smaller shards (voxtral-prep shards --shard-mb)")
    if data.stream_seconds is not None:
        problems.append(f"data.stream_seconds={data.stream_seconds:g}: streams are packed from a JSONL manifest; a "
                        "shard corpus trains one row per item (unset data.stream_seconds, or train on the manifest)")
    if not data.pcm16:
        problems.append("data.pcm16=false: a shard corpus holds its audio as 16-bit PCM (what serving feeds the "
                        "model); train on the manifest to use the float samples")
    if len(index):
        row = int(np.argmax(index.samples))
        seconds = float(index.seconds[row])
        if seconds > data.max_seconds:
            problems.append(f"{key}={spec}: row {row:010d} lasts {seconds:.1f} s > data.max_seconds="
                            f"{data.max_seconds:g} (the corpus was written with a larger --max-seconds): raise "
                            f"data.max_seconds to {math.ceil(seconds)}, or write the shards again")
        problems += _budget_problems((seconds, f"row {row:010d}"), data)
    where = f", read from {data.shard_url}" if data.shard_url else ""
    notes = [f"{key}: {len(index)} rows ({float(index.seconds.sum()) / 3600:.1f} h) in {len(index.names)} shards"
             f"{where}, streamed in windows of {data.shards_per_window} shards"]
    return index, problems, notes


PARALLEL_ROWS = 50_000  # manifests this long are checked in chunks on all cores (parsing + headers: ~50 us a row)


@dataclass
class _Checked:
    """What the check of a run of rows found; runs of consecutive rows merge in order (`merge`)."""

    seconds: np.ndarray  # per row, NaN where the row cannot train
    problems: tuple[_Problems, ...]  # malformed, unreadable, outside, untimed, uncuttable
    n_good: int = 0
    n_items: int = 0
    n_cut: int = 0
    longest: tuple[float, str] | None = None  # of the training items (rows, or their segments)

    @classmethod
    def merged(cls, parts: list["_Checked"]) -> "_Checked":
        """The check of all the parts' rows, in order: counts added, the first examples kept, the first longest."""
        first = parts[0]
        for later in parts[1:]:
            for mine, theirs in zip(first.problems, later.problems):
                mine.count += theirs.count
                mine.examples = (mine.examples + theirs.examples)[:EXAMPLES]
        longest = None
        for part in parts:
            if part.longest is not None and (longest is None or part.longest[0] > longest[0]):
                longest = part.longest
        return cls(np.concatenate([part.seconds for part in parts]), first.problems,
                   sum(p.n_good for p in parts), sum(p.n_items for p in parts), sum(p.n_cut for p in parts), longest)


def _check_rows(index: ManifestIndex, first: int, stop: int, max_seconds: float) -> _Checked:
    """Rows [first, stop) of `index`: parsed, their audio headers read (nothing decoded), their items made."""
    malformed = _Problems("are not manifest rows")
    unreadable = _Problems("have audio that cannot be read")
    outside = _Problems("name a segment outside their audio file")
    untimed = _Problems("have no word timings (the targets need them)")
    uncuttable = _Problems(f"are longer than data.max_seconds={max_seconds:g} and cannot be cut at word "
                           "boundaries (raise data.max_seconds, or cut those recordings)")
    checked = _Checked(np.full(stop - first, np.nan), (malformed, unreadable, outside, untimed, uncuttable))
    headers = _Headers()
    for i in range(first, stop):
        try:
            utt = index[i]
        except ManifestError as err:
            malformed.add(f"line {index.line_number(i)}: " + str(err).removeprefix(f"{index.where(i)}: "))
            continue
        name = f"line {index.line_number(i)} ({utt.id})"
        header = headers(utt.audio)
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
        checked.seconds[i - first], checked.n_good = seconds, checked.n_good + 1
        items, cut = _items(dataclasses.replace(utt, duration=seconds), max_seconds, uncuttable)
        checked.n_items, checked.n_cut = checked.n_items + len(items), checked.n_cut + cut
        for item in items:
            if checked.longest is None or item.duration > checked.longest[0]:
                checked.longest = (item.duration, item.id)
    return checked


_FORKED: ManifestIndex | None = None  # the index a forked checking process inherited (`_check_all`)


def _inherit(index: ManifestIndex) -> None:
    global _FORKED
    _FORKED = index


def _check_chunk(first: int, stop: int, max_seconds: float) -> _Checked:
    return _check_rows(_FORKED, first, stop, max_seconds)


def _check_all(index: ManifestIndex, max_seconds: float) -> _Checked:
    """Every row of `index`; when there are many, in chunks on this process's share of the cores. The checking
    processes are forked with the index (its mapping and arrays inherited, never pickled); a chunk sends back its
    result only: NaN-or-seconds per row, counts, a few examples."""
    processes = cores_per_process()
    if len(index) < PARALLEL_ROWS or processes == 1:
        return _check_rows(index, 0, len(index), max_seconds)
    bounds = np.linspace(0, len(index), 4 * processes + 1).astype(int).tolist()  # a few chunks per process
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"), initializer=_inherit,
                             initargs=(index,)) as pool:
        return _Checked.merged(list(pool.map(_check_chunk, bounds[:-1], bounds[1:],
                                             [max_seconds] * (len(bounds) - 1))))


def _items(utt: Utterance, max_seconds: float, uncuttable: _Problems) -> tuple[list[Utterance], bool]:
    """The training items a row becomes (StreamingDataset cuts long ones the same way; none if it cannot be cut),
    and whether it was cut."""
    if utt.words is None or utt.duration <= max_seconds:  # untimed rows are already a problem of their own
        return [utt], False
    try:
        return segment_utterance(utt, max_seconds), True
    except ValueError as err:
        uncuttable.add(str(err))
        return [], False


def _budget_problems(longest: tuple[float, str] | None, data: DataSettings) -> list[str]:
    """The longest item (seconds, id) must fit one micro-batch at the largest delay it can draw."""
    if longest is None:
        return []
    seconds, uid = longest
    max_delay_ms = max(data.delays_ms)
    positions = protocol.n_total_positions(math.ceil(seconds * protocol.SAMPLE_RATE),
                                           protocol.delay_ms_to_tokens(max_delay_ms))
    if positions <= data.max_positions_per_batch:
        return []
    return [f"data.max_positions_per_batch={data.max_positions_per_batch}: the longest item ({uid}, "
            f"{seconds:.1f} s) needs {positions} positions at the largest delay ({max_delay_ms} ms): raise "
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
    sharded = is_shard_folder(data.train_manifest)
    train, problems, notes = (check_shards if sharded else check_manifest)("data.train_manifest",
                                                                          data.train_manifest, data)
    if sharded and data.final_eval_split == "train":
        problems.append("data.final_eval_split=train decodes the training manifest's clips, which a shard folder "
                        "does not hold as files: set data.final_eval_split=eval (or none)")
    held_out = None
    if data.eval_manifest is not None and is_shard_folder(data.eval_manifest):
        problems.append(f"data.eval_manifest={data.eval_manifest} is a shard folder: held-out decoding reads a JSONL "
                        "manifest (its clips by index); pass the manifest the shards were written from")
    elif data.eval_manifest is not None:
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


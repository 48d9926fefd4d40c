"""A manifest too large to hold as Python objects: the JSONL file memory-mapped, a few numpy numbers per row.

`read_manifest` costs ≈ 4 KB of Python heap per row (an `Utterance`, its `Word`s, their strings): 22 GB for the
5 M rows of 10,000 hours, in every rank. `ManifestIndex` keeps, per row, where its line starts and how long it is
(int64 + int32), its line number only when blank lines make it differ from the row number, and its seconds
(float64, for batching): 20 bytes. A row becomes an `Utterance` when it is read (`index[i]`, parsed by
`utterance_from_json`: the same errors, naming the same `file:line`), and is garbage again when the caller drops it.

The seconds of every row (`known_seconds`: `duration`, else `end - offset`, NaN when the row has neither) are what
batching needs before any row is read, so the index finds them without `json.loads` per row (≈ 15 us each, 75 s for
5 M rows): numpy marks, per chunk of lines, the bytes at the top level of each row's object (brackets counted outside
strings), and one regular expression reads the `"duration"`, `"offset"` and `"end"` keys found there — never the
`"end"` of a word inside `words`. A row the byte scan cannot vouch for (an escaped quote, an escaped key, an odd
quote or bracket count, a value that is not a plain number or null, a repeated key) has its seconds from
`json.loads` + `utterance_from_json` instead; tests/test_manifest_index.py compares both with `read_manifest`.

DataLoader workers share it without copies: forked, they read the same file-backed pages and numpy buffers (nothing
writes to them, so copy-on-write never copies); pickled (spawn), the state is the path and the arrays, and the
worker maps the file again, refusing a file that changed since it was indexed. Nothing is pickled to disk.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence, overload

import numpy as np

from voxtral_train.manifest import ManifestError, Utterance, known_seconds, manifest_path, utterance_from_json

CHUNK_BYTES = 8 << 20  # lines scanned together: ~100 MB of numpy temporaries at most
_QUOTE, _BACKSLASH, _NEWLINE = ord('"'), ord("\\"), ord("\n")
_BRACKET = np.zeros(256, np.int8)  # +1 opens, -1 closes a container
_BRACKET[[ord("{"), ord("[")]], _BRACKET[[ord("}"), ord("]")]] = 1, -1
_WHITESPACE_OR_MULTIBYTE = np.zeros(256, bool)  # a line starting with one of these may be blank (`line.strip()`)
_WHITESPACE_OR_MULTIBYTE[[ord(c) for c in " \t\r\x0b\x0c\x1c\x1d\x1e\x1f"]] = True
_WHITESPACE_OR_MULTIBYTE[0x80:] = True
_SECONDS_KEYS = (b"duration", b"offset", b"end")
# A top-level key and its value: a JSON number or null, else nothing (the row is read by json.loads instead).
_KEY_VALUE = re.compile(rb'"(duration|offset|end)"\s*:\s*'
                        rb'(-?(?:0|[1-9][0-9]{0,300})(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?(?=[\s,}\]]|$)|null(?=[\s,}\]]|$))?')
_ESCAPED_KEY = re.compile(rb'\\[^"\n]*"\s*:')  # a backslash inside a top-level key: "\u0065nd" is "end"


class RowSequence(Sequence[Utterance]):
    """A read-only sequence of rows made on access: `_row(i)` for 0 <= i < len; slices give lists."""

    def _row(self, i: int) -> Utterance:
        raise NotImplementedError

    @overload
    def __getitem__(self, key: int) -> Utterance: ...

    @overload
    def __getitem__(self, key: slice) -> list[Utterance]: ...

    def __getitem__(self, key: int | slice) -> Utterance | list[Utterance]:
        if isinstance(key, slice):
            return [self._row(i) for i in range(*key.indices(len(self)))]
        i = int(key) + (len(self) if key < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"row {key} of {len(self)}")
        return self._row(i)

    def __iter__(self) -> Iterator[Utterance]:
        return (self._row(i) for i in range(len(self)))


@dataclasses.dataclass
class _Rows:
    """Where each row's line lies: start byte, length, line number (None: row i is line i + 1), seconds."""

    starts: np.ndarray
    lengths: np.ndarray
    linenos: np.ndarray | None
    seconds: np.ndarray


class ManifestIndex(RowSequence):
    """The rows of a JSONL manifest (a path or `bundled:train` / `bundled:eval`), parsed one at a time on access.

    `seconds[i]` is row i's `known_seconds` (NaN when the manifest does not say). `with_seconds(s)` is the same index
    whose rows carry `duration = s[i]` (the pre-flight check's durations, headers included).
    """

    def __init__(self, spec: str | os.PathLike) -> None:
        self.path = manifest_path(spec)
        self._fill_durations = False
        self._open(None)
        self._rows = _scan(self._buffer, self.path)

    def _open(self, expected: tuple[int, int] | None) -> None:
        """Map the file; `expected` (size, mtime_ns) refuses a file that changed since it was indexed."""
        with self.path.open("rb") as f:
            stat = os.fstat(f.fileno())
            self._stamp = (stat.st_size, stat.st_mtime_ns)
            if expected is not None and self._stamp != expected:
                raise ManifestError(f"{self.path}: changed since the run indexed it (size, mtime {expected} -> "
                                    f"{self._stamp}): do not rewrite a manifest a run is reading")
            self._buffer: mmap.mmap | bytes = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if stat.st_size \
                else b""

    @property
    def seconds(self) -> np.ndarray:
        return self._rows.seconds

    def with_seconds(self, seconds: np.ndarray) -> "ManifestIndex":
        """This index, its rows carrying `duration = seconds[i]` (shares the mapping and the offsets)."""
        seconds = np.asarray(seconds, dtype=np.float64)
        if seconds.shape != (len(self),):
            raise ValueError(f"need {len(self)} seconds, got shape {seconds.shape}")
        other = object.__new__(ManifestIndex)
        other.__dict__.update(self.__dict__)
        other._rows = dataclasses.replace(self._rows, seconds=seconds)
        other._fill_durations = True
        return other

    def __len__(self) -> int:
        return len(self._rows.starts)

    def line_number(self, i: int) -> int:
        return int(self._rows.linenos[i]) if self._rows.linenos is not None else i + 1

    def where(self, i: int) -> str:
        """`file:line` of row i, as errors name it."""
        return f"{self.path}:{self.line_number(i)}"

    def raw_line(self, i: int) -> bytes:
        start = int(self._rows.starts[i])
        return bytes(self._buffer[start: start + int(self._rows.lengths[i])])

    def _row(self, i: int) -> Utterance:
        utt = _parse(self.raw_line(i), self.path.parent, self.where(i))
        if self._fill_durations:
            utt.duration = float(self._rows.seconds[i])
        return utt

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_buffer"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open(state["_stamp"])


def _parse(line: bytes, base: Path, where: str) -> Utterance:
    """One line -> Utterance, with `read_manifest`'s messages."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ManifestError(f"{where}: not UTF-8 text ({err}): write the manifest as UTF-8") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{where}: invalid JSON ({err})") from None
    return utterance_from_json(obj, base, where)


def _scan(buffer: mmap.mmap | bytes, path: Path) -> _Rows:
    """Find every non-blank line and its seconds, chunk by chunk of whole lines, the chunks on all cores (numpy lets
    go of the GIL for its passes over the bytes)."""
    bounds, position, size = [], 0, len(buffer)
    while position < size:
        end = min(size, position + CHUNK_BYTES)
        if end < size:  # end the chunk after its last newline (or after the first one, for a line longer than it)
            newline = buffer.rfind(b"\n", position, end)
            newline = newline if newline != -1 else buffer.find(b"\n", end)
            end = size if newline == -1 else newline + 1
        bounds.append((position, end))
        position = end
    if not bounds:
        empty = np.zeros(0, np.int64)
        return _Rows(empty, empty.astype(np.int32), None, empty.astype(np.float64))
    with ThreadPoolExecutor(min(len(bounds), cores_per_process())) as pool:
        parts = list(pool.map(lambda bound: _scan_chunk(buffer, path, *bound), bounds))
    lines_before = np.cumsum([0] + [lines for *_, lines in parts[:-1]])  # line numbers continue across chunks
    starts, lengths, linenos, seconds = (np.concatenate(column) for column in zip(*[
        (starts, lengths, linenos + before, seconds) for (starts, lengths, linenos, seconds, _), before
        in zip(parts, lines_before.tolist())]))
    dense = bool(np.array_equal(linenos, np.arange(1, len(linenos) + 1)))
    return _Rows(starts.astype(np.int64), lengths.astype(np.int32), None if dense else linenos, seconds)


def cores_per_process() -> int:
    """This process's share of the cores: all it may run on, divided among the training processes of its node."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _scan_chunk(buffer: mmap.mmap | bytes, path: Path, position: int,
                end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(starts in the file, lengths, line numbers counted from the chunk's start, seconds, lines) of a chunk."""
    chunk = np.frombuffer(buffer, np.uint8, count=end - position, offset=position)
    starts, lengths, linenos = _lines(chunk, buffer, position, 0)
    lines = int(np.count_nonzero(chunk == _NEWLINE)) + int(chunk[-1] != _NEWLINE)
    seconds, unsure = _seconds(chunk, starts, lengths)
    for row in np.flatnonzero(unsure):  # the line number only names the row in a message json's path swallows
        seconds[row] = _seconds_by_json(buffer, position + int(starts[row]), int(lengths[row]), path,
                                        int(linenos[row]))
    return starts + position, lengths, linenos, seconds, lines


def _lines(chunk: np.ndarray, buffer: mmap.mmap | bytes, offset: int,
           lineno: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, length without the newline, line number) of each non-blank line of a chunk of whole lines."""
    newlines = np.flatnonzero(chunk == _NEWLINE)
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [len(chunk)]])
    if starts[-1] == len(chunk):  # the chunk ends with a newline: no line after it
        starts, ends = starts[:-1], ends[:-1]
    numbers = np.arange(lineno + 1, lineno + 1 + len(starts))
    keep = ends > starts
    maybe_blank = np.flatnonzero(keep & _WHITESPACE_OR_MULTIBYTE[chunk[np.minimum(starts, len(chunk) - 1)]])
    for i in maybe_blank:  # what read_manifest skips: `not line.strip()`
        text = bytes(buffer[offset + int(starts[i]): offset + int(ends[i])]).decode("utf-8", "replace")
        keep[i] = bool(text.strip())
    return starts[keep], (ends - starts)[keep], numbers[keep]


def _top_level(chunk: np.ndarray, starts: np.ndarray,
               lengths: np.ndarray) -> tuple[np.ndarray, "_Segments", np.ndarray]:
    """(the chunk's bytes at depth <= 1 of their row, where they were, rows the scan cannot vouch for).

    Depth counts the brackets outside strings from the row's start; a row with an escaped quote (strings cannot be
    told apart by counting quotes), an odd number of quotes or unbalanced brackets is not vouched for, and the
    depth is reset at its end so that the rows after it are read right."""
    ends = starts + lengths
    unsure = np.zeros(len(starts), bool)

    def row_of(positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(starts, positions, side="right") - 1

    quotes = np.flatnonzero(chunk == _QUOTE)
    backslashes = np.flatnonzero(chunk[:-1] == _BACKSLASH)
    unsure[row_of(backslashes[chunk[backslashes + 1] == _QUOTE])] = True
    quotes_before = np.searchsorted(quotes, starts)
    unsure |= ((np.searchsorted(quotes, ends) - quotes_before) & 1).astype(bool)
    candidates = np.flatnonzero((chunk & 0xD9) == 0x59)  # { } [ ] (and Y y _ DEL, dropped next): 3x faster
    codes = _BRACKET[chunk[candidates]]
    brackets, codes = candidates[codes != 0], codes[codes != 0]
    rows = row_of(brackets)
    outside = ((np.searchsorted(quotes, brackets) - quotes_before[rows]) & 1) == 0
    brackets, rows = brackets[outside], rows[outside]
    signs = codes[outside].astype(np.int32)
    balance = np.bincount(rows, weights=signs, minlength=len(starts)).astype(np.int32)
    unsure |= balance != 0
    # Depth is constant between events (a bracket, or a row's end resetting an unbalanced row): one segment each.
    # Segment k starts at events[k] (the first at 0) and has the depth after that event; depth 0 keeps rows apart.
    reset = np.flatnonzero(balance)
    events = np.concatenate([brackets, ends[reset]])  # `ends` is the newline (or the chunk's end): no bracket there
    changes = np.concatenate([signs, -balance[reset]])
    order = np.argsort(events, kind="stable")
    events, changes = events[order], changes[order]
    seg_starts = np.concatenate([[0], events])
    seg_lengths = np.diff(np.concatenate([seg_starts, [len(chunk)]]))
    keep = np.concatenate([[True], np.cumsum(changes, dtype=np.int32) <= 1]) & (seg_lengths > 0)
    flat = chunk[np.repeat(keep, seg_lengths)]
    kept_starts = seg_starts[keep]  # where each kept segment starts in the chunk, and in `flat`
    flat_starts = np.cumsum(seg_lengths[keep]) - seg_lengths[keep]
    return flat, _Segments(kept_starts, flat_starts), unsure


@dataclasses.dataclass
class _Segments:
    """Where the bytes of `flat` (the top-level bytes of a chunk, in order) came from."""

    chunk_starts: np.ndarray
    flat_starts: np.ndarray

    def in_chunk(self, flat_positions: np.ndarray) -> np.ndarray:
        k = np.searchsorted(self.flat_starts, flat_positions, side="right") - 1
        return self.chunk_starts[k] + (flat_positions - self.flat_starts[k])


def _seconds(chunk: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(`known_seconds` of each row from its top-level keys, NaN where they do not say; rows to read with json)."""
    flat, segments, unsure = _top_level(chunk, starts, lengths)
    escaped = [m.start() for m in _ESCAPED_KEY.finditer(flat)]
    unsure[np.searchsorted(starts, segments.in_chunk(np.asarray(escaped, np.int64)), side="right") - 1] = True
    values = np.full((len(_SECONDS_KEYS), len(starts)), np.nan)
    matches = [(m.start(), _SECONDS_KEYS.index(m[1]), m[2]) for m in _KEY_VALUE.finditer(flat)]
    if matches:
        positions, keys, raw = zip(*matches)
        rows = np.searchsorted(starts, segments.in_chunk(np.asarray(positions, np.int64)), side="right") - 1
        keys = np.asarray(keys)
        # No value: a string, a boolean, a container, NaN...: json.loads says what it is.
        unsure[rows[np.fromiter((v is None for v in raw), bool, len(raw))]] = True
        numbers = np.array([np.nan if v is None or v == b"null" else float(v) for v in raw], np.float64)
        for k in range(len(_SECONDS_KEYS)):
            mine = rows[keys == k]
            unsure[mine[1:][mine[1:] == mine[:-1]]] = True  # a repeated key: json.loads keeps the last
            values[k, mine] = numbers[keys == k]
    duration, offset, end = values
    return np.where(np.isnan(duration), end - np.where(np.isnan(offset), 0.0, offset), duration), unsure


def _seconds_by_json(buffer: mmap.mmap | bytes, start: int, length: int, path: Path, lineno: int) -> float:
    """A row's seconds the slow, certain way; NaN for a row that does not parse (reading it will say why)."""
    try:
        seconds = known_seconds(_parse(bytes(buffer[start: start + length]), path.parent, f"{path}:{lineno}"))
    except ValueError:  # ManifestError, and utterance_from_json's own checks
        return np.nan
    return np.nan if seconds is None else seconds

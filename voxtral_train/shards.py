"""A corpus as WebDataset tar shards: training data read in order, from local disk or object storage.

`voxtral-prep shards MANIFEST --out DIR` writes `DIR/shard-000000.tar`, ... and `DIR/shards.json`. Each sample of a
shard is two tar members named by the row's number in the corpus (`<key>` = ten digits):
  - `<key>.json`: the manifest row (id, text, words, language, extra keys), `duration` = its samples / 16 kHz;
  - `<key>.flac`: its audio, 16 kHz mono 16-bit PCM: what `load_audio` gives the trainer from the manifest (resampled,
    quantised as serving does), so an item made from a shard equals the one made from the manifest bit for bit.
Rows are written in a seeded random order, so every shard is a random sample of the corpus: the trainer mixes rows
only within a window of a few shards (`shard_stream`), and shuffles the shards themselves every epoch.

`shards.json` (written last: a folder without it is not a finished corpus) lists each shard's name, rows and bytes,
and points to `samples.i64`: every row's sample count (little-endian int64, 8 bytes per row, its sha256 in the
index, checked on open). That is all the trainer needs to plan an epoch's batches without opening a shard, and all
the pre-flight check reads: no audio header per row.

The shards are plain tar files (`tar tf` lists them), opened with webdataset's `gopen`: a shard's URL is a local
path, or `http(s)://...` (curl), `gs://...` (gsutil), `pipe:COMMAND` whose standard output is the shard
(`pipe:aws s3 cp s3://bucket/corpus/{name} -`). `data.shard_url` is that template, `{name}` a shard's file name;
the index itself is read from local disk.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import soundfile as sf

from voxtral_train import protocol
from voxtral_train.audio import AudioError, load_audio
from voxtral_train.manifest import Utterance

INDEX_NAME = "shards.json"
SAMPLES_NAME = "samples.i64"
FORMAT, VERSION = "voxtral-shards", 1
DEFAULT_SHARD_BYTES = 128 << 20  # ~1 h of speech per shard as FLAC: a few seconds to fetch, bucketing has ~600 rows


class ShardError(ValueError):
    """A shard folder or shard that cannot be read as written; the message names it and the fix."""


def is_shard_folder(spec: str | os.PathLike) -> bool:
    """Whether `spec` names a shard corpus: its folder or its `shards.json`."""
    path = Path(spec)
    return path.name == INDEX_NAME or (path / INDEX_NAME).is_file()


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ShardsWritten:
    index: Path
    rows: int
    shards: int
    seconds: float
    rejects: list[dict[str, str]]  # rows whose audio did not decode: {"id", "reason", "message"}


def flac_bytes(samples: np.ndarray) -> bytes:
    """16 kHz float32 samples that are already 16-bit PCM values (k / 32768) -> FLAC bytes holding exactly them."""
    pcm = np.round(samples * 32768.0).astype(np.int16)
    buffer = io.BytesIO()
    sf.write(buffer, pcm, protocol.SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def decode_flac(data: bytes, where: str) -> np.ndarray:
    """A sample's audio as float32 k / 32768, or AudioError naming the sample."""
    try:
        samples, sr = sf.read(io.BytesIO(data), dtype="float32")
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError("unreadable_audio", f"{where}: {err}") from None
    if sr != protocol.SAMPLE_RATE or samples.ndim != 1 or not len(samples):
        raise AudioError("unreadable_audio", f"{where}: expected 16 kHz mono samples, got {sr} Hz, {samples.shape}")
    return samples


def sample_row(utt: Utterance, key: str, n_samples: int) -> dict[str, Any]:
    """The JSON row of a shard sample: the manifest row without its file, segment or rounding (exact floats)."""
    row: dict[str, Any] = {"id": utt.id, "audio": f"{key}.flac", "text": utt.text,
                           "duration": n_samples / protocol.SAMPLE_RATE}
    if utt.language is not None:
        row["language"] = utt.language
    if utt.words is not None:
        row["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in utt.words]
    if utt.timing_source is not None:
        row["timing_source"] = utt.timing_source
    return {**utt.extra, **row}


def _encoded(utt: Utterance) -> tuple[int, bytes] | dict[str, str]:
    """A row's audio as the trainer reads it (16 kHz, 16-bit PCM), FLAC-encoded, or why it does not decode (a
    reject row: it crosses from a worker process as plain data)."""
    try:
        audio = load_audio(utt.audio, utt.offset, utt.end, pcm16=True)
    except AudioError as err:
        return {"id": utt.id, "reason": err.reason, "message": err.message}
    return len(audio), flac_bytes(audio)


WRITE_BATCH = 1024  # rows handed to the encoding processes at a time: memory stays bounded on millions of rows


def _encode_in_order(rows: Sequence[Utterance], order: Sequence[int],
                     pool: ProcessPoolExecutor | None) -> Iterator[tuple[int, tuple[int, bytes] | dict[str, str]]]:
    """(row, `_encoded(rows[row])`) in `order`, WRITE_BATCH rows in flight at most (`Executor.map` alone would
    make every row and queue every result before the first is written)."""
    for first in range(0, len(order), WRITE_BATCH):
        batch = order[first: first + WRITE_BATCH]
        utterances = [rows[i] for i in batch]
        yield from zip(batch, pool.map(_encoded, utterances, chunksize=16) if pool else map(_encoded, utterances))


def write_shards(rows: Sequence[Utterance], out: Path, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 seed: int | None = 0, workers: int = 1) -> ShardsWritten:
    """Write `rows` (training items: timed, at most the trainer's max_seconds) as shards in `out`, which must not
    exist yet or be empty. `seed` shuffles the rows (None keeps their order); `workers` processes decode and encode
    the audio, the shards are written in order by this one. A row whose audio does not decode is left out and
    listed in `rejects`. Every shard is written under a temporary name and renamed when complete; the index comes
    last. The same rows with the same seed give the same bytes, whatever `workers`."""
    import webdataset

    if out.exists() and any(out.iterdir()):
        raise ShardError(f"{out} exists and is not empty: write shards into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    order = range(len(rows)) if seed is None else np.random.default_rng(seed).permutation(len(rows)).tolist()
    shards: list[dict[str, Any]] = []
    samples: list[int] = []
    rejects: list[dict[str, str]] = []
    file = writer = None

    def close() -> None:
        writer.close()  # closes `file` too
        tmp = out / (shards[-1]["name"] + ".tmp")
        shards[-1]["bytes"] = tmp.stat().st_size
        tmp.replace(out / shards[-1]["name"])

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) if workers > 1 else None
    try:
        for i, result in _encode_in_order(rows, order, pool):
            if isinstance(result, dict):
                rejects.append(result)
                continue
            if writer is None or file.tell() >= shard_bytes:
                if writer is not None:
                    close()
                shards.append({"name": f"shard-{len(shards):06d}.tar", "rows": 0})
                file = (out / (shards[-1]["name"] + ".tmp")).open("wb")
                writer = webdataset.TarWriter(file, encoder=False, mtime=0)  # mtime 0: same rows, same bytes
            n_samples, flac = result
            key = f"{len(samples):010d}"
            writer.write({"__key__": key, "json": json.dumps(sample_row(rows[i], key, n_samples)).encode(),
                          "flac": flac})
            samples.append(n_samples)
            shards[-1]["rows"] += 1
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    if writer is not None:
        close()
    counts = np.asarray(samples, dtype=np.int64)
    index = write_index(out, shards, counts, seed)
    return ShardsWritten(index, len(samples), len(shards), float(counts.sum()) / protocol.SAMPLE_RATE, rejects)


def write_index(out: Path, shards: list[dict[str, Any]], samples: np.ndarray, seed: int | None) -> Path:
    """`samples.i64` (every row's samples) and, last, `shards.json` (`shards`: name, rows, bytes of each) in `out`."""
    raw = np.asarray(samples, dtype="<i8").tobytes()
    (out / SAMPLES_NAME).write_bytes(raw)
    index = {"format": FORMAT, "version": VERSION, "sample_rate": protocol.SAMPLE_RATE, "pcm16": True,
             "rows": len(samples), "seed": seed, "samples": SAMPLES_NAME,
             "samples_sha256": hashlib.sha256(raw).hexdigest(), "shards": shards}
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    return tmp.replace(out / INDEX_NAME)


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardIndex:
    """A shard corpus's index: per shard its name, rows and bytes; per row its sample count (`samples`)."""

    folder: Path
    names: tuple[str, ...]
    rows: np.ndarray  # [shards] rows per shard, in key order
    sizes: np.ndarray  # [shards] bytes per shard
    samples: np.ndarray  # [rows] int64 samples of each row at 16 kHz
    url_template: str | None = None  # data.shard_url; None = the shards beside the index

    @classmethod
    def open(cls, spec: str | os.PathLike, url_template: str | None = None) -> "ShardIndex":
        """Read and verify `shards.json` (a folder or the file itself) and its per-row sample counts."""
        path = Path(spec)
        path = path if path.name == INDEX_NAME else path / INDEX_NAME
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            if index.get("format") != FORMAT or index.get("version") != VERSION:
                raise ShardError(f"{path}: not a {FORMAT} v{VERSION} index (format {index.get('format')!r}, "
                                 f"version {index.get('version')!r}): write it with voxtral-prep shards")
            raw = (path.parent / index["samples"]).read_bytes()
            names = tuple(str(s["name"]) for s in index["shards"])
            rows = np.asarray([int(s["rows"]) for s in index["shards"]], dtype=np.int64)
            sizes = np.asarray([int(s["bytes"]) for s in index["shards"]], dtype=np.int64)
            expected_sha = index["samples_sha256"]
        except ShardError:
            raise
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                AttributeError) as err:
            raise ShardError(f"{path}: not a readable shard index ({type(err).__name__}: {err}): write the corpus "
                             "again with voxtral-prep shards") from None
        if hashlib.sha256(raw).hexdigest() != expected_sha or len(raw) != 8 * int(rows.sum()):
            raise ShardError(f"{path.parent / index['samples']}: does not match its index (sha256 or size: "
                             f"{len(raw)} bytes for {int(rows.sum())} rows): the folder is damaged or mixed with "
                             "another corpus; write it again with voxtral-prep shards")
        samples = np.frombuffer(raw, dtype="<i8").astype(np.int64)
        return cls(path.parent, names, rows, sizes, samples, url_template)

    def __len__(self) -> int:
        return len(self.samples)

    @functools.cached_property
    def first_rows(self) -> np.ndarray:
        """[shards] the key of each shard's first row."""
        return np.cumsum(self.rows) - self.rows

    @property
    def seconds(self) -> np.ndarray:
        return self.samples / protocol.SAMPLE_RATE

    def url(self, shard: int) -> str:
        name = self.names[shard]
        # replace, not str.format: a command's own braces (${BUCKET}, a JSON header) stay as they are
        return str(self.folder / name) if self.url_template is None else self.url_template.replace("{name}", name)

    def missing_shards(self) -> list[str]:
        """Local shards that are absent or not the size the index says (nothing to check behind a URL template)."""
        if self.url_template is not None:
            return []
        bad = []
        for name, size in zip(self.names, self.sizes.tolist()):
            path = self.folder / name
            actual = path.stat().st_size if path.is_file() else None
            if actual != size:
                bad.append(f"{name} ({'missing' if actual is None else f'{actual} bytes, the index says {size}'})")
        return bad


def probe_shard(index: ShardIndex, shard: int = 0) -> str | None:
    """Why `shard` cannot be read from its URL (its first sample is fetched and checked), or None."""
    try:
        next(read_shard(index, shard), None)
    except ShardError as err:
        return str(err)
    return None


def read_shard(index: ShardIndex, shard: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row key, sample {"json", "flac"}) of every sample of `shard`, in order, streamed from its URL. Raises
    ShardError naming the shard when it cannot be opened or read, or holds other rows than the index says."""
    from webdataset.tariterators import tarfile_samples

    url, first = index.url(shard), int(index.first_rows[shard])
    expected = first
    try:
        for sample in tarfile_samples([{"url": url}]):
            key = sample.get("__key__")
            if key != f"{expected:010d}" or "json" not in sample or "flac" not in sample:
                raise ShardError(f"shard {url}: expected sample {expected:010d} (.json + .flac), found {key!r} "
                                 f"with {sorted(k for k in sample if not k.startswith('__'))}")
            yield expected, sample
            expected += 1
    except ShardError:
        raise
    except (OSError, EOFError, tarfile.TarError, ValueError) as err:  # gopen, a pipe's exit status, a cut tar
        reason = err.args[0] if err.args and isinstance(err.args[0], str) else err  # an errno alone says little
        raise ShardError(f"shard {url} could not be read ({type(err).__name__}: {reason})") from None
    if expected != first + int(index.rows[shard]):
        raise ShardError(f"shard {url}: {expected - first} samples, the index says {int(index.rows[shard])}")

"""From manifest rows to model inputs: the dataset and its collate.

The DataLoader side never needs the model: each item is a dict of CPU tensors made from the audio file, its word
timings and a delay drawn for (seed, epoch, index); `collate` pads to the longest item.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from voxtral_train import protocol
from voxtral_train.audio import AudioError, load_audio
from voxtral_train.delays import DelaySampler
from voxtral_train.features import log_mel, pad_audio, pad_features
from voxtral_train.manifest import Utterance, Word, segment_utterance, utterance_seconds
from voxtral_train.manifest_index import ManifestIndex, RowSequence
from voxtral_train.protocol import IGNORE_INDEX
from voxtral_train.targets import Anchor, build_targets
from voxtral_train.tokenizer import StreamingTokenizer

# The tokenizer refuses any vocabulary whose [STREAMING_PAD] differs from this id, so collate may rely on it.
STREAMING_PAD_ID = protocol.EXPECTED_SPECIAL_IDS["[STREAMING_PAD]"]


class StreamingDataset(Dataset):
    """Manifest rows -> model inputs and shifted labels, one delay per item drawn from `delay_sampler`.

    Call `set_epoch(e)` each epoch to draw new delays, or index with `(epoch, index)` (`LengthBucketSampler`
    with `tag_epoch=True`): persistent DataLoader workers hold a copy of the dataset that never sees `set_epoch`.
    With `stream_seconds`, an item is a stream of consecutive utterances of one speaker (`streams`), one prompt and
    one EOS for all of them instead of one each (49 pad positions per 6 s clip at 480 ms otherwise).
    With `trim_after_eos` (the default) an item ends where its EOS would be: the positions from there on are never
    scored and, the model being causal, change nothing before them, so they are cut after the log-mel is computed
    (the log-mel's centred STFT at the cut reads the same samples as untrimmed) and cost nothing.
    Audio is quantised to 16-bit PCM as serving does, unless `pcm16` is false. An item whose audio no longer reads
    (the file changed after the pre-flight check) comes back as `{"id", "skipped": why}`: `collate` leaves it out
    and the trainer logs and counts it.
    `utterances` is any sequence of rows, and is not copied: the trainer passes the pre-flight's `ManifestIndex`,
    so a row is parsed when its item is made and lengths come from numpy arrays (8 bytes per item and epoch).
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        tokenizer: StreamingTokenizer,
        delay_sampler: DelaySampler,
        anchor: Anchor = "end",
        max_seconds: float | None = None,
        seed: int = 0,
        offset_frames: int = 0,
        pcm16: bool = True,
        trim_after_eos: bool = True,
        stream_seconds: float | None = None,
    ) -> None:
        self._seconds: np.ndarray | None = None  # per utterance, once known
        if max_seconds is not None:
            utterances = SegmentedRows(utterances, row_seconds(utterances), max_seconds)
            self._seconds = utterances.seconds
        self.utterances = utterances  # not copied: a ManifestIndex stays a few numbers per row
        # Item i is the utterances bounds[i] .. bounds[i + 1] - 1, played back to back (one each without streams).
        self._bounds = None if stream_seconds is None else np.cumsum(
            [0] + [len(stream) for stream in streams(self.utterances, stream_seconds)])
        self.tokenizer = tokenizer
        self.delay_sampler = delay_sampler
        self.anchor: Anchor = anchor
        self.offset_frames = offset_frames
        self.seed = seed
        self.pcm16 = pcm16
        self.trim_after_eos = trim_after_eos
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.utterances) if self._bounds is None else len(self._bounds) - 1

    def _members(self, index: int) -> range:
        return range(index, index + 1) if self._bounds is None else range(self._bounds[index], self._bounds[index + 1])

    @functools.cached_property
    def _n_samples(self) -> np.ndarray:
        """Audio samples of each item, from durations (read on first use: the headers of rows that lack one)."""
        seconds = self._seconds if self._seconds is not None else row_seconds(self.utterances)
        samples = np.ceil(seconds * protocol.SAMPLE_RATE).astype(np.int64)  # what math.ceil gives, per utterance
        return samples if self._bounds is None else np.add.reduceat(samples, self._bounds[:-1])

    def lengths_in_positions(self, epoch: int | None = None) -> np.ndarray:
        """Positions of each item from durations only (no audio decoding), for batching: at the delay each item
        draws in `epoch` (what its batch will hold), or at the largest delay when `epoch` is None (an upper bound).

        An item whose last words are too late for the standard right pad grows a few positions beyond this
        (targets.build_targets); that is rare and only overshoots a batch budget slightly. Trimmed after EOS, an
        item is 1 to RIGHT_PAD_BUFFER_TOKENS positions shorter than this (its last word's pieces push EOS right):
        the untrimmed length stays the bound, so a batch never exceeds its budget.
        """
        n = self._n_samples
        delays = np.full(len(n), self.delay_sampler.max_tokens) if epoch is None else \
            self.delay_sampler.draws(self.seed, epoch, np.arange(len(n)))
        return protocol.n_total_positions(n, delays)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Item `key` at the delay it draws in `self.epoch`, or `key = (epoch, index)` at that epoch's delay."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        clips = []
        for utt in (self.utterances[u] for u in self._members(index)):  # each row parsed once (a ManifestIndex)
            if utt.words is None:
                raise ValueError(f"utterance {utt.id} ({utt.audio}) has no word timings: run data_prep to assign them")
            try:
                clips.append((utt, load_audio(utt.audio, utt.offset, utt.end, pcm16=self.pcm16)))
            except AudioError as err:
                return {"id": utt.id, "skipped": err.message}
        return make_item(clips, self.delay_sampler.draw(self.seed, epoch, index), self.tokenizer, self.anchor,
                         self.offset_frames, self.trim_after_eos)


def make_item(clips: Sequence[tuple[Utterance, np.ndarray]], delay: int, tokenizer: StreamingTokenizer,
              anchor: Anchor = "end", offset_frames: int = 0, trim_after_eos: bool = True) -> dict[str, Any]:
    """One training item: the clips' 16 kHz samples played back to back (one clip, or a stream of them), their words
    at their time in the stream, at `delay` tokens. Manifest rows (`StreamingDataset`) and shard samples
    (`shard_stream`) both become items here, so the two forms of a corpus give the same tensors."""
    words, start = [], 0
    for utt, samples in clips:
        words += [Word(w.word, w.start + start / protocol.SAMPLE_RATE, w.end + start / protocol.SAMPLE_RATE)
                  for w in utt.words]
        start += len(samples)
    samples = clips[0][1] if len(clips) == 1 else np.concatenate([s for _, s in clips])
    targets = build_targets(words, tokenizer, len(samples), delay, anchor, offset_frames)
    features = log_mel(pad_audio(samples, delay, targets.extra_right_pad))
    n = targets.eos_position if trim_after_eos else targets.n_positions  # labels are -100 from EOS on
    return {
        "input_features": features[:, : protocol.MEL_FRAMES_PER_POSITION * n],  # [128, 8 * P]
        "input_ids": torch.tensor(targets.input_ids[:n], dtype=torch.long),  # [P]
        "labels": torch.tensor(targets.labels[:n], dtype=torch.long),  # [P]
        "num_delay_tokens": torch.tensor(delay, dtype=torch.long),
        "n_positions": torch.tensor(n, dtype=torch.long),
        "audio_seconds": torch.tensor(len(samples) / protocol.SAMPLE_RATE, dtype=torch.float32),
        "id": "+".join(utt.id for utt, _ in clips),
    }


def row_seconds(rows: Sequence[Utterance]) -> np.ndarray:
    """`utterance_seconds` of every row: a ManifestIndex's own array, audio headers only for the rows it lacks."""
    if not isinstance(rows, ManifestIndex):
        return np.array([utterance_seconds(utt) for utt in rows], dtype=np.float64)
    missing = np.flatnonzero(np.isnan(rows.seconds))
    if not missing.size:
        return rows.seconds
    seconds = rows.seconds.copy()
    seconds[missing] = [utterance_seconds(rows[int(i)]) for i in missing]
    return seconds


class SegmentedRows(RowSequence):
    """`rows` with each row longer than `max_seconds` replaced by its segments (`segment_utterance`), every row
    carrying its seconds as `duration` (`seconds`, per row out).

    Only the segments are held as objects; the rows that need no cut are read from `rows` when asked for, so a lazy
    manifest stays lazy (voxtral-prep cuts long recordings already: few rows of a prepared corpus need it here).
    """

    def __init__(self, rows: Sequence[Utterance], seconds: np.ndarray, max_seconds: float) -> None:
        long = np.flatnonzero(seconds > max_seconds)
        pieces = [segment_utterance(dataclasses.replace(rows[int(j)], duration=float(seconds[j])), max_seconds)
                  for j in long]
        counts = np.ones(len(rows), np.int64)
        counts[long] = [len(p) for p in pieces]
        first = np.cumsum(counts) - counts  # the index of each row's first piece
        self._rows = rows
        self._row_of = None if not long.size else np.repeat(np.arange(len(rows)), counts)
        self.seconds = np.repeat(np.asarray(seconds, np.float64), counts)
        self._segments: dict[int, Utterance] = {}
        for j, segments in zip(long, pieces):
            for k, segment in enumerate(segments):
                self._segments[int(first[j]) + k] = segment
                self.seconds[first[j] + k] = segment.duration

    def __len__(self) -> int:
        return len(self.seconds)

    def _row(self, i: int) -> Utterance:
        if i in self._segments:
            return self._segments[i]
        row = self._rows[i if self._row_of is None else int(self._row_of[i])]
        return dataclasses.replace(row, duration=float(self.seconds[i]))


def stream_key(utt: Utterance) -> str | None:
    """Who speaks: the row's `speaker`, else its `source` (extra manifest keys); None when unknown."""
    return utt.extra.get("speaker", utt.extra.get("source"))


def streams(utterances: Sequence[Utterance], stream_seconds: float) -> list[list[int]]:
    """Indices of consecutive utterances packed greedily into streams of at most `stream_seconds` of audio; a stream
    holds one speaker (`stream_key`; unknown speakers pack with each other). An utterance longer than
    `stream_seconds` is a stream by itself."""
    out: list[list[int]] = []
    seconds, key = 0.0, None
    for i, utt in enumerate(utterances):
        length = utterance_seconds(utt)
        if out and stream_key(utt) == key and seconds + length <= stream_seconds:
            out[-1].append(i)
            seconds += length
        else:
            out.append([i])
            seconds, key = length, stream_key(utt)
    return out


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Right-pad items to the longest: features with the log-mel of silence, ids with [STREAMING_PAD], labels -100.
    Skipped items are left out and listed as `skipped` [(id, why)]; a batch that lost every item is only that list
    (and `ids` empty).

    No attention mask: the encoder and the decoder are both causal, so padding on the right never changes what an
    earlier (real) position computes, and the padded positions carry label -100.
    """
    skipped = [(item["id"], item["skipped"]) for item in items if "skipped" in item]
    items = [item for item in items if "skipped" not in item]
    if not items:
        return {"ids": [], "skipped": skipped}
    n_max = max(int(item["n_positions"]) for item in items)
    batch = len(items)
    input_ids = torch.full((batch, n_max), STREAMING_PAD_ID, dtype=torch.long)
    labels = torch.full((batch, n_max), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        n = int(item["n_positions"])
        input_ids[row, :n] = item["input_ids"]
        labels[row, :n] = item["labels"]
    return {
        "input_features": pad_features([item["input_features"] for item in items]),  # [B, 128, 8 * P_max]
        "input_ids": input_ids,  # [B, P_max]
        "labels": labels,  # [B, P_max]
        "num_delay_tokens": torch.stack([item["num_delay_tokens"] for item in items]),  # [B]
        "n_positions": torch.stack([item["n_positions"] for item in items]),  # [B]
        "audio_seconds": torch.stack([item["audio_seconds"] for item in items]),  # [B], real audio only
        "ids": [item["id"] for item in items],
        "skipped": skipped,
    }


def auto_num_workers(processes_on_node: int = 1, cores: int | None = None) -> int:
    """DataLoader workers for `data.num_workers: null`: the cores each training process has, minus the one it runs
    on, at most 4 (decode + log-mel of a batch is far cheaper than its step). Never more workers than cores, which
    is what PyTorch warns about."""
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(0, min(4, cores // max(1, processes_on_node) - 1))

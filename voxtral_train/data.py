"""From manifest rows to training batches: delays, long-recording segmentation, the dataset, collate, batching.

The DataLoader side never needs the model (STYLE.md 9): each item is a dict of CPU tensors made from the audio file,
its word timings and a delay drawn for (seed, epoch, index); `collate` pads to the longest item; and
`LengthBucketSampler` groups items of similar length so that little of a batch is padding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from voxtral_train import protocol
from voxtral_train.audio import audio_duration, load_audio
from voxtral_train.features import log_mel, pad_audio, pad_features
from voxtral_train.manifest import Utterance, Word
from voxtral_train.targets import IGNORE_INDEX, Anchor, build_targets
from voxtral_train.tokenizer import StreamingTokenizer

# The tokenizer refuses any vocabulary whose [STREAMING_PAD] differs from this id, so collate may rely on it.
STREAMING_PAD_ID = protocol.EXPECTED_SPECIAL_IDS["[STREAMING_PAD]"]


# ----------------------------------------------------------------------------------------------------------------
# Delays
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DelaySampler:
    """Which delay each training item gets: one value, a weighted set, or uniform over a range in 80 ms steps.

    One model serves every delay through its delay conditioning, so training usually mixes them. A draw depends only
    on (seed, epoch, index): reruns, resumed runs and any number of DataLoader workers see the same delays.
    """

    delays_ms: tuple[int, ...]
    weights: tuple[float, ...]  # same length as delays_ms, normalised to sum 1

    def __post_init__(self) -> None:
        if not self.delays_ms or len(self.weights) != len(self.delays_ms):
            raise ValueError(f"delay sampler needs one weight per delay, got {self.delays_ms} and {self.weights}")
        for ms in self.delays_ms:
            protocol.delay_ms_to_tokens(ms)  # raises for a delay off the 80 ms grid
        if min(self.weights) < 0 or not math.isclose(sum(self.weights), 1.0):
            raise ValueError(f"delay weights must be >= 0 and sum to 1, got {self.weights}")

    @classmethod
    def fixed(cls, delay_ms: int) -> "DelaySampler":
        return cls((int(delay_ms),), (1.0,))

    @classmethod
    def choices(cls, delays_ms: Sequence[int], weights: Sequence[float] | None = None) -> "DelaySampler":
        weights = [1.0] * len(delays_ms) if weights is None else [float(w) for w in weights]
        total = sum(weights)
        if total <= 0:
            raise ValueError(f"delay weights must have a positive sum, got {weights}")
        return cls(tuple(int(ms) for ms in delays_ms), tuple(w / total for w in weights))

    @classmethod
    def uniform(cls, min_ms: int, max_ms: int) -> "DelaySampler":
        """Every multiple of 80 ms in [min_ms, max_ms], equally likely."""
        lo, hi = protocol.delay_ms_to_tokens(min_ms), protocol.delay_ms_to_tokens(max_ms)
        if hi < lo:
            raise ValueError(f"delay range is empty: min_ms={min_ms} > max_ms={max_ms}")
        return cls.choices([protocol.delay_tokens_to_ms(t) for t in range(lo, hi + 1)])

    @classmethod
    def from_config(cls, cfg: int | Mapping[str, Any]) -> "DelaySampler":
        """480 | {fixed_ms: 480} | {choices_ms: [480, 960], weights: [3, 1]} | {min_ms: 240, max_ms: 2400}."""
        if isinstance(cfg, (int, float)) and not isinstance(cfg, bool):
            return cls.fixed(int(cfg))
        if not isinstance(cfg, Mapping):
            raise ValueError(f"delay config must be a number of ms or a mapping, got {cfg!r}")
        keys = set(cfg)
        if keys == {"fixed_ms"}:
            return cls.fixed(cfg["fixed_ms"])
        if keys in ({"choices_ms"}, {"choices_ms", "weights"}):
            return cls.choices(list(cfg["choices_ms"]), cfg.get("weights"))
        if keys == {"min_ms", "max_ms"}:
            return cls.uniform(cfg["min_ms"], cfg["max_ms"])
        raise ValueError(
            f"delay config keys {sorted(keys)} are not one of: fixed_ms | choices_ms (+ weights) | min_ms + max_ms"
        )

    @property
    def max_tokens(self) -> int:
        return max(protocol.delay_ms_to_tokens(ms) for ms in self.delays_ms)

    def draw(self, seed: int, epoch: int, index: int) -> int:
        """The delay in tokens of item `index` in `epoch`."""
        if len(self.delays_ms) == 1:
            return protocol.delay_ms_to_tokens(self.delays_ms[0])
        rng = np.random.default_rng([seed, epoch, index])
        return protocol.delay_ms_to_tokens(self.delays_ms[rng.choice(len(self.delays_ms), p=self.weights)])


# ----------------------------------------------------------------------------------------------------------------
# Long recordings
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Dataset and collate
# ----------------------------------------------------------------------------------------------------------------
class StreamingDataset(Dataset):
    """Manifest rows -> model inputs and shifted labels, one delay per item drawn from `delay_sampler`.

    Call `set_epoch(e)` each epoch to draw new delays (DataLoader workers pick it up when they are started for the
    epoch, i.e. without `persistent_workers`).
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
    ) -> None:
        if max_seconds is not None:
            utterances = [
                segment
                for utt in utterances
                for segment in segment_utterance(dataclasses.replace(utt, duration=utterance_seconds(utt)), max_seconds)
            ]
        self.utterances = list(utterances)
        self.tokenizer = tokenizer
        self.delay_sampler = delay_sampler
        self.anchor: Anchor = anchor
        self.offset_frames = offset_frames
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.utterances)

    @functools.cached_property
    def _n_samples(self) -> list[int]:
        return [math.ceil(utterance_seconds(u) * protocol.SAMPLE_RATE) for u in self.utterances]

    def lengths_in_positions(self, epoch: int | None = None) -> list[int]:
        """Positions of each item from durations only (no audio decoding), for batching: at the delay each item
        draws in `epoch` (what its batch will hold), or at the largest delay when `epoch` is None (an upper bound).

        An item whose last words are too late for the standard right pad grows a few positions beyond this
        (targets.build_targets); that is rare and only overshoots a batch budget slightly.
        """
        return [
            protocol.n_total_positions(
                n, self.delay_sampler.max_tokens if epoch is None else self.delay_sampler.draw(self.seed, epoch, i)
            )
            for i, n in enumerate(self._n_samples)
        ]

    def __getitem__(self, index: int) -> dict[str, Any]:
        utt = self.utterances[index]
        if utt.words is None:
            raise ValueError(f"utterance {utt.id} ({utt.audio}) has no word timings: run data_prep to assign them")
        samples = load_audio(utt.audio, utt.offset, utt.end)
        delay = self.delay_sampler.draw(self.seed, self.epoch, index)
        targets = build_targets(utt.words, self.tokenizer, len(samples), delay, self.anchor, self.offset_frames)
        features = log_mel(pad_audio(samples, delay, targets.extra_right_pad))
        return {
            "input_features": features,  # [128, 8 * P]
            "input_ids": torch.tensor(targets.input_ids, dtype=torch.long),  # [P]
            "labels": torch.tensor(targets.labels, dtype=torch.long),  # [P]
            "num_delay_tokens": torch.tensor(delay, dtype=torch.long),
            "n_positions": torch.tensor(targets.n_positions, dtype=torch.long),
            "audio_seconds": torch.tensor(len(samples) / protocol.SAMPLE_RATE, dtype=torch.float32),
            "id": utt.id,
        }


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Right-pad items to the longest: features with the log-mel of silence, ids with [STREAMING_PAD], labels -100.

    No attention mask: the encoder and the decoder are both causal, so padding on the right never changes what an
    earlier (real) position computes, and the padded positions carry label -100.
    """
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
    }


# ----------------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------------
class LengthBucketSampler(Sampler[list[int]]):
    """Batch sampler: batches of similar-length items, each holding at most `max_positions_per_batch` padded positions
    (batch size x longest item), shuffled per epoch, split disjointly and equally across `num_replicas` ranks.

    Bucketing sorts the (shuffled) items by length and packs them in that order, so a batch's items differ in length
    by a few positions at most. `bucketing=False` packs them in random order instead (the baseline it is measured
    against in benchmarks/padding_waste.py). Every epoch's batches depend only on (seed, epoch). Each rank gets the
    batches `rank, rank + num_replicas, ...` of the epoch's list; the remainder (< num_replicas batches) is dropped.
    Resume: `state_dict(consumed_batches)` / `load_state_dict(state)`, or `set_epoch(e)` then `skip_batches(n)`.

    `lengths_in_positions` is a list, or a function epoch -> list when lengths change per epoch (each item draws its
    delay per epoch: `StreamingDataset.lengths_in_positions`); bucketing by the drawn lengths keeps items with
    different delays out of one batch.
    """

    def __init__(
        self,
        lengths_in_positions: Sequence[int] | Callable[[int], Sequence[int]],
        max_positions_per_batch: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        bucketing: bool = True,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.max_positions = max_positions_per_batch
        self.seed, self.shuffle, self.bucketing = seed, shuffle, bucketing
        self.num_replicas, self.rank = num_replicas, rank
        fixed = lengths_in_positions
        self._lengths_of = lengths_in_positions if callable(lengths_in_positions) else lambda epoch: fixed
        self._cache: tuple[int, list[list[int]]] | None = None  # (epoch, its batches)
        self.epoch = 0
        self._skip = 0  # batches of the next iteration to skip (resume)
        self._yielded = 0  # batches handed out so far in this epoch
        self.n_items = len(self.lengths(0))  # also checks the budget now rather than at the first batch

    def lengths(self, epoch: int) -> np.ndarray:
        lengths = np.asarray(self._lengths_of(epoch), dtype=np.int64)
        too_long = np.flatnonzero(lengths > self.max_positions)
        if too_long.size:
            i = int(too_long[0])
            raise ValueError(
                f"{too_long.size} item(s) exceed max_positions_per_batch={self.max_positions} in epoch {epoch}, e.g. "
                f"item {i} with {lengths[i]} positions: raise the budget or cut recordings shorter (data max_seconds)"
            )
        return lengths

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of `epoch`, in the order they are served (before the split across ranks)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        lengths = self.lengths(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(lengths)) if self.shuffle else np.arange(len(lengths))
        if self.bucketing:  # stable sort: items of equal length keep their shuffled order
            order = order[np.argsort(lengths[order], kind="stable")]
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for index in order.tolist():
            longest_if_added = max(longest, int(lengths[index]))
            if current and (len(current) + 1) * longest_if_added > self.max_positions:
                batches.append(current)
                current, longest_if_added = [], int(lengths[index])
            current.append(index)
            longest = longest_if_added
        if current:
            batches.append(current)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def _rank_batches(self) -> list[list[int]]:
        batches = self.epoch_batches(self.epoch)
        per_rank = len(batches) // self.num_replicas
        if per_rank == 0:
            raise ValueError(f"epoch {self.epoch} has {len(batches)} batches, fewer than {self.num_replicas} ranks")
        return batches[: per_rank * self.num_replicas][self.rank :: self.num_replicas]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to serve; a pending skip survives only if the epoch does not change."""
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch
        self._yielded = 0

    def skip_batches(self, n: int) -> None:
        """Start the next iteration at this rank's batch `n` of the current epoch (the rest is unchanged)."""
        self._skip = n

    def state_dict(self, consumed_batches: int | None = None) -> dict[str, int]:
        """Where this rank stands. DataLoader prefetching makes the sampler run ahead of training, so pass the
        number of batches the training loop actually consumed in this epoch; without it, the count handed out."""
        done = self._yielded if consumed_batches is None else consumed_batches
        return {"epoch": self.epoch, "batches_done": done, "seed": self.seed, "num_replicas": self.num_replicas,
                "n_items": self.n_items, "max_positions_per_batch": self.max_positions}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue at the saved batch; refuses a state saved with another seed, data, budget or world size."""
        mine = self.state_dict()
        mismatched = [f"{k}: saved {state[k]}, now {mine[k]}" for k in
                      ("seed", "num_replicas", "n_items", "max_positions_per_batch") if state[k] != mine[k]]
        if mismatched:
            raise ValueError("cannot resume the batch order: " + "; ".join(mismatched))
        self.set_epoch(int(state["epoch"]))
        self.skip_batches(int(state["batches_done"]))

    def __len__(self) -> int:
        return len(self._rank_batches()) - self._skip

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        start, self._skip = self._skip, 0
        for position in range(start, len(batches)):
            self._yielded = position + 1
            yield batches[position]


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of a batch's positions (batch size x longest item, summed) that is padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / padded

"""Training batches streamed from a shard corpus (`shards`): each epoch planned from the index alone, served in order.

The plan of epoch e is numpy over the index's per-row sample counts and the delays each row draws for (seed, e, row):
1. the shards are shuffled (seed, e); each of the R ranks takes every R-th one, floor(S / R) shards each (the
   remainder sits this epoch out, other shards each epoch);
2. a rank's shards form windows of `shards_per_window`; a window's rows are shuffled, sorted by length and packed into
   micro-batches of at most `max_positions` padded positions (`pack_sorted`, what `LengthBucketSampler` does over a
   whole manifest), and the window's batches are shuffled;
3. DataLoader worker w of a rank reads the rank's windows w, w + W, ...; the DataLoader takes its workers' batches
   round-robin, and that interleaving is the rank's order. Every rank serves as many batches as the rank with the
   fewest (each step is a collective).
A worker reads each of its windows' shards once, in order, keeps the compressed samples its batches need, then makes
and collates the batches: its memory is one window of FLAC (2 x 128 MB by default).

Resume is exact: every batch carries its `position` in the rank's order (`micro_batches` checks it); a resumed
worker skips its batches before the saved position (it reads no shard of a window it has finished, and reads the
window it was in again), and the workers' parts are rotated so that the DataLoader's turn-taking, which starts at
worker 0, continues the unbroken order.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from voxtral_train import protocol
from voxtral_train.audio import AudioError
from voxtral_train.batching import pack_sorted
from voxtral_train.dataset import collate, make_item
from voxtral_train.delays import DelaySampler
from voxtral_train.manifest import ManifestError, utterance_from_json
from voxtral_train.shards import ShardError, ShardIndex, decode_flac, read_shard
from voxtral_train.targets import Anchor
from voxtral_train.tokenizer import StreamingTokenizer


@dataclass(frozen=True)
class RankPlan:
    """One rank's epoch: the windows it reads, each window's batches, and the order it serves them in."""

    windows: list[np.ndarray]  # shard numbers of each window
    batches: list[list[np.ndarray]]  # per window, its batches (row keys) in the order its worker serves them
    served: np.ndarray  # [n, 3] (worker, window, batch of that window), in the rank's order


def rank_windows(n_shards: int, seed: int, epoch: int, num_replicas: int, shards_per_window: int) -> list[list[np.ndarray]]:
    """Per rank, its windows of shard numbers in epoch `epoch` (steps 1 and 2 of the module doc)."""
    order = np.random.default_rng([seed, epoch]).permutation(n_shards)
    per_rank = n_shards // num_replicas
    return [[mine[a: a + shards_per_window] for a in range(0, per_rank, shards_per_window)]
            for mine in (order[r:: num_replicas][:per_rank] for r in range(num_replicas))]


def window_batches(rows: np.ndarray, lengths: np.ndarray, rng: np.random.Generator,
                   max_positions: int) -> list[np.ndarray]:
    """`rows` (keys) with `lengths` (positions) bucketed into micro-batches, the batches in random order."""
    order = rng.permutation(len(rows))
    order = order[np.argsort(lengths[order], kind="stable")]  # equal lengths keep their shuffled order
    bounds = np.concatenate([[0], np.cumsum(pack_sorted(lengths[order], max_positions))])
    batches = [rows[order[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]
    return [batches[i] for i in rng.permutation(len(batches))]


def round_robin(counts: list[int]) -> np.ndarray:
    """[n, 2] (worker, its k-th batch) in the order a DataLoader takes them from workers with `counts` batches each:
    one from each worker in turn, skipping the workers that have run out."""
    rounds = max(counts, default=0)
    workers, ks = np.tile(np.arange(len(counts)), rounds), np.repeat(np.arange(rounds), len(counts))
    keep = ks < np.asarray(counts)[workers]
    return np.stack([workers[keep], ks[keep]], axis=1)


def plan_epoch(index: ShardIndex, lengths: np.ndarray, seed: int, epoch: int, num_replicas: int, rank: int,
               num_workers: int, shards_per_window: int, max_positions: int) -> RankPlan:
    """The plan of `rank` in `epoch` (module doc); `lengths` are every row's positions at this epoch's delays."""
    too_long = np.flatnonzero(lengths > max_positions)
    if too_long.size:
        raise ValueError(f"{too_long.size} row(s) of {index.folder} exceed max_positions_per_batch={max_positions} "
                         f"in epoch {epoch}, e.g. row {int(too_long[0])} with {int(lengths[too_long[0]])} positions: "
                         "raise data.max_positions_per_batch")
    first, count = index.first_rows, index.rows
    per_rank = []
    for r, windows in enumerate(rank_windows(len(index.names), seed, epoch, num_replicas, shards_per_window)):
        batches = []
        for w, shards in enumerate(windows):
            rows = np.concatenate([np.arange(first[k], first[k] + count[k]) for k in shards])
            batches.append(window_batches(rows, lengths[rows], np.random.default_rng([seed, epoch, r, w]),
                                          max_positions))
        per_rank.append((windows, batches))
    steps = min(sum(len(b) for b in batches) for _, batches in per_rank)  # the same number on every rank
    windows, batches = per_rank[rank]
    workers = max(1, num_workers)
    mine = [list(range(worker, len(windows), workers)) for worker in range(workers)]  # each worker's windows
    sequences = [[(window, b) for window in ws for b in range(len(batches[window]))] for ws in mine]
    order = round_robin([len(s) for s in sequences])[:steps]
    served = np.array([(worker, *sequences[worker][k]) for worker, k in order.tolist()], dtype=np.int64)
    return RankPlan(windows, batches, served.reshape(-1, 3))


def as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate for a `ShardStream`: its workers yield collated batches already."""
    return batch


class ShardStream(IterableDataset):
    """The micro-batches of one rank over a shard corpus, collated in the DataLoader's workers.

    It is its own sampler for `micro_batches`: `set_epoch`, `skip_batches(n)` (resume), `len()` (batches left in the
    epoch), set in the main process before each epoch's iterator starts its (non-persistent) workers. The DataLoader
    must have `batch_size=None` and `num_workers` equal to this stream's (the plan depends on it).
    """

    def __init__(self, index: ShardIndex, tokenizer: StreamingTokenizer, delay_sampler: DelaySampler, *,
                 max_positions: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, num_workers: int = 0,
                 shards_per_window: int = 2, anchor: Anchor = "end", offset_frames: int = 0,
                 trim_after_eos: bool = True) -> None:
        if len(index.names) < num_replicas:
            raise ShardError(f"{index.folder} has {len(index.names)} shards for {num_replicas} processes: each "
                             "process reads its own shards; write the corpus with smaller shards "
                             "(voxtral-prep shards --shard-mb)")
        self.index, self.tokenizer, self.delay_sampler = index, tokenizer, delay_sampler
        self.max_positions, self.seed, self.num_replicas, self.rank = max_positions, seed, num_replicas, rank
        self.num_workers, self.shards_per_window = num_workers, shards_per_window
        self.anchor: Anchor = anchor
        self.offset_frames, self.trim_after_eos = offset_frames, trim_after_eos
        self.epoch, self._skip = 0, 0
        self._plan: tuple[int, RankPlan] | None = None

    def lengths_in_positions(self, epoch: int) -> np.ndarray:
        """Every row's positions at the delay it draws in `epoch` (what its batch holds, before trimming)."""
        delays = self.delay_sampler.draws(self.seed, epoch, np.arange(len(self.index)))
        return protocol.n_total_positions(self.index.samples, delays)

    def plan(self, epoch: int) -> RankPlan:
        """This rank's plan of `epoch`, kept for the last epoch asked (forked workers inherit it)."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, plan_epoch(self.index, self.lengths_in_positions(epoch), self.seed, epoch,
                                            self.num_replicas, self.rank, self.num_workers, self.shards_per_window,
                                            self.max_positions))
        return self._plan[1]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch
        self.plan(epoch)  # here, in the main process: the epoch's workers are forked with it, none plans again

    def skip_batches(self, n: int) -> None:
        self._skip = n

    def __len__(self) -> int:
        return len(self.plan(self.epoch).served) - self._skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != max(1, self.num_workers):
            raise RuntimeError(f"ShardStream planned for {self.num_workers} workers, the DataLoader has {workers}")
        plan = self.plan(self.epoch)
        # The DataLoader asks its workers in turn from worker 0: after a resume, worker 0 plays the part of the worker
        # whose turn came next, and so on round the circle, so the order stays the unbroken run's.
        turn = int(plan.served[self._skip, 0]) if self._skip < len(plan.served) else 0
        role = (worker + turn) % workers
        positions = [p for p in np.flatnonzero(plan.served[:, 0] == role).tolist() if p >= self._skip]
        for window, group in itertools.groupby(positions, key=lambda p: int(plan.served[p, 1])):
            group = list(group)
            wanted = {int(row) for p in group for row in plan.batches[window][plan.served[p, 2]]}
            samples, failures = self._read(plan.windows[window], wanted)
            for p in group:
                rows = plan.batches[window][plan.served[p, 2]].tolist()
                batch = collate([self._item(row, samples, failures) for row in rows])
                batch["position"] = p
                yield batch

    def _read(self, shards: np.ndarray, wanted: set[int]) -> tuple[dict[int, dict], dict[int, str]]:
        """The wanted samples of a window's shards, and why a shard could not be read (shard -> message)."""
        samples: dict[int, dict] = {}
        failures: dict[int, str] = {}
        first, count = self.index.first_rows, self.index.rows
        for shard in shards.tolist():
            if not any(first[shard] <= row < first[shard] + count[shard] for row in wanted):
                continue  # a window re-read after a resume may not need all of its shards
            try:
                for row, sample in read_shard(self.index, shard):
                    if row in wanted:
                        samples[row] = sample
            except ShardError as err:
                failures[shard] = str(err)
        return samples, failures

    def _item(self, row: int, samples: dict[int, dict], failures: dict[int, str]) -> dict[str, Any]:
        """Row `row` as a training item, or `{"id", "skipped": why}` when its shard or sample does not read."""
        shard = int(np.searchsorted(self.index.first_rows, row, side="right") - 1)
        where = f"{self.index.url(shard)} sample {row:010d}"
        if row not in samples:
            return {"id": f"row {row:010d}", "skipped": failures.get(shard, f"{where}: missing from its shard")}
        try:
            utt = utterance_from_json(json.loads(samples[row]["json"]), Path("."), where)
            audio = decode_flac(samples[row]["flac"], where)
        except (ManifestError, json.JSONDecodeError, UnicodeDecodeError) as err:
            return {"id": f"row {row:010d}", "skipped": f"{where}: {err}"}
        except AudioError as err:
            return {"id": utt.id, "skipped": err.message}
        if utt.words is None:
            return {"id": utt.id, "skipped": f"{where}: no word timings (voxtral-prep shards writes timed rows only)"}
        if len(audio) != self.index.samples[row]:  # another write of the corpus behind data.shard_url, say
            return {"id": utt.id, "skipped": f"{where}: {len(audio)} samples, its index says "
                                             f"{int(self.index.samples[row])}: the shards and shards.json are not "
                                             "from the same voxtral-prep shards run"}
        return make_item([(utt, audio)], self.delay_sampler.draw(self.seed, self.epoch, row), self.tokenizer,
                         self.anchor, self.offset_frames, self.trim_after_eos)

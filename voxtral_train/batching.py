"""Batches by length: items of similar length share a micro-batch, so little of it is padding.

`LengthBucketSampler` fills each micro-batch up to a budget of 80 ms positions (padding included), shards batches
by rank itself, and can skip ahead to resume mid-epoch.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
from torch.utils.data import DataLoader, Sampler

from voxtral_train.preflight import UnreadableData


class LengthBucketSampler(Sampler[list[int]]):
    """Batch sampler: batches of similar-length items, each holding at most `max_positions_per_batch` padded positions
    (batch size x longest item), shuffled per epoch, split disjointly and equally across `num_replicas` ranks.

    Bucketing sorts the (shuffled) items by length and packs them in that order, so a batch's items differ in length
    by a few positions at most. `bucketing=False` packs them in random order instead (the baseline it is measured
    against in benchmarks/padding_waste.py). Every epoch's batches depend only on (seed, epoch). Each rank gets the
    batches `rank, rank + num_replicas, ...` of the epoch's list; the remainder (< num_replicas batches) is dropped.
    Resume: `state_dict(consumed_batches)` / `load_state_dict(state)`, or `set_epoch(e)` then `skip_batches(n)`.

    `lengths_in_positions` is a sequence (a numpy array), or a function epoch -> sequence when lengths change per epoch (each item draws its
    delay per epoch: `StreamingDataset.lengths_in_positions`); bucketing by the drawn lengths keeps items with
    different delays out of one batch. `tag_epoch=True` yields `(epoch, index)` pairs instead of indices: the
    sampler runs in the main process, so persistent DataLoader workers learn each item's epoch from its key.
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
        tag_epoch: bool = False,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.max_positions = max_positions_per_batch
        self.seed, self.shuffle, self.bucketing, self.tag_epoch = seed, shuffle, bucketing, tag_epoch
        self.num_replicas, self.rank = num_replicas, rank
        fixed = lengths_in_positions
        self._lengths_of = lengths_in_positions if callable(lengths_in_positions) else lambda epoch: fixed
        self._cache: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None  # (epoch, its plan)
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

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """All ranks' batches of `epoch` as numpy: (item order, batch bounds): batch b is
        `order[bounds[b]:bounds[b + 1]]`, in the order batches are served (before the split across ranks).
        Eight bytes per item, not a Python list per batch: an epoch of 5 M items stays 40 MB."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        lengths = self.lengths(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(lengths)) if self.shuffle else np.arange(len(lengths))
        if self.bucketing:  # stable sort: items of equal length keep their shuffled order
            order = order[np.argsort(lengths[order], kind="stable")]
            sizes = pack_sorted(lengths[order], self.max_positions)
        else:
            sizes = pack(lengths[order], self.max_positions)
        if self.shuffle:  # batches in random order, each keeping its items
            permutation = rng.permutation(len(sizes))
            old_starts = np.cumsum(sizes) - sizes
            sizes = sizes[permutation]
            new_starts = np.cumsum(sizes) - sizes
            order = order[np.repeat(old_starts[permutation] - new_starts, sizes) + np.arange(len(order))]
        plan = (order, np.concatenate([[0], np.cumsum(sizes)]))
        self._cache = (epoch, plan)
        return plan

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of `epoch` as lists, in the order they are served (before the split across ranks)."""
        order, bounds = self.epoch_plan(epoch)
        return [order[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]

    def _rank_batches(self) -> np.ndarray:
        """The batch numbers of this rank in the current epoch's plan."""
        _, bounds = self.epoch_plan(self.epoch)
        per_rank = (len(bounds) - 1) // self.num_replicas
        if per_rank == 0:
            raise ValueError(f"epoch {self.epoch} has {len(bounds) - 1} batches, fewer than {self.num_replicas} ranks")
        return np.arange(per_rank * self.num_replicas)[self.rank:: self.num_replicas]

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

    def __iter__(self) -> Iterator[list[int] | list[tuple[int, int]]]:
        batches = self._rank_batches()
        order, bounds = self.epoch_plan(self.epoch)
        start, self._skip = self._skip, 0
        for position in range(start, len(batches)):
            self._yielded = position + 1
            b = batches[position]
            items = order[bounds[b]: bounds[b + 1]].tolist()
            yield [(self.epoch, i) for i in items] if self.tag_epoch else items


def pack(lengths: np.ndarray, max_positions: int) -> np.ndarray:
    """Sizes of the batches that items of `lengths`, taken in this order, fill greedily: an item joins the current
    batch while (batch size + 1) x its longest item stays within `max_positions`, else starts the next."""
    sizes: list[int] = []
    size = longest = 0
    for length in lengths.tolist():
        longest_if_added = max(longest, length)
        if size and (size + 1) * longest_if_added > max_positions:
            sizes.append(size)
            size, longest_if_added = 0, length
        size += 1
        longest = longest_if_added
    if size:
        sizes.append(size)
    return np.asarray(sizes, dtype=np.int64)


def pack_sorted(lengths: np.ndarray, max_positions: int) -> np.ndarray:
    """`pack` for lengths in ascending order, one numpy step per batch instead of a Python step per item: the k-th
    item of a batch starting at s is its longest, so the batch is the longest run with k x lengths[s + k - 1] within
    the budget (k x lengths[s + k - 1] grows with k: the run is a prefix)."""
    sizes: list[int] = []
    start, n = 0, len(lengths)
    while start < n:
        most = min(n - start, max(1, max_positions // max(1, int(lengths[start]))))
        fits = np.arange(1, most + 1) * lengths[start: start + most] <= max_positions
        size = most if fits.all() else max(1, int(np.argmin(fits)))
        sizes.append(size)
        start += size
    return np.asarray(sizes, dtype=np.int64)


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of a batch's positions (batch size x longest item, summed) that is padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / padded


class BatchOrder(Protocol):
    """What `micro_batches` tells before each epoch: a `LengthBucketSampler`, or a `ShardStream` (its own order)."""

    def set_epoch(self, epoch: int) -> None: ...

    def skip_batches(self, n: int) -> None: ...


def micro_batches(loader: DataLoader, sampler: BatchOrder, epoch: int,
                  consumed: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, batches consumed in that epoch, batch), endlessly, starting after `consumed` batches of `epoch`.
    The sampler and the dataset (its delays) are told each new epoch. A batch whose every item was skipped (audio
    that no longer reads) is consumed but not yielded; its `skipped` list travels on with the next batch."""
    carried: list[tuple[str, str]] = []
    while True:
        sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        sampler.skip_batches(consumed)
        loaded = yielded = 0
        for batch in loader:
            if batch.get("position", consumed) != consumed:  # a shard stream's batches say where they belong
                raise RuntimeError(f"epoch {epoch}: batch {batch['position']} arrived as batch {consumed}: the "
                                   "DataLoader did not take its workers' batches in turn, so a resume would not be "
                                   "exact")
            consumed += 1
            loaded += 1
            if not batch["ids"]:
                carried += batch["skipped"]
                continue
            batch["skipped"], carried = carried + batch["skipped"], []
            yielded += 1
            yield epoch, consumed, batch
        if loaded and not yielded:
            raise UnreadableData(f"no item of epoch {epoch} could be read, e.g. " + "; ".join(
                f"{uid}: {why}" for uid, why in carried[:3]))
        epoch, consumed = epoch + 1, 0

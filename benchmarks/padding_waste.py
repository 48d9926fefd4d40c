"""How much of each batch is padding: length-bucketed batches vs random batches under the same position budget.

    python benchmarks/padding_waste.py [--budget 1024] [--synthetic-budget 16384] [--delays-ms 80 2400]

Measured on the bundled speech set (lengths from the manifest durations) and on a synthetic set of 20 000 utterances
with log-normal durations (median 6 s, 1-30 s), like a read-speech corpus. Each item draws its delay per epoch
(uniform over the range, 80 ms steps), so its length in positions changes per epoch; the sampler buckets by the
drawn lengths. Goal: <= 5 % padding with bucketing. A batch's padded positions are its size x its longest item.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Sequence

import numpy as np

from voxtral_train import protocol
from voxtral_train.batching import LengthBucketSampler
from voxtral_train.dataset import StreamingDataset
from voxtral_train.delays import DelaySampler
from voxtral_train.manifest import bundled_manifest_path, read_manifest
from voxtral_train.tokenizer import StreamingTokenizer

EPOCHS = 3


def synthetic_lengths(n: int, delays: DelaySampler, seed: int = 0) -> Callable[[int], list[int]]:
    """Lengths per epoch of `n` utterances of log-normal duration, each with its own drawn delay."""
    seconds = np.clip(np.random.default_rng(seed).lognormal(mean=math.log(6.0), sigma=0.6, size=n), 1.0, 30.0)
    n_samples = [math.ceil(s * protocol.SAMPLE_RATE) for s in seconds]
    return lambda epoch: [protocol.n_total_positions(k, delays.draw(seed, epoch, i)) for i, k in enumerate(n_samples)]


def report(name: str, lengths_of: Callable[[int], Sequence[int]], budget: int) -> None:
    per_epoch = [list(lengths_of(epoch)) for epoch in range(EPOCHS)]
    for bucketing in (True, False):
        sampler = LengthBucketSampler(lambda epoch: per_epoch[epoch], budget, seed=0, bucketing=bucketing)
        padded = real = n_batches = n_items = 0
        for epoch, lengths in enumerate(per_epoch):
            batches = sampler.epoch_batches(epoch)
            padded += sum(len(b) * max(lengths[i] for i in b) for b in batches)
            real += sum(lengths[i] for b in batches for i in b)
            n_batches, n_items = n_batches + len(batches), n_items + sum(map(len, batches))
        mode = "bucketed" if bucketing else "random  "
        print(f"{name:<18} {mode}  items {len(per_epoch[0]):>6}  budget {budget:>6}  "
              f"batches/epoch {n_batches // EPOCHS:>5}  mean batch {n_items / n_batches:6.1f}  "
              f"padding {100 * (1 - real / padded):5.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=1024, help="bundled set: max padded positions per batch")
    parser.add_argument("--synthetic-budget", type=int, default=16384, help="synthetic set: max padded positions")
    parser.add_argument("--delays-ms", type=int, nargs=2, default=[80, 2400], metavar=("MIN", "MAX"))
    args = parser.parse_args()
    delays = DelaySampler.uniform(*args.delays_ms)

    manifest = bundled_manifest_path("train")
    if manifest.is_file():
        dataset = StreamingDataset(read_manifest(manifest), StreamingTokenizer.tiny(), delays)
        report("bundled set", dataset.lengths_in_positions, args.budget)
    else:
        print(f"bundled set: {manifest} not found, skipped")
    report("synthetic 1-30 s", synthetic_lengths(20_000, delays), args.synthetic_budget)


if __name__ == "__main__":
    main()

"""Shard corpora at 10,000 hours: the start-up cost of a 5 M-row index, and batches per second against the manifest.

    python benchmarks/shard_scale.py [--rows 5000000] [--shards 8500] [--ranks 8] [--workers 4] [--rounds 5]

1. Start-up, on a generated index (no audio: `--rows` sample counts of 2-20 s in `--shards` shards): the time to
   open and verify it (`ShardIndex.open`: json + sha256 of samples.i64), the pre-flight (`check_shards`) and one
   rank's epoch plan (`plan_epoch`: delays, windows, buckets, the round-robin order of `--workers` workers over
   `--ranks` ranks), and the heap they hold per row (tracemalloc). What a manifest needs instead is the index build
   plus an audio header per row (benchmarks/manifest_scale.py).
2. Batches, on real audio (the bundled 56 clips): one epoch of training batches made in this process (no workers)
   from the manifest (`StreamingDataset` + `LengthBucketSampler`) and from the same rows as shards read from local
   disk, the sides alternating per round (`ab.turns`; medians, min-max), in real audio seconds per second.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import machine_line, pin_threads, spread, turns  # noqa: E402

from voxtral_train import protocol  # noqa: E402
from voxtral_train.batching import LengthBucketSampler  # noqa: E402
from voxtral_train.config import DataSettings  # noqa: E402
from voxtral_train.dataset import StreamingDataset, collate  # noqa: E402
from voxtral_train.delays import DelaySampler  # noqa: E402
from voxtral_train.manifest import read_manifest  # noqa: E402
from voxtral_train.preflight import check_shards  # noqa: E402
from voxtral_train.shard_stream import ShardStream, as_is, plan_epoch  # noqa: E402
from voxtral_train.shards import ShardIndex, write_index, write_shards  # noqa: E402
from voxtral_train.tokenizer import StreamingTokenizer  # noqa: E402

DELAYS = DelaySampler.choices([240, 480, 960, 1600, 2400])
BUDGET = 8192


def generated_index(folder: Path, rows: int, shards: int) -> None:
    """An index of `rows` rows of 2-20 s in `shards` shards, as voxtral-prep shards would write it (no tar files)."""
    samples = np.random.default_rng(0).integers(2 * protocol.SAMPLE_RATE, 20 * protocol.SAMPLE_RATE, rows,
                                                dtype=np.int64)
    per_shard = np.diff(np.linspace(0, rows, shards + 1).astype(np.int64))
    write_index(folder, [{"name": f"shard-{k:06d}.tar", "rows": int(n), "bytes": 128 << 20}
                         for k, n in enumerate(per_shard)], samples, seed=0)


def timed(fn):
    tracemalloc.start()
    started = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - started
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return value, seconds, held


def start_up(rows: int, shards: int, ranks: int, workers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        generated_index(folder, rows, shards)
        url = "pipe:false {name}"  # a remote corpus: the pre-flight stats no local shard
        index, opened, held = timed(lambda: ShardIndex.open(folder, url))
        print(f"ShardIndex.open: {rows:,} rows in {shards:,} shards ({index.seconds.sum() / 3600:,.0f} h): "
              f"{opened:.2f} s, {held / rows:.1f} B/row held")
        data = DataSettings(shard_url=url, max_positions_per_batch=BUDGET, delays_ms=[240, 480, 960, 1600, 2400])
        (_, problems, _), checked, _ = timed(lambda: check_shards("data.train_manifest", str(folder), data))
        print(f"check_shards (the pre-flight): {checked:.2f} s, problems: {problems or 'none'}")
        lengths = protocol.n_total_positions(index.samples, DELAYS.draws(0, 0, np.arange(rows)))
        plan, planned, held = timed(lambda: plan_epoch(index, lengths, 0, 0, ranks, 0, workers, 2, BUDGET))
        print(f"plan_epoch (rank 0 of {ranks}, {workers} workers, windows of 2 shards): {planned:.2f} s, "
              f"{len(plan.served):,} batches, {held / rows:.1f} B/row of the corpus held")


def batches_per_second(rounds: int) -> None:
    tokenizer = StreamingTokenizer.tiny()
    rows = read_manifest("bundled:train")
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(rows, Path(tmp) / "corpus", shard_bytes=200_000, seed=0)
        index = ShardIndex.open(Path(tmp) / "corpus")

        def manifest_epoch(epoch: int) -> float:
            dataset = StreamingDataset(rows, tokenizer, DELAYS, seed=0)
            sampler = LengthBucketSampler(dataset.lengths_in_positions, 1000, seed=0, tag_epoch=True)
            sampler.set_epoch(epoch)
            loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)
            return sum(float(b["audio_seconds"].sum()) for b in loader)

        def shard_epoch(epoch: int) -> float:
            stream = ShardStream(index, tokenizer, DELAYS, max_positions=1000, seed=0, num_workers=0)
            stream.set_epoch(epoch)
            return sum(float(b["audio_seconds"].sum()) for b in DataLoader(stream, batch_size=None,
                                                                            collate_fn=as_is))

        rates: dict[str, list[float]] = {"manifest": [], "shards": []}
        sides = {"manifest": manifest_epoch, "shards": shard_epoch}
        for r in range(rounds):
            for name in turns(list(sides), r):
                started = time.perf_counter()
                audio = sides[name](r)
                rates[name].append(audio / (time.perf_counter() - started))
        print(f"one epoch of batches, 56 clips, no workers, {rounds} rounds alternating (real audio s / s):")
        for name, values in rates.items():
            print(f"  {name:9s} {spread(values, '.0f')}")
        ratios = [s / m for s, m in zip(rates["shards"], rates["manifest"])]
        print(f"  shards / manifest per round: {spread(ratios)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--shards", type=int, default=8_500)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pin_threads(1)
    print(machine_line())
    start_up(args.rows, args.shards, args.ranks, args.workers)
    batches_per_second(args.rounds)
    print(machine_line())


if __name__ == "__main__":
    main()

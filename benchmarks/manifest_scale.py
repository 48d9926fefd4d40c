"""Data structures at 10,000 hours: the lazy manifest index and the embedding cache's file layout, on generated data.

    python benchmarks/manifest_scale.py [--rows 100000 1000000] [--old-rows 100000] [--rounds 3] [--workers 2]
                                        [--cache-entries 2000] [--dir /tmp/manifest_scale]

Manifests of realistic rows (id, audio path, ~12 words of text, duration, language, a start/end per word, timing
source: like data/synth/general/manifest.jsonl, ≈ 750 bytes) are written to --dir and deleted afterwards. Per size:
the index's build time, its heap per row (tracemalloc: exact bytes held after the build), the process's anonymous
memory growth, random access rows/s; at --old-rows, the time to a usable manifest of the index vs `read_manifest`
(a list of Utterance), the sides alternating per round (--rounds; medians, min-max), and the list's heap; and
DataLoader workers (fork) reading every row: their private (USS) and proportional (PSS) memory growth from
/proc/<pid>/smaps_rollup, for the index and for the list. Then the embedding store: --cache-entries entries of
50 x 3072 bf16 (a ~4 s clip of the real model) written in batches of 8, its files, write and read rates.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import machine_line, spread, turns  # noqa: E402

from voxtral_train.embedding_cache import EmbeddingStore  # noqa: E402
from voxtral_train.manifest import read_manifest  # noqa: E402
from voxtral_train.manifest_index import ManifestIndex  # noqa: E402

VOCABULARY = ("the patient reported a mild headache after the second dose and the doctor asked about her sleep "
              "Rebecca Powell usually fixed a polite car for Brandon while Ms. Foster hid it anyway").split()


def generate(path: Path, n: int, seed: int = 0) -> None:
    """n rows like the synthetic corpora's: 8-16 words with times, a duration, the usual extra keys."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            t, words = rng.uniform(0.1, 0.3), []
            for _ in range(rng.randint(8, 16)):
                end = t + rng.uniform(0.1, 0.6)
                words.append({"word": rng.choice(VOCABULARY), "start": round(t, 4), "end": round(end, 4)})
                t = end + rng.uniform(0.0, 0.2)
            row = {"id": f"gen_{i:08d}", "audio": f"clips/{i % 1000:03d}/gen_{i:08d}.flac",
                   "text": " ".join(w["word"] for w in words), "duration": round(t + 0.2, 4), "language": "en",
                   "words": words, "timing_source": "espeak", "voice": "en-gb", "rate": 140, "snr_db": None}
            f.write(json.dumps(row) + "\n")


def memory(pid: int | str = "self") -> dict[str, int]:
    """kB of /proc/<pid>/smaps_rollup: Rss, Pss, Anonymous, Private (= USS: Private_Clean + Private_Dirty)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":")
        fields[name] = int(value.split()[0])
    return {"rss": fields["Rss"], "pss": fields["Pss"], "anon": fields["Anonymous"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def held_bytes(build: Callable[[], Any]) -> tuple[Any, int]:
    """(what build returns, the bytes of Python heap it still holds)."""
    tracemalloc.start()
    try:
        value = build()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return value, held


class Texts(Dataset):
    """Every row read in full (a worker parses it as a training item would), the text length returned."""

    def __init__(self, rows: Sequence) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return len(self.rows[i].text)


def worker_stats(batch: list[int]) -> tuple[int, int, dict[str, int]]:
    return sum(batch), os.getpid(), memory()


def worker_growth(rows: Sequence, workers: int) -> str:
    """USS and PSS of each worker at its first and last batch, reading all rows once."""
    loader = DataLoader(Texts(rows), batch_size=2000, num_workers=workers, collate_fn=worker_stats,
                        multiprocessing_context="fork")
    first: dict[int, dict[str, int]] = {}
    last: dict[int, dict[str, int]] = {}
    for _, pid, mem in loader:
        first.setdefault(pid, mem)
        last[pid] = mem
    return "; ".join(f"worker {k}: USS {first[p]['uss'] / 1024:.0f} -> {last[p]['uss'] / 1024:.0f} MB, PSS "
                     f"{first[p]['pss'] / 1024:.0f} -> {last[p]['pss'] / 1024:.0f} MB"
                     for k, p in enumerate(sorted(first)))


def random_access(rows: Sequence, n: int = 20_000) -> float:
    picks = np.random.default_rng(0).integers(0, len(rows), n)
    start = time.perf_counter()
    for i in picks:
        rows[int(i)]
    return n / (time.perf_counter() - start)


def index_part(path: Path, n: int, workers: int) -> None:
    size_mb = path.stat().st_size / 1e6
    before = memory()
    start = time.perf_counter()
    index = ManifestIndex(path)
    build_s = time.perf_counter() - start
    after = memory()
    del index
    index, held = held_bytes(lambda: ManifestIndex(path))
    assert len(index) == n
    print(f"index {n:>9,} rows ({size_mb:,.0f} MB file): build {build_s:.1f} s ({n / build_s / 1e3:,.0f} k rows/s), "
          f"heap {held / n:.1f} B/row ({held / 1e6:.1f} MB), anonymous memory {(after['anon'] - before['anon']) / 1024:+.0f} "
          f"MB, random access {random_access(index):,.0f} rows/s")
    if workers:
        print(f"  {workers} DataLoader workers reading all {n:,} rows of the index: {worker_growth(index, workers)}")


def ready_ab(path: Path, n: int, rounds: int) -> None:
    """Time to a usable manifest, the index vs read_manifest, the sides alternating (order flipped) per round."""
    sides = {"index": lambda: ManifestIndex(path), "read_manifest": lambda: read_manifest(path)}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in turns(list(sides), r):
            start = time.perf_counter()
            rows = sides[name]()
            seconds[name].append(time.perf_counter() - start)
            del rows
    ratios = [old / new for old, new in zip(seconds["read_manifest"], seconds["index"])]
    print(f"ready {n:,} rows, {rounds} alternating rounds, median (min-max): index {spread(seconds['index'])} s, "
          f"read_manifest {spread(seconds['read_manifest'])} s; read_manifest / index {spread(ratios, '.1f')}x")


def old_part(path: Path, n: int, workers: int, rounds: int) -> None:
    ready_ab(path, n, rounds)
    rows, held = held_bytes(lambda: read_manifest(path))
    print(f"read_manifest {n:>9,} rows: heap {held / n:,.0f} B/row ({held / 1e6:,.0f} MB)")
    if workers:
        print(f"  {workers} DataLoader workers reading all {n:,} rows of the list: {worker_growth(rows, workers)}")


def cache_part(folder: Path, n_entries: int) -> None:
    tensors = [torch.randn(50, 3072).to(torch.bfloat16) for _ in range(8)]
    store = EmbeddingStore(folder)
    start = time.perf_counter()
    for batch in range(n_entries // 8):
        store.put({f"{batch}-{j}": tensors[j] for j in range(8)})
    write_s = time.perf_counter() - start
    names = sorted(p.name for p in folder.iterdir())
    total = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    store.close()
    start = time.perf_counter()
    reader = EmbeddingStore(folder)
    open_s = time.perf_counter() - start
    keys = [f"{b}-{j}" for b in range(n_entries // 8) for j in range(8)]
    picks = np.random.default_rng(0).permutation(len(keys))[:1000]
    start = time.perf_counter()
    for i in picks:
        assert reader.get(keys[i], 50) is not None
    read_ms = (time.perf_counter() - start) / len(picks) * 1e3
    print(f"embedding store: {len(keys):,} entries in {n_entries // 8} batches -> {len(names)} files "
          f"({sum(n.startswith('data-') for n in names)} data, {sum(n.startswith('index-') for n in names)} index; "
          f"{total:,.0f} MB); write {total / write_s:,.0f} MB/s; opening the store (index read) {open_s * 1e3:.0f} ms; "
          f"a verified random read {read_ms:.2f} ms per entry (page cache); open files {reader.open_files}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--old-rows", type=int, default=100_000, help="read_manifest at this size (0: skip)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the index vs read_manifest timing")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the copy-on-write check (0: skip)")
    p.add_argument("--worker-max-rows", type=int, default=1_000_000, help="the worker check only up to this size")
    p.add_argument("--cache-entries", type=int, default=2000, help="0: skip the embedding store")
    p.add_argument("--dir", type=Path, default=Path("/tmp/manifest_scale"))
    args = p.parse_args()
    torch.set_num_threads(1)
    print(machine_line())
    print(time.strftime("%Y-%m-%d %H:%M %Z"), "python benchmarks/manifest_scale.py", " ".join(sys.argv[1:]))
    args.dir.mkdir(parents=True, exist_ok=True)
    try:
        for n in sorted(set(args.rows) | ({args.old_rows} - {0})):
            path = args.dir / f"rows_{n}.jsonl"
            start = time.perf_counter()
            generate(path, n)
            print(f"generated {n:,} rows in {time.perf_counter() - start:.0f} s")
            if n in args.rows:
                index_part(path, n, args.workers if n <= args.worker_max_rows else 0)
            if n == args.old_rows:
                old_part(path, n, args.workers, args.rounds)
            path.unlink()
        if args.cache_entries:
            cache_part(args.dir / "cache", args.cache_entries)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(machine_line())


if __name__ == "__main__":
    main()

"""The pre-flight check of a long manifest: one process vs chunks on all cores, the sides alternating per round.

    python benchmarks/preflight_scale.py [--rows 60000] [--rounds 3] [--dir /tmp/preflight_scale]

Writes --rows distinct 0.5 s WAV files (one per row, so every header is really read) and a manifest of timed rows
to --dir, then times `check_manifest` with the chunks on forked processes (the default past PARALLEL_ROWS rows)
and with one process, alternating (`ab.turns`), medians with min-max, rows per second, and the load. The files are
in the page cache after the first round: this measures parsing and header reads from memory, not a network
filesystem's latency. Deletes --dir afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import machine_line, pin_threads, spread, turns  # noqa: E402

from voxtral_train import preflight  # noqa: E402
from voxtral_train.config import DataSettings  # noqa: E402
from voxtral_train.protocol import SAMPLE_RATE  # noqa: E402


def write_corpus(folder: Path, rows: int) -> Path:
    clip = (np.random.default_rng(0).standard_normal(SAMPLE_RATE // 2) * 0.1).astype(np.float32)
    words = [{"word": "one", "start": 0.05, "end": 0.2}, {"word": "two", "start": 0.25, "end": 0.45}]
    manifest = folder / "manifest.jsonl"
    with manifest.open("w") as f:
        for i in range(rows):
            audio = folder / f"{i // 1000:03d}" / f"c{i:07d}.wav"
            audio.parent.mkdir(exist_ok=True)
            sf.write(audio, clip, SAMPLE_RATE, subtype="PCM_16")
            f.write(json.dumps({"id": f"c{i}", "audio": str(audio), "text": "one two", "words": words}) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/preflight_scale"))
    args = parser.parse_args()
    pin_threads(1)
    print(machine_line())
    print(time.strftime("%Y-%m-%d %H:%M %Z"), "python benchmarks/preflight_scale.py", " ".join(sys.argv[1:]))
    args.dir.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        manifest = write_corpus(args.dir, args.rows)
        print(f"wrote {args.rows:,} clips and their manifest in {time.perf_counter() - started:.0f} s")
        data = DataSettings()
        parallel_rows = preflight.PARALLEL_ROWS
        seconds: dict[str, list[float]] = {"forked chunks": [], "one process": []}
        for r in range(args.rounds):
            for side in turns(list(seconds), r):
                preflight.PARALLEL_ROWS = parallel_rows if side == "forked chunks" else sys.maxsize
                started = time.perf_counter()
                _, problems, _ = preflight.check_manifest("data.train_manifest", str(manifest), data)
                seconds[side].append(time.perf_counter() - started)
                assert not problems, problems
        processes = len(os.sched_getaffinity(0))
        print(f"check_manifest of {args.rows:,} rows, {args.rounds} rounds alternating, median (min-max):")
        for side, values in seconds.items():
            print(f"  {side:14s} {spread(values)} s ({args.rows / np.median(values):,.0f} rows/s)")
        ratios = [a / b for a, b in zip(seconds["one process"], seconds["forked chunks"])]
        print(f"  one process / forked chunks ({processes} processes) per round: {spread(ratios)}x")
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(machine_line())


if __name__ == "__main__":
    main()

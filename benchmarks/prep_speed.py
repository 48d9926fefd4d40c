"""How fast `voxtral-prep` starts and validates audio, in x real time (audio seconds per wall second).

    python benchmarks/prep_speed.py [--workers 2] [--hours 1.0] [--timings auto|manifest|heuristic]

First the start-up: `voxtral-prep --help` in a fresh interpreter (goal: about a second; it imports neither torch nor
transformers). Then two runs: the bundled espeak-ng set, and a generated set of 10 s FLAC clips (bundled clips
strung together, untimed transcripts) totalling `--hours`. The goal is >= 200x real time on 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from data_prep import sources
from data_prep.validate import PrepOptions, prepare
from voxtral_train.audio import load_audio
from voxtral_train.manifest import bundled_manifest_path
from voxtral_train.protocol import SAMPLE_RATE

CLIP_SECONDS = 10.0


def make_long_set(folder: Path, hours: float) -> None:
    """Folder of 10 s FLAC clips + .txt transcripts, cut from the bundled clips played back to back."""
    rows = sources.from_table(bundled_manifest_path())
    speech = np.concatenate([load_audio(r.audio) for r in rows])
    text = "the bundled sentences strung together"
    n = int(SAMPLE_RATE * CLIP_SECONDS)
    for i in range(int(hours * 3600 / CLIP_SECONDS)):
        start = (i * n) % (len(speech) - n)
        sf.write(folder / f"clip_{i:05d}.flac", speech[start : start + n], SAMPLE_RATE, subtype="PCM_16")
        (folder / f"clip_{i:05d}.txt").write_text(text)


def measure(name: str, rows, opts: PrepOptions, workers: int) -> None:
    started = time.perf_counter()
    result = prepare(rows, opts, workers=workers)
    seconds = time.perf_counter() - started
    print(f"{name}: {result.summary().splitlines()[0]}; {result.audio_seconds / 60:.1f} min of audio in {seconds:.2f} s "
          f"= {result.audio_seconds / seconds:.0f}x real time ({workers} workers)")


def startup_seconds(repeats: int = 3) -> float:
    """Best wall time of `voxtral-prep --help` in a new interpreter (what a user waits for before any work)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "data_prep.cli", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument("--timings", default="auto", choices=["auto", "manifest", "heuristic"])
    args = p.parse_args()
    print(f"start-up: voxtral-prep --help in {startup_seconds():.2f} s")
    opts = PrepOptions(timings=args.timings)
    measure("bundled set", sources.from_table(bundled_manifest_path()), opts, args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        make_long_set(Path(tmp), args.hours)
        measure(f"{args.hours:g} h generated set", sources.from_folder(Path(tmp)), opts, args.workers)


if __name__ == "__main__":
    main()

"""`voxtral-prep shards MANIFEST --out DIR`: a prepared manifest as WebDataset tar shards (voxtral_train.shards).

    voxtral-prep shards data/train/manifest.jsonl --out data/train_shards            # 128 MB shards, shuffled
    voxtral-prep shards data/train/manifest.jsonl --out data/train_shards --shard-mb 512 --workers 8
    voxtral-train data=manifest data.train_manifest=data/train_shards ...                       # local disk
    voxtral-train ... data.train_manifest=data/train_shards \\
        'data.shard_url="pipe:aws s3 cp s3://bucket/train_shards/{name} -"'                     # object storage

The manifest is checked as training checks it (every row timed and readable: the same messages, the same fix), rows
longer than --max-seconds are cut at word boundaries as training would cut them, and each row's audio is written as
the trainer would read it (16 kHz, 16-bit PCM, FLAC). Train with the same data.max_seconds or a larger one.
Copy the folder to object storage as it is; the trainer reads shards.json and samples.i64 from a local copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from voxtral_train.config import DataSettings
from voxtral_train.dataset import SegmentedRows, row_seconds
from voxtral_train.preflight import check_manifest
from voxtral_train.shards import DEFAULT_SHARD_BYTES, ShardError, write_shards


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxtral-prep shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="a prepared JSONL manifest (voxtral-prep writes one), or bundled:NAME")
    p.add_argument("--out", type=Path, required=True, help="a new folder for the shards and shards.json")
    p.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_BYTES / 2**20,
                   help=f"start a new shard past this size (default {DEFAULT_SHARD_BYTES >> 20} MB)")
    p.add_argument("--max-seconds", type=float, default=DataSettings.max_seconds,
                   help="cut longer rows at word boundaries, as data.max_seconds does (default %(default)g)")
    p.add_argument("--seed", type=int, default=0, help="the row order's shuffle (default 0)")
    p.add_argument("--keep-order", action="store_true", help="write the rows in manifest order (no shuffle)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="processes decoding and encoding audio (default: all cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.shard_mb <= 0 or args.max_seconds <= 0 or args.workers < 1:
        print("voxtral-prep shards: --shard-mb and --max-seconds must be > 0, --workers >= 1", file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"voxtral-prep shards: --out {args.out} is a file: name a new folder", file=sys.stderr)
        return 2
    # The budget check is training's business (it depends on the batch size it will run with): not refused here.
    data = dataclasses.replace(DataSettings(), max_seconds=args.max_seconds, max_positions_per_batch=sys.maxsize)
    index, problems, notes = check_manifest("manifest", args.manifest, data)
    if problems:
        print("voxtral-prep shards: the manifest cannot be written as shards (nothing was written):\n  "
              + "\n  ".join(problems), file=sys.stderr)
        return 2
    for note in notes:
        print(note)
    started = time.perf_counter()
    try:
        written = write_shards(SegmentedRows(index, row_seconds(index), args.max_seconds), args.out,
                               int(args.shard_mb * 2**20), None if args.keep_order else args.seed, args.workers)
    except ShardError as err:
        print(f"voxtral-prep shards: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder it may not write: the manifest and its audio are untouched
        unfinished = f"; {args.out} is unfinished (no shards.json): delete it and write again" \
            if args.out.is_dir() and any(args.out.iterdir()) else ""
        print(f"voxtral-prep shards: {err}{unfinished}", file=sys.stderr)
        return 2
    if written.rejects:
        with (args.out / "rejects.jsonl").open("w", encoding="utf-8") as f:
            for reject in written.rejects:
                f.write(json.dumps(reject, ensure_ascii=False) + "\n")
        print(f"{len(written.rejects)} rows left out (audio that did not decode): {args.out / 'rejects.jsonl'}")
    seconds = time.perf_counter() - started
    print(f"wrote {written.rows} rows ({written.seconds / 3600:.2f} h) in {written.shards} shards in {seconds:.1f} s "
          f"-> {written.index}")
    return 0

"""`voxtral-prep`: import a corpus into a validated manifest plus a reject report.

    voxtral-prep librispeech LibriSpeech/dev-clean --out data/dev-clean
    voxtral-prep folder my_clips/ --out data/mine --timings heuristic --copy-audio
    voxtral-prep table list.csv --out data/list --tokenizer tiny
    voxtral-prep commonvoice cv-corpus/en/train.tsv --out data/cv --max-seconds 20
    voxtral-prep hf saved_dataset/ --split train --out data/hf
    voxtral-prep validate data/mine/manifest.jsonl --out data/mine_checked
    voxtral-prep folder my_clips/ --out data/mine --self-align-model /models/voxtral-realtime
    voxtral-prep folder my_clips/ --out data/mine --ctc-align-model /models/wav2vec2-base-960h
    voxtral-prep synth --out data/synth/general --sentences 30000      # synthetic corpus (data_prep.synth_corpus)
    voxtral-prep shards data/mine/manifest.jsonl --out data/mine_shards  # tar shards for corpora at scale

Writes OUT/manifest.jsonl (kept rows), OUT/rejects.jsonl (each rejected row with its source, input line, a reason
code and a message) and OUT/changes.jsonl (transcripts cleaning changed: original and cleaned text), and prints
`kept N, rejected M (reason: count, ...)` and the rows per timing source.

Starts in about a second: torch and transformers are imported only when an alignment model or a tokenizer check
needs them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from data_prep import sources
from data_prep.validate import TIMING_MODES, PrepOptions, heuristic_fill, prepare
from voxtral_train import protocol
from voxtral_train.manifest import write_manifest


def _encoder(spec: str | None) -> tuple[Callable[[str], list[int]] | None, int | None]:
    """`tiny` or a tekken.json path -> (encode, unk id); None -> no tokenizer check."""
    if spec is None:
        return None, None
    from voxtral_train.tokenizer import StreamingTokenizer  # lazy: pulls mistral-common

    tok = StreamingTokenizer.tiny() if spec == "tiny" else StreamingTokenizer(spec)
    return tok.encode_text, getattr(tok.tekken, "unk_id", None)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxtral-prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["folder", "table", "librispeech", "commonvoice", "hf", "validate"],
                   help="input layout: folder of audio + .txt/.lab, JSONL/CSV/TSV table, LibriSpeech root, "
                        "Common Voice .tsv, HF save_to_disk folder; validate = re-check an existing manifest")
    p.add_argument("input", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output folder for manifest.jsonl and rejects.jsonl")
    p.add_argument("--max-seconds", type=float, default=30.0, help="longest clip kept (default 30)")
    p.add_argument("--segment", action="store_true", help="cut longer timed recordings at word boundaries instead of rejecting them")
    p.add_argument("--copy-audio", action=argparse.BooleanOptionalAction, default=False,
                   help="write kept clips as 16 kHz mono FLAC under OUT/audio (default: reference the originals)")
    p.add_argument("--timings", choices=TIMING_MODES, default="auto",
                   help="auto (default): the row's own word timings, else --self-align-model, else --ctc-align-model, "
                        "else estimated from the signal energy; manifest: keep only rows with their own timings; "
                        "heuristic: estimate them where missing; none: drop them")
    p.add_argument("--self-align-model", help="'tiny' or a Voxtral folder: give rows still without word timings the "
                   "timings this checkpoint would emit (self-alignment, any language)")
    p.add_argument("--ctc-align-model", help="a local character-CTC folder (e.g. a wav2vec2 fine-tuned on the data's "
                   "language): give rows still without word timings its acoustic word spans (optional extra)")
    p.add_argument("--align-delay-ms", type=int, default=protocol.DEFAULT_DELAY_MS,
                   help="delay the self-alignment runs the model at")
    p.add_argument("--tokenizer", help="'tiny' or a tekken.json path: reject text it cannot encode")
    p.add_argument("--language", help="language code for rows that have none")
    p.add_argument("--workers", type=int, default=None, help="audio-check processes (default: all cores)")
    p.add_argument("--split", help="hf: which split of a DatasetDict")
    p.add_argument("--audio-column", help="hf: audio column (default: the Audio feature)")
    p.add_argument("--text-column", help="hf: text column (default: text/sentence/transcript/...)")
    return p


def _rows(args: argparse.Namespace) -> Iterator[sources.Row]:
    if args.kind == "folder":
        return sources.from_folder(args.input)
    if args.kind in ("table", "validate"):
        return sources.from_table(args.input)
    if args.kind == "librispeech":
        return sources.from_librispeech(args.input)
    if args.kind == "commonvoice":
        return sources.from_common_voice(args.input)
    return sources.from_hf_dataset(args.input, args.out / "hf_audio", args.split, args.audio_column, args.text_column)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["synth"]:  # generates a corpus instead of importing one: its own options
        from data_prep.synth_corpus import main as synth_main

        return synth_main(argv[1:])
    if argv[:1] == ["shards"]:  # writes a checked manifest as tar shards: its own options
        from data_prep.shard_corpus import main as shards_main

        return shards_main(argv[1:])
    args = _parser().parse_args(argv)
    if not args.input.exists():
        print(f"voxtral-prep: input not found: {args.input}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    aligner = args.timings == "auto" and bool(args.self_align_model or args.ctc_align_model)
    opts = PrepOptions(args.max_seconds, args.segment, args.timings, args.out / "audio" if args.copy_audio else None,
                       aligner)
    encode, unk_id = _encoder(args.tokenizer)
    started = time.perf_counter()
    try:
        result = prepare(_rows(args), opts, encode, unk_id, args.workers)
    except ValueError as err:  # an importer that cannot start (e.g. ambiguous HF columns)
        print(f"voxtral-prep: {err}", file=sys.stderr)
        return 2
    if args.language:
        for u in result.kept:
            u.language = u.language or args.language
    if args.self_align_model:
        from voxtral_train import load_model
        from voxtral_train.align import self_align_utterances

        model, tokenizer = load_model(args.self_align_model)
        n = self_align_utterances(result.kept, model, tokenizer, protocol.delay_ms_to_tokens(args.align_delay_ms))
        print(f"self-aligned {n} rows with {args.self_align_model}")
    if args.ctc_align_model:
        from voxtral_train.align import ctc_align_utterances

        n = ctc_align_utterances(result.kept, args.ctc_align_model)
        print(f"CTC-aligned {n} rows with {args.ctc_align_model}")
    if aligner:  # the last link of the auto chain: rows no alignment model could time
        heuristic_fill(result.kept)
    write_manifest(args.out / "manifest.jsonl", result.kept)
    # changes.jsonl escapes non-ASCII: the invisible characters it reports become visible (\u200b), and a raw
    # U+0085 / U+2028 in a line would split it for line readers that follow Unicode.
    for name, records, ascii_only in (("rejects.jsonl", result.rejects, False), ("changes.jsonl", result.changes, True)):
        with (args.out / name).open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r.to_json(), ensure_ascii=ascii_only, default=str) + "\n")
    seconds = time.perf_counter() - started
    print(result.summary())
    print(f"{result.audio_seconds / 3600:.2f} h of audio in {seconds:.1f} s "
          f"({result.audio_seconds / max(seconds, 1e-9):.0f}x real time) -> {args.out / 'manifest.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`voxtral-eval`: decode a manifest with one or more models at several delays and write a report.

    voxtral-eval --model tiny --model runs/demo/final --manifest data/eval.jsonl --delays 240,480,960 --out eval/
    voxtral-eval --model BASE_DIR --adapter runs/lora ...                     # LoRA adapter merged for decoding
    voxtral-eval probe-anchor --model DIR --manifest data/eval.jsonl --delay 480 --out probe/

The first form writes `report.json`, `report.md`, `errors.jsonl`, `wer_vs_delay.png` and `latency_hist.png`
(see `voxtral_train.eval_report`). `probe-anchor` asks a checkpoint where it expects words: its teacher-forced loss on
targets anchored at word end vs word start, shifted by -2..+2 frames (the lowest loss is the convention it
was trained with); it prints a table and writes `probe_anchor.json`.

From Python (the training loop calls this at the end of a run):

    result = evaluate_model(model, tokenizer, utterances, [480], out_dir="runs/x/eval")
    result["delays"][0]["wer_norm"]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from voxtral_train import protocol
from voxtral_train.audio import AudioError, load_audio
from voxtral_train.batching import LengthBucketSampler
from voxtral_train.config import Settings
from voxtral_train.dataset import StreamingDataset, collate
from voxtral_train.decode import Decoded, decode_threads, greedy_decode
from voxtral_train.delays import DelaySampler
from voxtral_train.distributed import MODEL_INPUTS, model_inputs
from voxtral_train.eval_report import markdown_table, write_report
from voxtral_train.features import log_mel, pad_audio, pad_features
from voxtral_train.loss import STAT_NAMES
from voxtral_train.loss import summarize as summarize_loss
from voxtral_train.manifest import Utterance, read_manifest
from voxtral_train.scoring import score_utterance, summarize, summarize_by_language
from voxtral_train.streaming_lm import StreamingLM, unwrap_peft
from voxtral_train.tokenizer import StreamingTokenizer

PROBE_OFFSETS = (-2, -1, 0, 1, 2)
PROBE_ANCHORS = ("end", "start")


def _features(samples, delay_tokens: int) -> torch.Tensor:
    return log_mel(pad_audio(samples, delay_tokens))


def _stack(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """A padded batch of log-mel items and each item's positions."""
    return pad_features(list(features)), [f.shape[1] // protocol.MEL_FRAMES_PER_POSITION for f in features]


def load_clips(utterances: Sequence[Utterance], pcm16: bool = True,
               skip_unreadable: bool = False) -> tuple[list[Utterance], list[np.ndarray], list[tuple[str, str]]]:
    """(the utterances kept, their samples, (id, why) of each left out). With `skip_unreadable`, a clip whose audio
    no longer reads is left out instead of raising AudioError (a run's eval: the file changed after the pre-flight
    check, as training skips such items)."""
    kept, audio, skipped = [], [], []
    for utt in utterances:
        try:
            samples = load_audio(utt.audio, utt.offset, utt.end, pcm16=pcm16)
        except AudioError as err:
            if not skip_unreadable:
                raise
            skipped.append((utt.id, err.message))
            continue
        kept.append(utt)
        audio.append(samples)
    return kept, audio, skipped


def decode_utterances(model, tokenizer: StreamingTokenizer, utterances: Sequence[Utterance], delay_tokens: int,
                      batch_size: int = 8, progress: bool = True, label: str = "", pcm16: bool = True,
                      audio: Sequence[np.ndarray] | None = None) -> tuple[list[Decoded], float, float]:
    """Decode every utterance at one delay. Returns (decoded in input order, audio seconds, wall seconds).
    Utterances are batched by length, so a batch's samples finish at about the same step. Feature extraction and
    decoding share `decode_threads` (one thread for small models on CPU). Audio is quantised to 16-bit PCM as
    serving does, unless `pcm16` is false (`data.pcm16` of the run); `audio`, when given, is the utterances' samples
    already loaded (`load_clips`: one read for all delays)."""
    if audio is None:
        _, audio, _ = load_clips(utterances, pcm16)
    with decode_threads(model):
        return _decode_audio(model, tokenizer, audio, delay_tokens, batch_size, progress, label)


def _decode_audio(model, tokenizer: StreamingTokenizer, audio: Sequence[np.ndarray], delay_tokens: int,
                  batch_size: int, progress: bool, label: str) -> tuple[list[Decoded], float, float]:
    device = next(model.parameters()).device
    order = sorted(range(len(audio)), key=lambda i: len(audio[i]))
    decoded: list[Decoded | None] = [None] * len(audio)
    audio_seconds = sum(len(a) for a in audio) / protocol.SAMPLE_RATE
    done_seconds, start = 0.0, time.perf_counter()
    bar = tqdm(total=len(audio), desc=label or f"decode @ {protocol.delay_tokens_to_ms(delay_tokens)} ms",
               disable=not progress, unit="utt")
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        batch, lengths = _stack([_features(audio[i], delay_tokens) for i in chunk])
        for i, out in zip(chunk, greedy_decode(model, tokenizer, batch.to(device), lengths, delay_tokens)):
            decoded[i] = out
        done_seconds += sum(len(audio[i]) for i in chunk) / protocol.SAMPLE_RATE
        bar.update(len(chunk))
        bar.set_postfix_str(f"{done_seconds / (time.perf_counter() - start):.1f}× real time")
    bar.close()
    return decoded, audio_seconds, time.perf_counter() - start


@torch.no_grad()
def evaluate_model(model, tokenizer: StreamingTokenizer, utterances: Sequence[Utterance],
                   delays_ms: Sequence[int] = (protocol.DEFAULT_DELAY_MS,), out_dir: str | Path | None = None,
                   batch_size: int = 8, name: str = "model", progress: bool = True,
                   manifest: str | None = None, pcm16: bool = True, skip_unreadable: bool = False) -> dict[str, Any]:
    """Decode `utterances` at each delay and score them; write a report into `out_dir` when given.

    Returns {"model", "n_utterances", "delays": [per-delay summary: wer_raw, wer_norm, cer_raw, cer_norm,
    blank_rate, offset/latency p50/p90, x_real_time, by_language, ...], "utterances": [per-utterance rows]}
    (the layout `voxtral_train.eval_report` documents), plus "skipped": [[id, why]] of the clips `skip_unreadable`
    left out (`load_clips`). The audio is read once for all delays. The model is put in eval mode and restored
    afterwards."""
    utterances, audio, skipped = load_clips(utterances, pcm16, skip_unreadable)
    was_training = model.training
    model.eval()
    result: dict[str, Any] = {"model": name, "n_utterances": len(utterances), "delays": [], "utterances": [],
                              "skipped": [list(item) for item in skipped]}
    try:
        for delay_ms in delays_ms:
            delay = protocol.delay_ms_to_tokens(delay_ms)
            decoded, audio_s, wall_s = decode_utterances(model, tokenizer, utterances, delay, batch_size, progress,
                                                         label=f"{name} @ {delay_ms} ms", pcm16=pcm16, audio=audio)
            scores = [
                score_utterance(u.id, u.text, d.text, u.language,
                                [(w.word, w.end) for w in u.words] if u.words else None, d.words)
                for u, d in zip(utterances, decoded)
            ]
            delay_s = delay_ms / 1000
            result["delays"].append({
                "delay_ms": int(delay_ms), "delay_tokens": delay, **summarize(scores, delay_s),
                "audio_seconds": audio_s, "decode_seconds": wall_s, "x_real_time": audio_s / max(wall_s, 1e-9),
                "by_language": summarize_by_language(scores, delay_s),
            })
            result["utterances"] += [
                {"delay_ms": int(delay_ms), **s.to_json(), "words": [[w, round(t, 3)] for w, t in d.words]}
                for s, d in zip(scores, decoded)
            ]
    finally:
        model.train(was_training)
    if out_dir is not None:
        write_report(out_dir, [result], {"manifest": manifest, "delays_ms": [int(d) for d in delays_ms]})
    return result


# --- anchor probe -----------------------------------------------------------------------------------------------

@torch.no_grad()
def probe_anchor(model, tokenizer: StreamingTokenizer, utterances: Sequence[Utterance], delay_ms: int,
                 batch_size: int = 8, offsets: Sequence[int] = PROBE_OFFSETS) -> list[dict[str, Any]]:
    """Teacher-forced loss of `model` on targets built with each anchor and frame offset (utterances need word
    times). One row per (anchor, offset): loss, pad_loss, text_loss, text_accuracy, target_tokens."""
    untimed = [u.id for u in utterances if not u.words]
    if untimed:
        raise ValueError(f"probe-anchor needs word times; {len(untimed)} utterance(s) have none, e.g. {untimed[0]}")
    model.eval()
    device = next(model.parameters()).device
    lm = StreamingLM(model, tokenizer.ids.streaming_pad)  # pad and text targets weigh the same here
    rows = []
    for anchor in PROBE_ANCHORS:
        for offset in offsets:
            dataset = StreamingDataset(utterances, tokenizer, DelaySampler.fixed(delay_ms), anchor=anchor,
                                       offset_frames=offset)
            stats = None
            for first in range(0, len(dataset), batch_size):
                batch = collate([dataset[i] for i in range(first, min(first + batch_size, len(dataset)))])
                _, batch_stats = lm(**{key: batch[key].to(device) for key in MODEL_INPUTS})
                stats = batch_stats if stats is None else stats + batch_stats
            rows.append({"anchor": anchor, "offset_frames": offset, **summarize_loss(stats)})
    return rows


def probe_table(rows: Sequence[dict[str, Any]]) -> str:
    best = min(rows, key=lambda r: r["loss"])
    lines = ["| anchor | offset (frames) | loss | text loss | pad loss | text accuracy % |", "|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **(lowest)**" if r is best else ""
        lines.append(f"| {r['anchor']} | {r['offset_frames']:+d} | {r['loss']:.4f}{mark} | {r['text_loss']:.4f} | "
                     f"{r['pad_loss']:.4f} | {100 * r['text_accuracy']:.1f} |")
    return "\n".join(lines)


# --- evaluation inside a training run ----------------------------------------------------------------------------

def eval_batches(dataset: StreamingDataset, max_positions: int) -> list[list[int]]:
    """The held-out set's batches (index lists), in a fixed order: the same on every rank and every eval."""
    return LengthBucketSampler(dataset.lengths_in_positions(), max_positions, shuffle=False).epoch_batches(0)


def teacher_forced_eval(lm: torch.nn.Module, accelerator: Accelerator, dataset: StreamingDataset,
                        batches: list[list[int]], chunk_positions: int, zero_stage: int) -> dict[str, float]:
    """Loss statistics of the (wrapped) `StreamingLM` over `batches`, sharded over ranks. Every rank runs the same
    number of forwards (ZeRO-3 gathers parameters collectively): a rank short of batches repeats the first one and
    does not count it."""
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = batches[rank::world]
    total = torch.zeros(len(STAT_NAMES), device=accelerator.device)
    lm.eval()
    with torch.no_grad():
        for i in range(math.ceil(len(batches) / world)):
            counted = i < len(mine)
            batch = collate([dataset[j] for j in (mine[i] if counted else batches[0])])
            (inputs,) = model_inputs(accelerator, [batch], chunk_positions, zero_stage)
            _, stats = lm(**inputs)
            total += stats * float(counted)
    lm.train()
    return summarize_loss(accelerator.reduce(total, "sum").cpu())


class RunEvaluator:
    """The evaluations of a training run: periodic (teacher-forced loss on the held-out set plus a short WER) and
    final (the same decode and report as `voxtral-eval`, written to `<run>/eval/`). Every rank decodes (ZeRO-3
    gathers parameters collectively); the main process writes and prints."""

    def __init__(self, accelerator: Accelerator, lm: torch.nn.Module, tokenizer: StreamingTokenizer,
                 settings: Settings, held_out: StreamingDataset | None, log: Callable[..., None]):
        self.accelerator, self.lm, self.tokenizer, self.settings = accelerator, lm, tokenizer, settings
        self.held_out, self.log = held_out, log
        self.batches = eval_batches(held_out, settings.data.max_positions_per_batch) if held_out else []

    @property
    def model(self) -> torch.nn.Module:
        """The HF model being trained (LoRA layers injected), for decoding."""
        return unwrap_peft(self.accelerator.unwrap_model(self.lm).model)

    def _name_skipped(self, report: dict[str, Any]) -> None:
        """Say each held-out clip the eval left out (its audio no longer reads), so an eval never ends a run."""
        if self.accelerator.is_main_process:
            for uid, why in report["skipped"]:
                print(f"voxtral-train: eval skipped item {uid}: {why}", file=sys.stderr)

    def periodic(self, step: int) -> None:
        if self.held_out is None:
            return
        t, say = self.settings.train, self.accelerator.print
        metrics = teacher_forced_eval(self.lm, self.accelerator, self.held_out, self.batches,
                                      t.loss_chunk_positions, self.settings.deepspeed.zero_stage)
        clips = self.held_out.utterances[: t.eval_wer_clips]
        report = evaluate_model(self.model, self.tokenizer, clips, self.settings.data.delays_ms[:1], progress=False,
                                pcm16=self.settings.data.pcm16, skip_unreadable=True)
        self._name_skipped(report)
        metrics["wer"] = report["delays"][0]["wer_norm"]
        self.log(step, metrics, split="eval")
        note = "  (no text yet: normal early in training)" if metrics["text_accuracy"] < 0.05 else ""
        say(f"\neval step {step}: loss {metrics['loss']:.3f}, text accuracy {metrics['text_accuracy']:.2f}, "
            f"WER {100 * metrics['wer']:.1f}% on {len(clips)} clips{note}")
        for row in report["utterances"][:2]:
            say(f"  ref: {row['reference']}\n  hyp: {row['hypothesis']}")

    def final(self, step: int, run_dir: Path) -> float | None:
        """Decode the train manifest (a memorisation check) or the held-out one at the configured delays; returns
        the normalised WER at the first delay (None when `data.final_eval_split` is none)."""
        data, say = self.settings.data, self.accelerator.print
        if data.final_eval_split == "none":
            return None
        spec = data.train_manifest if data.final_eval_split == "train" else data.eval_manifest
        is_main = self.accelerator.is_main_process
        report = evaluate_model(self.model, self.tokenizer, read_manifest(spec), data.delays_ms,
                                out_dir=run_dir / "eval" if is_main else None, name=self.settings.train.name,
                                progress=is_main, manifest=spec, pcm16=data.pcm16, skip_unreadable=True)
        self._name_skipped(report)
        first = report["delays"][0]
        self.log(step, {key: value for key, value in first.items() if isinstance(value, (int, float))},
                 split=f"final_{data.final_eval_split}")
        say(f"final evaluation, {data.final_eval_split} manifest ({report['n_utterances']} clips) at "
            f"{first['delay_ms']} ms: WER {100 * first['wer_norm']:.1f}% (normalised), {100 * first['wer_raw']:.1f}% "
            f"(raw); report in {run_dir / 'eval'}")
        for row in report["utterances"][:3]:
            say(f"  ref: {row['reference']}\n  hyp: {row['hypothesis']}")
        return first["wer_norm"]


# --- command line -------------------------------------------------------------------------------------------------

def load_for_eval(source: str, adapter: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) from `load_model`; a LoRA run (adapter folder, run folder or checkpoint) is merged into the
    weights for decoding, fully trained encoder/adapter tensors included (`voxtral_train.export.merge_adapter`)."""
    from voxtral_train.export import merge_adapter
    from voxtral_train.model import load_model

    model, tokenizer = load_model(source, dtype=dtype)
    if adapter is not None:
        model = merge_adapter(model, adapter)
    return model.to(device).eval(), tokenizer


def _utterances(manifest: str, limit: int | None) -> list[Utterance]:
    rows = read_manifest(manifest)
    return rows[:limit] if limit else rows


def _delays(text: str) -> list[int]:
    try:
        delays = [int(x) for x in text.split(",") if x.strip()]
        for d in delays:
            protocol.delay_ms_to_tokens(d)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--delays: {err}") from None
    return delays


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="JSONL manifest to decode (voxtral_train.manifest format)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="only the first N utterances")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def eval_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="voxtral-eval", description="Decode a manifest and report WER/latency.")
    parser.add_argument("--model", action="append", required=True,
                        help="'tiny', an HF-format or a Mistral-format folder; repeat to compare models")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder, merged into every --model")
    parser.add_argument("--delays", type=_delays, default=None,
                        help="comma-separated delays in ms, positive multiples of 80 (default: the delay in each "
                             "model's tekken.json, what vLLM would serve it at)")
    _common(parser)
    args = parser.parse_args(argv)
    utterances = _utterances(args.manifest, args.limit)
    results = []
    for source in args.model:
        model, tokenizer = load_for_eval(source, args.adapter, args.dtype, args.device)
        name = source if args.adapter is None else f"{source}+{Path(args.adapter).name}"
        delays = args.delays or [tokenizer.default_delay_ms]
        results.append(evaluate_model(model, tokenizer, utterances, delays, batch_size=args.batch_size, name=name))
        del model
    used = sorted({d["delay_ms"] for r in results for d in r["delays"]})
    settings = {"manifest": str(args.manifest), "delays_ms": used, "models": args.model,
                "adapter": args.adapter, "limit": args.limit, "dtype": args.dtype}
    path = write_report(args.out, results, settings)
    print(markdown_table(results))
    print(f"report: {path}")
    return 0


def probe_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="voxtral-eval probe-anchor",
                                     description="Teacher-forced loss on targets anchored at word end vs start.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--delay", type=int, default=None, help="delay in ms (default: the model's tekken.json)")
    _common(parser)
    args = parser.parse_args(argv)
    model, tokenizer = load_for_eval(args.model, args.adapter, args.dtype, args.device)
    delay_ms = args.delay or tokenizer.default_delay_ms
    rows = probe_anchor(model, tokenizer, _utterances(args.manifest, args.limit), delay_ms, args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": args.model, "adapter": args.adapter, "manifest": args.manifest, "delay_ms": delay_ms,
               "rows": rows, "lowest": min(rows, key=lambda r: r["loss"])}
    (out / "probe_anchor.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(probe_table(rows))
    print(f"written: {out / 'probe_anchor.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "probe-anchor":
        return probe_main(argv[1:])
    return eval_main(argv)


if __name__ == "__main__":
    sys.exit(main())

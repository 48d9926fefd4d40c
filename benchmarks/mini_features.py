"""The framework's timing features measured on the mini base, where the true word times are known (espeak-ng's).

    python benchmarks/mini_features.py --out runs/mini_features --adaptation runs/adaptation/results.json

1. Self-alignment (`voxtral-prep --self-align-model mini`): word END times the base gives the held-out sentences of
   its corpus vs the generator's true ones: median and p90 absolute error, and the signed median, in ms.
2. `voxtral-eval probe-anchor`: the anchor and frame offset with the lowest teacher-forced loss (trained: end, +0).
3. Emission latency of the base on the same clips at each delay: when a word appears after it ends (p50 / p90).
4. Training on untimed data: the domain LoRA of benchmarks/adaptation.py once with the true word times and once
   with the times self-alignment gives the untimed clips; the WER difference on the domain test. With
   --adaptation, the true-timing run is read from that benchmark's results (same data, steps and seed).

Writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from adaptation import DELAYS_MS, EVAL_DELAY_MS, adapt, base_test_set, load_adapted, wer
from data_prep.synth_corpus import build_corpus
from voxtral_train import protocol
from voxtral_train.align import self_align_utterances
from voxtral_train.evaluate import evaluate_model, load_for_eval, probe_anchor
from voxtral_train.manifest import read_manifest, write_manifest


def self_alignment_errors(model, tokenizer, clips) -> dict[str, float]:
    untimed = [dataclasses.replace(u, words=None, timing_source=None) for u in clips]
    self_align_utterances(untimed, model, tokenizer, protocol.delay_ms_to_tokens(EVAL_DELAY_MS))
    errors = np.array([1000 * (a.end - t.end) for u, v in zip(clips, untimed) for t, a in zip(u.words, v.words)])
    return {"n_words": int(errors.size), "abs_p50_ms": float(np.percentile(abs(errors), 50)),
            "abs_p90_ms": float(np.percentile(abs(errors), 90)), "signed_p50_ms": float(np.percentile(errors, 50))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--base", default="mini")
    p.add_argument("--clips", type=int, default=100, help="held-out base clips for 1-3")
    p.add_argument("--train-clips", type=int, default=300)
    p.add_argument("--test-clips", type=int, default=100)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--adaptation", type=Path, help="benchmarks/adaptation.py results.json (its LoRA run = true timings)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    started = time.perf_counter()
    out: Path = args.out
    clips = base_test_set(out / "data" / "general_test", args.clips, 30000, 400, args.workers)
    model, tokenizer = load_for_eval(args.base)
    result: dict[str, Any] = {"base": args.base, "clips": len(clips)}

    result["self_alignment"] = self_alignment_errors(model, tokenizer, clips)
    print("self-alignment:", result["self_alignment"])
    rows = probe_anchor(model, tokenizer, clips, EVAL_DELAY_MS)
    best = min(rows, key=lambda r: r["loss"])
    result["probe_anchor"] = {"lowest": {"anchor": best["anchor"], "offset_frames": best["offset_frames"]}, "rows": rows}
    print("probe-anchor lowest:", result["probe_anchor"]["lowest"])
    report = evaluate_model(model, tokenizer, clips, DELAYS_MS, progress=False)
    result["latency"] = {d["delay_ms"]: {"wer": d["wer_norm"], "latency_p50_s": d["latency_p50_s"],
                                         "latency_p90_s": d["latency_p90_s"]} for d in report["delays"]}
    print("latency:", result["latency"])

    domain = out / "data" / "medical"
    build_corpus(domain, "medical", args.train_clips, args.test_clips, seed=0, workers=args.workers)
    untimed_dir = out / "data" / "medical_self_aligned"
    rows_untimed = [dataclasses.replace(u, words=None, timing_source=None) for u in read_manifest(domain / "manifest.jsonl")]
    self_align_utterances(rows_untimed, model, tokenizer, protocol.delay_ms_to_tokens(EVAL_DELAY_MS))
    test = read_manifest(domain / "manifest_eval.jsonl")
    write_manifest(untimed_dir / "manifest.jsonl", rows_untimed)  # audio stays where it is (absolute paths)
    write_manifest(untimed_dir / "manifest_eval.jsonl", test)
    if args.adaptation:
        true_wer = json.loads(args.adaptation.read_text())["methods"]["lora"]["domain_wer"]
    else:
        final, _, _ = adapt("lora", out / "true_timings", args.base, domain, args.steps)
        true_wer = wer(*load_adapted("lora", args.base, final), test)[EVAL_DELAY_MS]
    final, _, _ = adapt("lora", out / "self_aligned", args.base, untimed_dir, args.steps)
    aligned_wer = wer(*load_adapted("lora", args.base, final), test)[EVAL_DELAY_MS]
    result["untimed_training"] = {"true_timings_wer": true_wer, "self_aligned_wer": aligned_wer,
                                  "difference_points": 100 * (aligned_wer - true_wer), "steps": args.steps}
    print("untimed training:", result["untimed_training"])
    result["wall_seconds"] = time.perf_counter() - started
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict[str, Any]) -> str:
    s, a, u = r["self_alignment"], r["probe_anchor"]["lowest"], r["untimed_training"]
    lines = [f"Base `{r['base']}`, {r['clips']} held-out clips of its corpus; {r['date']}.", "",
             f"- self-alignment vs espeak-ng word ends ({s['n_words']} words): |error| p50 {s['abs_p50_ms']:.0f} ms, "
             f"p90 {s['abs_p90_ms']:.0f} ms, signed p50 {s['signed_p50_ms']:+.0f} ms",
             f"- probe-anchor: lowest loss at anchor `{a['anchor']}`, offset {a['offset_frames']:+d} frames "
             f"(trained: `end`, +0)",
             f"- training on untimed domain clips: LoRA domain WER {100 * u['true_timings_wer']:.1f} % with true "
             f"times, {100 * u['self_aligned_wer']:.1f} % with self-aligned times ({u['difference_points']:+.1f} pt)",
             "", "| delay | WER | latency p50 | latency p90 |", "|---|---|---|---|"]
    for delay, d in r["latency"].items():
        p50, p90 = (f"{d[k]:.2f} s" if d[k] is not None else "–" for k in ("latency_p50_s", "latency_p90_s"))
        lines.append(f"| {delay} ms | {100 * d['wer']:.1f} % | {p50} | {p90} |")  # – : no word matched
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Domain adaptation of the embedded mini base: what LoRA, full fine-tuning and LoRA with the encoder unfrozen buy
on a domain the base never heard, and what they cost on the base's own test set.

    python benchmarks/adaptation.py --out runs/adaptation                      # the benchmark (recipes/domain_adaptation)
    python benchmarks/adaptation.py --out /tmp/adapt --train-clips 40 --test-clips 8 --steps 30 --methods lora

The domain is `voxtral-prep synth --domain medical` (data_prep.synth_corpus): two accents and four voice variants
held out of pretraining, faster speech, 20 dB of white noise, and drug names, conditions and procedures the
pretraining text never contains. Its training set (--train-clips, at most 300) and held-out test sentences
(--test-clips) are synthesised into OUT/data/medical; the base's own test set is the held-out split of the
pretraining corpus (the same sentences and voices as recipes/mini_base's `manifest_eval.jsonl`), into
OUT/data/general_test. Each method trains with `voxtral-train +experiment=domain_adaptation` and its overrides,
one after another, on the same data.

`lora_replay` trains on the domain clips plus as many clips of the pretraining corpus's training split (the same
sentences and voices the base saw): what replay does against forgetting. `lora_streams` is LoRA with `data.stream_seconds=30`: consecutive clips played as one stream, so the same batch
budget holds more real audio and fewer pad positions; it shows what stream packing does to held-out WER.

Reports (OUT/results.json and OUT/results.md): normalised WER at 480 ms on the domain test and on the base's test for
the base and each adapted model; forgetting = change of the base-test WER; the first method's WER on the domain test
at every delay from 240 to 2400 ms; each training's wall time and audio seconds trained per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState

from data_prep.synth_corpus import STYLES, build_corpus, jobs_for, sentences, synthesise
from voxtral_train.config import compose_settings
from voxtral_train.evaluate import evaluate_model, load_for_eval
from voxtral_train.manifest import Utterance, read_manifest, write_manifest
from voxtral_train.train import train

# Overrides of each method on top of the recipe (configs/experiment/domain_adaptation.yaml).
METHODS: dict[str, list[str]] = {
    "lora": [],
    "full": ["peft=full", "optim.lr=5.0e-4"],  # every weight moves: a quarter of LoRA's rate keeps the base's skills
    "lora_encoder": ["peft=lora_unfreeze_encoder"],
    # LoRA on streams of consecutive clips (one prompt, one EOS per 30 s): the same steps and batch budget, fewer
    # pad positions, so more real audio per step; does it change the held-out WER?
    "lora_streams": ["data.stream_seconds=30"],
    # LoRA on the domain clips mixed with as many clips of the base's own pretraining data (replay): the classic
    # lever against forgetting; the training manifest is OUT/data/replay (see `replay_manifest`).
    "lora_replay": [],
}
REPLAY_METHODS = {"lora_replay"}
DELAYS_MS = (240, 480, 960, 1600, 2400)
EVAL_DELAY_MS = 480


def base_test_set(out: Path, n: int, base_sentences: int, base_eval: int, workers: int) -> list[Utterance]:
    """The first `n` held-out sentences of the pretraining corpus (`voxtral-prep synth --sentences base_sentences
    --eval-sentences base_eval --seed 0`), with the voices they were drawn there: never seen in pretraining."""
    texts = sentences("general", base_sentences + base_eval, seed=0)[base_sentences:][:n]
    rows = [r for r in synthesise(jobs_for(texts, STYLES["general"], 0, "general_eval"), out / "clips", workers)
            if isinstance(r, Utterance)]
    write_manifest(out / "manifest.jsonl", rows)
    return read_manifest(out / "manifest.jsonl")


def replay_manifest(out: Path, domain: Path, n: int, base_sentences: int, base_eval: int, workers: int) -> Path:
    """OUT/manifest.jsonl: the domain's training rows followed by the first `n` training sentences of the
    pretraining corpus, with the voices they were drawn there (clips the base trained on); returns its folder."""
    texts = sentences("general", base_sentences + base_eval, seed=0)[:n]
    general = [r for r in synthesise(jobs_for(texts, STYLES["general"], 0, "general_train"), out / "clips", workers)
               if isinstance(r, Utterance)]
    write_manifest(out / "manifest.jsonl", [*read_manifest(domain / "manifest.jsonl"), *general])
    write_manifest(out / "manifest_eval.jsonl", read_manifest(domain / "manifest_eval.jsonl"))
    return out


def wer(model, tokenizer, utterances: list[Utterance], delays_ms=(EVAL_DELAY_MS,)) -> dict[int, float]:
    report = evaluate_model(model, tokenizer, utterances, delays_ms, progress=False)
    return {d["delay_ms"]: d["wer_norm"] for d in report["delays"]}


def adapt(method: str, out: Path, base: str, domain: Path, steps: int) -> tuple[Path, float, float]:
    """Train one method; returns (the run's final/ folder, wall seconds, audio seconds trained)."""
    overrides = ["+experiment=domain_adaptation", f"model.path={base}", f"train.output_root={out / 'runs'}",
                 f"train.name={method}", f"data.train_manifest={domain / 'manifest.jsonl'}",
                 f"data.eval_manifest={domain / 'manifest_eval.jsonl'}", f"train.max_steps={steps}",
                 "train.eval_every=0", "train.save_every=0", "data.final_eval_split=none",
                 "logging.progress_bar=false", "logging.tensorboard=false", *METHODS[method]]
    AcceleratorState._reset_state(True)
    started = time.perf_counter()
    try:
        result = train(compose_settings(overrides))
    finally:
        AcceleratorState._reset_state(True)
    seconds = time.perf_counter() - started
    if result.stopped:
        raise RuntimeError(f"{method}: training stopped: {result.stopped}")
    checkpoints = sorted((result.run_dir / "checkpoints").glob("step_*"))
    audio = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["audio_seconds_seen"]
    return result.run_dir / "final", seconds, audio


def load_adapted(method: str, base: str, final: Path):
    if method == "full":
        return load_for_eval(str(final))
    return load_for_eval(base, adapter=str(final))


def run(out: Path, base: str, methods: list[str], train_clips: int, test_clips: int, base_test_clips: int,
        steps: int, base_sentences: int, base_eval: int, workers: int) -> dict[str, Any]:
    if train_clips > 300:
        raise ValueError("the benchmark's domain training set is at most 300 clips")
    started = time.perf_counter()
    domain_dir = out / "data" / "medical"
    corpus = build_corpus(domain_dir, "medical", train_clips, test_clips, seed=0, workers=workers)
    print(f"domain data: {corpus.summary()}")
    domain_test = read_manifest(domain_dir / "manifest_eval.jsonl")
    base_test = base_test_set(out / "data" / "general_test", base_test_clips, base_sentences, base_eval, workers)

    model, tokenizer = load_for_eval(base)
    rows: dict[str, dict[str, Any]] = {"base": {"domain_wer": wer(model, tokenizer, domain_test)[EVAL_DELAY_MS],
                                                "base_test_wer": wer(model, tokenizer, base_test)[EVAL_DELAY_MS]}}
    print(f"base: {rows['base']}")
    per_delay: dict[int, float] = {}
    replay_dir = (replay_manifest(out / "data" / "replay", domain_dir, len(corpus.train), base_sentences, base_eval,
                                  workers) if REPLAY_METHODS & set(methods) else None)
    for i, method in enumerate(methods):
        final, seconds, audio = adapt(method, out, base, replay_dir if method in REPLAY_METHODS else domain_dir, steps)
        model, tokenizer = load_adapted(method, base, final)
        domain = wer(model, tokenizer, domain_test, DELAYS_MS if i == 0 else (EVAL_DELAY_MS,))
        if i == 0:
            per_delay = domain
        rows[method] = {"domain_wer": domain[EVAL_DELAY_MS], "base_test_wer": wer(model, tokenizer, base_test)[EVAL_DELAY_MS],
                        "train_seconds": seconds, "audio_seconds_per_second": audio / seconds, "steps": steps}
        rows[method]["forgetting"] = rows[method]["base_test_wer"] - rows["base"]["base_test_wer"]
        rows[method]["relative_domain_gain"] = 1 - rows[method]["domain_wer"] / max(rows["base"]["domain_wer"], 1e-9)
        print(f"{method}: {rows[method]}")
    result = {
        "base": base, "methods": rows, "per_delay_method": methods[0] if methods else None,
        "per_delay_domain_wer": {str(k): v for k, v in per_delay.items()},
        "data": {"domain_train_clips": len(corpus.train), "domain_test_clips": len(domain_test),
                 "base_test_clips": len(base_test),
                 "domain_train_audio_s": sum(u.duration or 0 for u in corpus.train)},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "load_average_1min_at_end": os.getloadavg()[0]},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_seconds": time.perf_counter() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    rows = result["methods"]
    lines = ["| model | domain test WER | base test WER | forgetting | domain gain (rel.) | train time | audio s/s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if name == "base":
            lines.append(f"| base (`{result['base']}`) | {100 * r['domain_wer']:.1f} % | {100 * r['base_test_wer']:.1f} % "
                         f"| – | – | – | – |")
            continue
        lines.append(f"| {name} ({r['steps']} steps) | {100 * r['domain_wer']:.1f} % | {100 * r['base_test_wer']:.1f} % | "
                     f"{100 * r['forgetting']:+.1f} pt | {100 * r['relative_domain_gain']:.0f} % | "
                     f"{r['train_seconds'] / 60:.1f} min | {r['audio_seconds_per_second']:.1f} |")
    if result["per_delay_domain_wer"]:
        delays = list(result["per_delay_domain_wer"])
        lines += ["", f"Domain test WER of `{result['per_delay_method']}` by delay:", "",
                  "| delay | " + " | ".join(f"{d} ms" for d in delays) + " |", "|---" * (len(delays) + 1) + "|",
                  "| WER | " + " | ".join(f"{100 * v:.1f} %" for v in result["per_delay_domain_wer"].values()) + " |"]
    d = result["data"]
    lines += ["", f"{d['domain_train_clips']} domain training clips ({d['domain_train_audio_s'] / 60:.1f} min of audio), "
              f"{d['domain_test_clips']} domain test clips, {d['base_test_clips']} base test clips; "
              f"{result['machine']['cpus']} CPUs, {result['machine']['torch_threads']} torch threads; {result['date']}; "
              f"whole run {result['wall_seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--base", default="mini", help="the model to adapt (default: the embedded mini base)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--train-clips", type=int, default=300)
    p.add_argument("--test-clips", type=int, default=100)
    p.add_argument("--base-test-clips", type=int, default=100)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per method")
    p.add_argument("--base-sentences", type=int, default=30000, help="--sentences of the base's pretraining corpus")
    p.add_argument("--base-eval-sentences", type=int, default=400, help="--eval-sentences of that corpus")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="synthesis processes")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    run(args.out, args.base, methods, args.train_clips, args.test_clips, args.base_test_clips, args.steps,
        args.base_sentences, args.base_eval_sentences, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput: our step pipeline vs a carefully configured transformers `Trainer`, same model and data.

    python benchmarks/train_throughput.py [--threads 2] [--rounds 3]

Both sides train LoRA (rank 16, decoder projections) on the scaled-proportion model (`benchmarks/ab.py`) over the
bundled speech set (delays 480/960 ms drawn per item and epoch), loading data in the main process
(`StreamingDataset`, num_workers 0), AdamW, lr 1e-4, same precision (fp32 on CPU, bf16 autocast on CUDA with
`--bf16`) and no compilation on either side.
- ours: `LengthBucketSampler` batches (<= 768 padded positions each), the trainer's `StreamingLM` step.
- HF: `Trainer` with `train_sampling_strategy="group_by_length"` (what a careful user sets for speech: similar
  lengths share a batch), batches padded to the longest, the model's own loss from `labels` (HF shifts labels
  itself, so it gets ours unshifted: label[p + 1] = x_{p+1}). Its batch size gives the same number of optimizer
  steps per epoch as ours (same mean global batch).
One process holds both sides. Round 0 warms both up (untimed); every later round runs one epoch of each side, the
order flipping each round, both on the same epoch's delays. Medians over rounds with min-max; a shared machine
moves absolute times, so the per-round ratio is the comparable number. Audio-seconds count real audio only (the
clip, not the stream's pad positions).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
from ab import (
    MAX_POSITIONS_PER_BATCH,
    bundled_train_set,
    lora_step,
    machine_line,
    pin_threads,
    scaled_lora_model,
    spread,
    streaming_lm,
    turns,
)
from torch.utils.data import DataLoader

from voxtral_train.batching import LengthBucketSampler
from voxtral_train.dataset import StreamingDataset, collate
from voxtral_train.protocol import IGNORE_INDEX
from voxtral_train.tokenizer import StreamingTokenizer

HF_KEYS = ("input_features", "input_ids", "num_delay_tokens")


class Meter:
    """Counts what one epoch's batches hold: samples, real and padded positions, real audio seconds."""

    def __init__(self) -> None:
        self.samples = self.real = self.padded = self.steps = 0
        self.audio_seconds = 0.0

    def add(self, batch: dict[str, Any]) -> None:
        self.steps += 1
        self.samples += len(batch["n_positions"])
        self.real += int(batch["n_positions"].sum())
        self.padded += batch["input_ids"].numel()
        self.audio_seconds += float(batch["audio_seconds"].sum())  # the clips' own length, no stream pads

    def report(self, seconds: float) -> dict[str, float]:
        return {"seconds": seconds, "steps": self.steps, "samples_per_s": self.samples / seconds,
                "positions_per_s": self.padded / seconds, "real_positions_per_s": self.real / seconds,
                "audio_seconds_per_s": self.audio_seconds / seconds, "padding_fraction": 1 - self.real / self.padded,
                "mean_batch": self.samples / self.steps}


def bucket_sampler(data: StreamingDataset) -> LengthBucketSampler:
    return LengthBucketSampler(data.lengths_in_positions, MAX_POSITIONS_PER_BATCH, seed=0)


def unshifted(labels: torch.Tensor) -> torch.Tensor:
    """Our labels are pre-shifted (labels[p] = x_{p+1}); HF's causal-LM loss shifts itself: hand it x at p + 1."""
    return torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels[:, :-1]], dim=1)


def ours(data: StreamingDataset, bf16: bool) -> Callable[[int], dict[str, float]]:
    """A function epoch -> that epoch's report, training our pipeline on `data`."""
    sampler = bucket_sampler(data)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    model = scaled_lora_model()
    lm = streaming_lm(model, data.tokenizer.ids.streaming_pad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    def epoch(e: int) -> dict[str, float]:
        sampler.set_epoch(e)
        data.set_epoch(e)
        meter, started = Meter(), time.perf_counter()
        for batch in loader:
            meter.add(batch)
            on_device = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            autocast = torch.autocast(device, torch.bfloat16) if bf16 else contextlib.nullcontext()
            with autocast:
                lora_step(lm, optimizer, on_device)
        if device == "cuda":
            torch.cuda.synchronize()
        return meter.report(time.perf_counter() - started)

    return epoch


def hf(data: StreamingDataset, batch_size: int, bf16: bool) -> Callable[[int], dict[str, float]]:
    """A function epoch -> that epoch's report, training on `data` with one `Trainer.train()` call per epoch."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = scaled_lora_model()
    model.config.use_cache = False
    meters: list[Meter] = []

    def hf_collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(items)
        meters[-1].add(batch)
        return {**{key: batch[key] for key in HF_KEYS}, "labels": unshifted(batch["labels"])}

    class EpochTimer(TrainerCallback):
        """Times the epoch itself, not Trainer's set-up before it (its length pass over the data)."""

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.started

    timer = EpochTimer()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = TrainingArguments(output_dir="/tmp/hf_throughput", per_device_train_batch_size=batch_size,
                             num_train_epochs=1, train_sampling_strategy="group_by_length", bf16=bf16,
                             logging_strategy="no", save_strategy="no", report_to=[],
                             use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                             remove_unused_columns=False, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=hf_collate, callbacks=[timer],
                      optimizers=(optimizer, constant))

    def epoch(e: int) -> dict[str, float]:
        data.set_epoch(e)
        meters.append(Meter())
        trainer.train()
        return meters[-1].report(timer.seconds)

    return epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one epoch per side each)")
    parser.add_argument("--items", type=int, default=None, help="first N bundled clips only (default: all 56)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (CUDA)")
    args = parser.parse_args()
    pin_threads(args.threads)
    print("before:", machine_line())
    tokenizer = StreamingTokenizer.tiny()
    n_items = len(bundled_train_set(tokenizer, args.items))
    n_batches = len(bucket_sampler(bundled_train_set(tokenizer, args.items)).epoch_batches(1))
    batch_size = -(-n_items // n_batches)  # same optimizer steps per epoch as ours
    sides = {"ours (bucketed)": ours(bundled_train_set(tokenizer, args.items), args.bf16),
             "HF Trainer (group_by_length)": hf(bundled_train_set(tokenizer, args.items), batch_size, args.bf16)}
    reports: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for name in turns(list(sides), 0):  # warm-up round
        sides[name](0)
    for r in range(1, args.rounds + 1):
        for name in turns(list(sides), r):
            reports[name].append(sides[name](r))
            print(f"round {r} {name}: {reports[name][-1]['seconds']:.1f} s; {machine_line()}", flush=True)
    print("after: ", machine_line())
    a, b = reports
    print(f"{n_items} clips, HF batch size {batch_size}; {args.rounds} timed rounds; median (min-max)")
    print(f"{'':<24}{a:>24}{b:>32}{'ratio per round':>26}")
    for key in ("samples_per_s", "real_positions_per_s", "positions_per_s", "audio_seconds_per_s",
                "padding_fraction", "mean_batch", "steps", "seconds"):
        va, vb = [rep[key] for rep in reports[a]], [rep[key] for rep in reports[b]]
        ratios = [x / y if y else float("nan") for x, y in zip(va, vb)]
        print(f"{key:<24}{spread(va, '.3f'):>24}{spread(vb, '.3f'):>32}{spread(ratios):>26}")


if __name__ == "__main__":
    main()

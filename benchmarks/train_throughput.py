"""Training throughput: our step pipeline vs a plain transformers `Trainer` with naive padding, same model and data.

    python benchmarks/train_throughput.py [--threads 2] [--epochs 2]

Both sides train LoRA (rank 16, decoder projections) on the scaled-proportion model of benchmarks/embedding_cache.py
over the bundled speech set (delays 480/960 ms drawn per item and epoch), loading data in the main process
(`StreamingDataset`, num_workers 0), AdamW, lr 1e-4, for `--epochs` epochs; the last epoch is timed.
- ours: `LengthBucketSampler` batches (<= 768 padded positions each), the chunked streaming loss from hidden states.
- HF: `Trainer` with its random sampler, fixed batches padded to the longest item, and the model's own loss from
  `labels` (HF shifts labels itself, so it gets our labels unshifted: label[p + 1] = x_{p+1}).
The HF batch size is the one that gives the same number of optimizer steps per epoch as ours (same mean global
batch). Each side runs in its own process so that its peak RSS (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from typing import Any

import torch
from embedding_cache import DELAYS_MS, MAX_POSITIONS_PER_BATCH, lora_step, plain_inputs, scaled_lora_model
from torch.utils.data import DataLoader

from voxtral_train.batching import LengthBucketSampler
from voxtral_train.dataset import StreamingDataset, collate
from voxtral_train.delays import DelaySampler
from voxtral_train.manifest import bundled_manifest_path, read_manifest
from voxtral_train.protocol import IGNORE_INDEX
from voxtral_train.tokenizer import StreamingTokenizer

HF_KEYS = ("input_features", "input_ids", "num_delay_tokens")


class Meter:
    """Counts what one epoch's batches hold: samples, real and padded positions, audio seconds."""

    def __init__(self) -> None:
        self.samples = self.real = self.padded = 0
        self.audio_seconds = 0.0

    def add(self, batch: dict[str, Any]) -> None:
        self.samples += len(batch["n_positions"])
        self.real += int(batch["n_positions"].sum())
        self.padded += batch["input_ids"].numel()
        self.audio_seconds += float(batch["audio_seconds"].sum())

    def report(self, seconds: float, steps: int) -> dict[str, float]:
        return {"seconds": seconds, "steps": steps, "samples_per_s": self.samples / seconds,
                "positions_per_s": self.padded / seconds, "real_positions_per_s": self.real / seconds,
                "audio_seconds_per_s": self.audio_seconds / seconds, "padding_fraction": 1 - self.real / self.padded,
                "mean_batch": self.samples / steps}


def dataset(tokenizer: StreamingTokenizer) -> StreamingDataset:
    return StreamingDataset(read_manifest(bundled_manifest_path("train")), tokenizer, DelaySampler.choices(DELAYS_MS))


def bucket_sampler(data: StreamingDataset) -> LengthBucketSampler:
    return LengthBucketSampler(data.lengths_in_positions, MAX_POSITIONS_PER_BATCH, seed=0)


def run_ours(epochs: int) -> dict[str, float]:
    tokenizer = StreamingTokenizer.tiny()
    data = dataset(tokenizer)
    sampler = bucket_sampler(data)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    model = scaled_lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        data.set_epoch(epoch)
        meter, started, steps = Meter(), time.perf_counter(), 0
        for batch in loader:
            meter.add(batch)
            lora_step(model, optimizer, plain_inputs(batch), batch["labels"], tokenizer.ids.streaming_pad)
            steps += 1
    return meter.report(time.perf_counter() - started, steps)


def unshifted(labels: torch.Tensor) -> torch.Tensor:
    """Our labels are pre-shifted (labels[p] = x_{p+1}); HF's causal-LM loss shifts itself: hand it x at p + 1."""
    return torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels[:, :-1]], dim=1)


def run_hf(epochs: int, batch_size: int) -> dict[str, float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    tokenizer = StreamingTokenizer.tiny()
    data = dataset(tokenizer)
    model = scaled_lora_model()
    model.config.use_cache = False
    meter_of_epoch: list[Meter] = []

    def hf_collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(items)  # pads to the longest item of a random batch
        meter_of_epoch[-1].add(batch)
        return {**{key: batch[key] for key in HF_KEYS}, "labels": unshifted(batch["labels"])}

    class EpochTimer(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            data.set_epoch(len(meter_of_epoch))
            meter_of_epoch.append(Meter())
            self.started, self.step0 = time.perf_counter(), state.global_step

        def on_epoch_end(self, args, state, control, **kwargs):
            self.seconds, self.steps = time.perf_counter() - self.started, state.global_step - self.step0

    timer = EpochTimer()
    args = TrainingArguments(output_dir="/tmp/hf_throughput", per_device_train_batch_size=batch_size,
                             num_train_epochs=epochs, learning_rate=1e-4, optim="adamw_torch", lr_scheduler_type="constant",
                             logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, remove_unused_columns=False, seed=0, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, data_collator=hf_collate, callbacks=[timer]).train()
    return meter_of_epoch[-1].report(timer.seconds, timer.steps)


def side_in_subprocess(side: str, epochs: int, threads: int, batch_size: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--side", side, "--epochs", str(epochs), "--threads", str(threads),
               "--hf-batch-size", str(batch_size)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per side; the last one is timed")
    parser.add_argument("--side", choices=["ours", "hf"], help="(internal) run one side and print its JSON")
    parser.add_argument("--hf-batch-size", type=int, default=0, help="(internal) HF per-device batch size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.side:
        result = run_ours(args.epochs) if args.side == "ours" else run_hf(args.epochs, args.hf_batch_size)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    data = dataset(StreamingTokenizer.tiny())
    sampler = bucket_sampler(data)
    n_batches = len(sampler.epoch_batches(args.epochs - 1))
    batch_size = math.ceil(len(data) / n_batches)  # same optimizer steps per epoch as ours
    results = {side: side_in_subprocess(side, args.epochs, args.threads, batch_size) for side in ("ours", "hf")}
    print(f"{'':<28}{'ours (bucketed)':>18}{'HF Trainer (naive)':>20}{'ratio':>8}")
    for key in ("samples_per_s", "positions_per_s", "real_positions_per_s", "audio_seconds_per_s",
                "padding_fraction", "mean_batch", "steps", "seconds", "peak_rss_mb"):
        ours, hf = results["ours"][key], results["hf"][key]
        print(f"{key:<28}{ours:>18.3f}{hf:>20.3f}{ours / hf if hf else float('nan'):>8.2f}")


if __name__ == "__main__":
    main()

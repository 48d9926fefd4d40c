"""LoRA step time with and without the frozen-encoder audio-embedding cache, against its FLOP bound.

    python benchmarks/embedding_cache.py [--threads 2] [--passes 3]

Model: the real architecture scaled down with the real proportions (`scaled_config`: encoder 320 x 8 layers,
decoder 768 x 6, vocabulary 8192; encoder:decoder linear weights 0.34 vs 0.32 in the real model, lm_head:decoder
0.14 vs 0.13). Data: the bundled speech set, delays 480/960 ms drawn per item and epoch, length-bucketed batches.
Both sides run the trainer's step (`StreamingLM`, the cached side with `audio_embeds`), each with its own model and
optimizer. Epoch 0 warms both up (and fills the cache); then `--passes` passes over epoch 1 (cache warm, delays
redrawn) are timed batch by batch, the two sides taking turns on every batch (the order flips each batch), so a
load burst hits both alike. The cached side's time includes hashing the features and reading the entries back.
The encoder + adapter forward alone is timed in the same rotation: uncached ≈ cached + encoder forward is the check.
The bound is the ratio of the two modes' step FLOPs for these very batches (`voxtral_train.flops`; the fused loss
recomputes nothing): the cache cannot beat it on hardware where every FLOP costs the same.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from ab import (
    DELAYS_MS,
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
from transformers import VoxtralRealtimeConfig

from voxtral_train import flops, protocol
from voxtral_train.batching import LengthBucketSampler
from voxtral_train.dataset import collate
from voxtral_train.embedding_cache import AudioEmbeddingCache, inner_model
from voxtral_train.model import scaled_config
from voxtral_train.tokenizer import StreamingTokenizer


def bundled_batches(tokenizer: StreamingTokenizer, epochs: int, max_positions: int,
                    items: int | None = None) -> list[list[dict[str, Any]]]:
    """Collated batches of each epoch of the bundled set, as the training loop's sampler orders them."""
    data = bundled_train_set(tokenizer, items)
    sampler = LengthBucketSampler(data.lengths_in_positions, max_positions, seed=0)
    out = []
    for epoch in range(epochs):
        data.set_epoch(epoch)
        out.append([collate([data[i] for i in batch]) for batch in sampler.epoch_batches(epoch)])
    return out


class Side:
    """One way of running a batch: `step(batch)` does the work, `seconds[pass][batch]` records it."""

    def __init__(self, name: str, step: Callable[[dict], None]) -> None:
        self.name, self.step = name, step
        self.seconds: list[list[float]] = []

    def timed(self, batch: dict) -> None:
        started = time.perf_counter()
        self.step(batch)
        self.seconds[-1].append(time.perf_counter() - started)

    def pass_totals(self) -> list[float]:
        return [sum(p) for p in self.seconds]


def time_alternating(sides: list[Side], epoch: list[dict], passes: int) -> None:
    """`passes` passes over `epoch`; on every batch each side runs once, the order rotating per batch."""
    for p in range(passes):
        for side in sides:
            side.seconds.append([])
        for b, batch in enumerate(epoch):
            for side in turns(sides, p * len(epoch) + b):
                side.timed(batch)


def flop_bound(config: VoxtralRealtimeConfig, batches: list[dict]) -> tuple[float, float]:
    """(LoRA, LoRA-cached) step FLOPs summed over the batches' padded positions."""
    totals = []
    for mode in ("lora", "lora_cached"):
        total = 0.0
        for batch in batches:
            b, p = batch["input_ids"].shape
            total += flops.step_flops(config, p, mode).hardware * b * p  # the fused loss recomputes nothing
        totals.append(total)
    return totals[0], totals[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3, help="timed passes over epoch 1 (medians reported)")
    parser.add_argument("--items", type=int, default=None, help="first N bundled clips only (default: all 56)")
    args = parser.parse_args()
    pin_threads(args.threads)
    print("before:", machine_line())
    tokenizer = StreamingTokenizer.tiny()
    pad_id = tokenizer.ids.streaming_pad
    epochs = bundled_batches(tokenizer, 2, MAX_POSITIONS_PER_BATCH, args.items)
    config = scaled_config()
    params = flops.linear_params(config)
    positions = sum(b["input_ids"].numel() for b in epochs[-1])
    print(f"model: encoder {params.encoder / 1e6:.1f} M, decoder {params.decoder / 1e6:.1f} M, lm_head "
          f"{params.lm_head / 1e6:.1f} M linear weights; epoch: {len(epochs[-1])} batches, {positions} positions")

    plain_model, cached_model = scaled_lora_model(), scaled_lora_model()
    plain_lm, cached_lm = streaming_lm(plain_model, pad_id), streaming_lm(cached_model, pad_id)

    def optimizer_of(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    plain_opt, cached_opt = optimizer_of(plain_model), optimizer_of(cached_model)
    with tempfile.TemporaryDirectory() as root:
        cache = AudioEmbeddingCache(root, cached_model, protocol.delay_ms_to_tokens(max(DELAYS_MS)))

        def cached_step(batch: dict) -> None:
            audio = cache.embeddings_for(batch["input_features"], batch["n_positions"], batch["num_delay_tokens"])
            lora_step(cached_lm, cached_opt, batch, audio_embeds=audio)

        @torch.no_grad()
        def encoder_forward(batch: dict) -> None:
            inner_model(plain_model).get_audio_features(input_features=batch["input_features"])

        sides = [Side("LoRA", lambda batch: lora_step(plain_lm, plain_opt, batch)),
                 Side("LoRA + cache", cached_step), Side("encoder + adapter forward", encoder_forward)]
        time_alternating(sides, epochs[0], 1)  # warm-up: fills the cache, first-call allocations
        for side in sides:
            side.seconds.clear()
        hits_before = cache.stats.hits
        time_alternating(sides, epochs[-1], args.passes)
        timed_hits = cache.stats.hits - hits_before
    plain, cached, encoder = sides
    print("after: ", machine_line())

    lora, lora_cached = flop_bound(config, epochs[-1])
    bound = lora / lora_cached
    epoch_ratios = [a / b for a, b in zip(plain.pass_totals(), cached.pass_totals())]
    batch_ratios = [a / b for pa, pc in zip(plain.seconds, cached.seconds) for a, b in zip(pa, pc)]
    residual = [a - b - e for pa, pc, pe in zip(plain.seconds, cached.seconds, encoder.seconds)
                for a, b, e in zip(pa, pc, pe)]
    items = sum(b["input_ids"].shape[0] for b in epochs[-1]) * args.passes
    print(f"cache hits in the timed passes: {timed_hits} of {items} clips")
    for side in sides:
        print(f"{side.name:<28} epoch seconds, median (min-max) of {args.passes} passes: {spread(side.pass_totals())}")
    print(f"speed-up per epoch {spread(epoch_ratios)}x, per batch {spread(batch_ratios)}x; FLOP bound {bound:.2f}x "
          f"({lora / positions / 1e6:.0f} vs {lora_cached / positions / 1e6:.0f} MFLOP per position); median epoch "
          f"speed-up = {100 * statistics.median(epoch_ratios) / bound:.0f} % of the bound")
    print(f"uncached - cached - encoder forward, per batch: {spread(residual, '.3f')} s")
    print(f"achieved GFLOP/s (median epochs): LoRA step {lora / statistics.median(plain.pass_totals()) / 1e9:.1f}, "
          f"cached step {lora_cached / statistics.median(cached.pass_totals()) / 1e9:.1f}")


if __name__ == "__main__":
    main()

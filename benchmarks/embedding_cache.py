"""LoRA epoch time with and without the frozen-encoder audio-embedding cache, against the FLOP bound.

    python benchmarks/embedding_cache.py [--threads 2] [--repeats 2]

Model: the real architecture scaled down with the real proportions (`scaled_config`: encoder 320 x 8 layers,
decoder 768 x 6, vocabulary 8192; encoder:decoder linear weights 0.34 vs 0.32 in the real model, lm_head:decoder
0.14 vs 0.13). Data: the bundled speech set, delays 480/960 ms drawn per item and epoch, length-bucketed batches.
Epoch 0 warms up (and fills the cache); epoch 1 is timed (cache warm, delays redrawn). Batches are collated before
timing, so both sides time the model step only (in training, DataLoader workers overlap the data work); the cached
side's timing includes hashing the features and reading the entries back from disk.
The bound is the ratio of the step FLOPs of the two modes for these very batches (`voxtral_train.flops`, with the
checkpointed loss chunks' recomputation): the cache cannot beat it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any, Callable

import torch
from transformers import VoxtralRealtimeConfig, VoxtralRealtimeForConditionalGeneration

from voxtral_train import flops
from voxtral_train.batching import LengthBucketSampler
from voxtral_train.config import PeftSettings
from voxtral_train.dataset import StreamingDataset, collate
from voxtral_train.delays import DelaySampler
from voxtral_train.embedding_cache import AudioEmbeddingCache, cached_model_inputs, inner_model
from voxtral_train.loss import streaming_loss_sums
from voxtral_train.manifest import bundled_manifest_path, read_manifest
from voxtral_train.model import scaled_config
from voxtral_train.patches import apply_training_fixes
from voxtral_train.tokenizer import StreamingTokenizer
from voxtral_train.trainable import apply_trainable_policy

DELAYS_MS = (480, 960)
MAX_POSITIONS_PER_BATCH = 768


def scaled_lora_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = scaled_config()
    config._attn_implementation = "sdpa"
    model = apply_training_fixes(VoxtralRealtimeForConditionalGeneration(config))
    return apply_trainable_policy(model, PeftSettings(rank=16, alpha=32, dropout=0.0))


def bundled_batches(tokenizer: StreamingTokenizer, epochs: int, max_positions: int,
                    bucketing: bool = True) -> list[list[dict[str, Any]]]:
    """Collated batches of each epoch of the bundled set, as the training loop's sampler orders them."""
    data = StreamingDataset(read_manifest(bundled_manifest_path("train")), tokenizer, DelaySampler.choices(DELAYS_MS))
    sampler = LengthBucketSampler(data.lengths_in_positions, max_positions, seed=0, bucketing=bucketing)
    out = []
    for epoch in range(epochs):
        data.set_epoch(epoch)
        out.append([collate([data[i] for i in batch]) for batch in sampler.epoch_batches(epoch)])
    return out


def lora_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any],
              labels: torch.Tensor, pad_id: int) -> float:
    """Forward, our chunked streaming loss, backward, AdamW step."""
    hidden = inner_model(model)(**kwargs).last_hidden_state
    sums = streaming_loss_sums(hidden, model.get_base_model().lm_head, labels, pad_id, pad_weight=0.5,
                               text_weight=1.0)
    loss = sums.weighted / sums.weight
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def plain_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {"input_ids": batch["input_ids"], "input_features": batch["input_features"],
            "num_delay_tokens": batch["num_delay_tokens"], "use_cache": False}


class Side:
    """One way of running the step: its own model and optimizer, warmed up on all epochs but the last."""

    def __init__(self, name: str, inputs_of: Callable[[torch.nn.Module, dict], dict], epochs: list[list[dict]],
                 pad_id: int) -> None:
        self.name, self.inputs_of, self.pad_id = name, inputs_of, pad_id
        self.model = scaled_lora_model()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.best = float("inf")
        self.run(b for epoch in epochs[:-1] for b in epoch)

    def run(self, batches) -> float:
        started = time.perf_counter()
        for batch in batches:
            lora_step(self.model, self.optimizer, self.inputs_of(self.model, batch), batch["labels"], self.pad_id)
        return time.perf_counter() - started

    def time(self, epoch: list[dict]) -> None:
        self.best = min(self.best, self.run(epoch))


def time_sides(sides: list[Side], epoch: list[dict], repeats: int) -> None:
    """Timed passes over `epoch`, the sides taking turns so that a busy machine slows both alike; fastest kept."""
    for _ in range(repeats):
        for side in sides:
            side.time(epoch)


@torch.no_grad()
def audio_forward_seconds(model: torch.nn.Module, epoch: list[dict]) -> float:
    """Encoder + adapter forward alone over the epoch: what the cache removes from each step."""
    started = time.perf_counter()
    for batch in epoch:
        inner_model(model).get_audio_features(input_features=batch["input_features"])
    return time.perf_counter() - started


def flop_bound(config: VoxtralRealtimeConfig, batches: list[dict]) -> tuple[float, float]:
    """(LoRA, LoRA-cached) step FLOPs summed over the batches' padded positions."""
    totals = []
    for mode in ("lora", "lora_cached"):
        total = 0.0
        for batch in batches:
            b, p = batch["input_ids"].shape
            total += flops.step_flops(config, p, mode, checkpointed_loss_chunks=True).hardware * b * p
        totals.append(total)
    return totals[0], totals[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the second epoch (fastest kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = StreamingTokenizer.tiny()
    pad_id = tokenizer.ids.streaming_pad
    epochs = bundled_batches(tokenizer, 2, MAX_POSITIONS_PER_BATCH)
    config = scaled_config()
    params = flops.linear_params(config)
    positions = sum(b["input_ids"].numel() for b in epochs[-1])
    print(f"model: encoder {params.encoder / 1e6:.1f} M, decoder {params.decoder / 1e6:.1f} M, lm_head "
          f"{params.lm_head / 1e6:.1f} M linear weights; epoch: {len(epochs[-1])} batches, {positions} positions")

    with tempfile.TemporaryDirectory() as root:
        caches: list[AudioEmbeddingCache] = []

        def cached(model: torch.nn.Module, batch: dict) -> dict:
            if not caches:
                caches.append(AudioEmbeddingCache(root, model, max(DELAYS_MS) // 80))
            return cached_model_inputs(model, batch, caches[0])

        plain = Side("LoRA", lambda model, batch: plain_inputs(batch), epochs, pad_id)
        with_cache = Side("LoRA + cache", cached, epochs, pad_id)
        time_sides([plain, with_cache], epochs[-1], args.repeats)
        audio_seconds = min(audio_forward_seconds(plain.model, epochs[-1]) for _ in range(args.repeats))
        hit_rate = caches[0].stats.hit_rate

    lora, lora_cached = flop_bound(config, epochs[-1])
    bound = lora / lora_cached
    speedup = plain.best / with_cache.best
    fwd = [flops.forward_flops(config, b["input_ids"].shape[1]) for b in epochs[-1]]
    audio_flops = sum(f.audio * b["input_ids"].numel() for f, b in zip(fwd, epochs[-1]))
    print(f"LoRA epoch {plain.best:.2f} s, with cache {with_cache.best:.2f} s (cache hit rate over all passes "
          f"{hit_rate:.2f})")
    print(f"speed-up {speedup:.2f}x; FLOP bound {bound:.2f}x ({lora / positions / 1e6:.0f} vs "
          f"{lora_cached / positions / 1e6:.0f} MFLOP per position); {100 * speedup / bound:.0f} % of the bound")
    print(f"achieved GFLOP/s: LoRA step {lora / plain.best / 1e9:.1f}, cached step "
          f"{lora_cached / with_cache.best / 1e9:.1f}, encoder + adapter forward alone "
          f"{audio_flops / audio_seconds / 1e9:.1f} ({audio_seconds:.2f} s per epoch)")


if __name__ == "__main__":
    main()

"""What every A/B benchmark here shares, so that a sceptic can trust the ratio it prints.

- `pin_threads`: the same intra-op thread count for every side (and one interop thread), printed.
- `machine_line`: CPU / GPU, torch version and the load average, printed before and after the runs: a shared
  machine's load moves absolute times by 2-4x, so the ratio of sides that take turns is the comparable number.
- `turns`: the order in which two (or more) sides run in round r - they alternate (ABBA...), so a load burst or a
  thermal drift hits both alike instead of one.
- `spread`: median with min-max, never the fastest of N (the fastest pass under bursty load favours the shorter side).
- `scaled_lora_model` / `lora_step`: the scaled-proportion model with LoRA and the trainer's own step
  (`StreamingLM`: forward + chunked loss), which the benchmarks time.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from transformers import VoxtralRealtimeForConditionalGeneration

from voxtral_train.config import PeftSettings
from voxtral_train.dataset import StreamingDataset
from voxtral_train.delays import DelaySampler
from voxtral_train.loss import STAT_NAMES
from voxtral_train.manifest import bundled_manifest_path, read_manifest
from voxtral_train.model import scaled_config
from voxtral_train.patches import apply_training_fixes
from voxtral_train.streaming_lm import StreamingLM
from voxtral_train.tokenizer import StreamingTokenizer
from voxtral_train.trainable import apply_trainable_policy

DELAYS_MS = (480, 960)
MAX_POSITIONS_PER_BATCH = 768
LORA = PeftSettings(rank=16, alpha=32, dropout=0.0)


def pin_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def machine_line() -> str:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{device}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
            f"load average (1, 5, 15 min) {load}")


def turns(sides: Sequence[Any], round_index: int) -> list[Any]:
    """The sides in round `round_index`'s order: as given in even rounds, reversed in odd ones."""
    return list(sides) if round_index % 2 == 0 else list(reversed(sides))


def spread(values: Sequence[float], fmt: str = ".2f") -> str:
    """'median (min-max)' of the values."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def bundled_train_set(tokenizer: StreamingTokenizer, items: int | None = None) -> StreamingDataset:
    """The bundled training clips (the first `items` of them: shorter runs on a loaded machine), delays 480/960 ms
    drawn per item and epoch."""
    return StreamingDataset(read_manifest(bundled_manifest_path("train"))[:items], tokenizer,
                            DelaySampler.choices(DELAYS_MS))


def scaled_lora_model(seed: int = 0) -> torch.nn.Module:
    """The real architecture at 1/4 width with the real cost proportions (`scaled_config`), LoRA rank 16."""
    torch.manual_seed(seed)
    config = scaled_config()
    config._attn_implementation = "sdpa"
    model = apply_training_fixes(VoxtralRealtimeForConditionalGeneration(config))
    return apply_trainable_policy(model, LORA)


def streaming_lm(model: torch.nn.Module, pad_id: int) -> StreamingLM:
    """The trainer's model + loss with the recipes' default weights (pad targets weigh 0.5)."""
    return StreamingLM(model, pad_id, pad_weight=0.5, text_weight=1.0)


def lora_step(lm: StreamingLM, optimizer: torch.optim.Optimizer, batch: dict[str, Any],
              audio_embeds: torch.Tensor | None = None) -> None:
    """One training step as `voxtral_train.train` runs it: StreamingLM forward (features, or cached audio
    embeddings), normalised weighted loss, backward, AdamW step."""
    inputs = {key: batch[key] for key in ("input_ids", "labels", "num_delay_tokens")}
    if audio_embeds is None:
        inputs["input_features"] = batch["input_features"]
    weighted, stats = lm(**inputs, audio_embeds=audio_embeds)
    (weighted / stats[STAT_NAMES.index("weight")].clamp_min(1e-12)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

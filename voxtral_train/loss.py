"""The streaming loss: teacher-forced cross-entropy over every scored position of the 80 ms stream.

Two kinds of targets, weighted separately: `[STREAMING_PAD]` ("nothing new yet", most of the stream) and text
(`[STREAMING_WORD]`, word pieces, EOS). The logits are computed in chunks of scored positions from the final hidden
states through the (tied) lm_head, each chunk under activation checkpointing, so the full [B, P, vocab] fp32
logits never exist (131072 x 4 bytes = 0.5 MB per position on the real model) - neither forward nor backward.

Normalisation: every function returns *sums*. The step divides the summed weighted loss by the weight of all targets
in the whole accumulation window across all ranks (counted before the window runs), so a step's gradient does not
depend on how its batch was split into micro-batches or processes (`backward_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from voxtral_train.protocol import IGNORE_INDEX


@dataclass
class LossSums:
    """Sums over one micro-batch. `weighted` carries the gradient; the rest are detached statistics."""

    weighted: torch.Tensor  # sum of weight * CE (+ z-loss), the training objective before normalisation
    weight: torch.Tensor  # sum of target weights
    pad_ce: torch.Tensor  # CE summed over [STREAMING_PAD] targets
    pad_count: torch.Tensor
    text_ce: torch.Tensor  # CE summed over text targets
    text_count: torch.Tensor
    text_correct: torch.Tensor  # text targets predicted exactly (argmax)
    text_as_pad: torch.Tensor  # text targets where the model predicted [STREAMING_PAD] (a "blank rut")

    def stats(self) -> torch.Tensor:
        """The detached statistics as one vector, for a single all-reduce."""
        return torch.stack([getattr(self, f.name).detach().float() for f in fields(self)])


STAT_NAMES = tuple(f.name for f in fields(LossSums))


def target_weights(labels: torch.Tensor, pad_id: int, pad_weight: float, text_weight: float) -> torch.Tensor:
    """[B, P] float weights: pad_weight on [STREAMING_PAD] targets, text_weight on the rest, 0 where ignored."""
    weights = torch.where(labels == pad_id, pad_weight, text_weight).float()
    return weights.masked_fill(labels == IGNORE_INDEX, 0.0)


def _chunk_sums(project: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor,
                weights: torch.Tensor, pad_id: int, z_loss: float) -> tuple[torch.Tensor, ...]:
    """Sums for n scored positions: hidden [n, D], labels [n], weights [n]."""
    logits = project(hidden).float()  # [n, V], the only logits alive at a time
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(-1, labels[:, None]).squeeze(-1)
    weighted = (weights * ce).sum()
    if z_loss:
        weighted = weighted + z_loss * (weights * lse.square()).sum()
    with torch.no_grad():
        is_pad = labels == pad_id
        is_text = ~is_pad
        predicted = logits.argmax(dim=-1)
        return (
            weighted,
            (ce * is_pad).sum(),
            (ce * is_text).sum(),
            (is_text & (predicted == labels)).sum().float(),
            (is_text & (predicted == pad_id)).sum().float(),
        )


def streaming_loss_sums(hidden: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                        pad_id: int, *, pad_weight: float, text_weight: float, z_loss: float = 0.0,
                        chunk_positions: int = 1024, min_chunks: int = 0) -> LossSums:
    """Loss sums of a micro-batch from the final hidden states [B, P, D] and labels [B, P] (already shifted:
    position p is scored against labels[p]). `project` maps [n, D] -> [n, V] (the tied lm_head).
    `min_chunks` pads with empty chunks: under ZeRO-3 every rank must call `project` equally often."""
    weights = target_weights(labels, pad_id, pad_weight, text_weight)
    scored = labels != IGNORE_INDEX
    flat_hidden = hidden[scored]  # [n, D]: only positions that are scored ever meet the vocabulary
    flat_labels = labels[scored]
    flat_weights = weights[scored]
    parts = []
    for chunk in range(max(math.ceil(flat_labels.numel() / chunk_positions), min_chunks)):
        start, end = chunk * chunk_positions, (chunk + 1) * chunk_positions
        args = (flat_hidden[start:end], flat_labels[start:end], flat_weights[start:end])
        if torch.is_grad_enabled():  # recompute the chunk's logits in backward instead of keeping them
            parts.append(checkpoint(_chunk_sums, project, *args, pad_id, z_loss, use_reentrant=False))
        else:
            parts.append(_chunk_sums(project, *args, pad_id, z_loss))
    zero = hidden.new_zeros((), dtype=torch.float32)
    weighted, pad_ce, text_ce, correct, as_pad = (sum((p[i] for p in parts), zero) for i in range(5))
    is_pad = flat_labels == pad_id
    return LossSums(
        weighted=weighted,
        weight=flat_weights.sum(),
        pad_ce=pad_ce,
        pad_count=is_pad.sum().float(),
        text_ce=text_ce,
        text_count=(~is_pad).sum().float(),
        text_correct=correct,
        text_as_pad=as_pad,
    )


def backward_scale(global_weight: float | torch.Tensor, accumulation_steps: int, world_size: int) -> torch.Tensor:
    """Factor turning a micro-batch's summed loss into what `accelerator.backward` needs.

    accelerate (and DeepSpeed) divide the loss by the accumulation steps and average gradients over ranks; we want
    the gradient of sum(all weighted CE in the window, all ranks) / global_weight, so we multiply both back.
    A tensor on the device in, a tensor out: the training loop never waits for the value.
    """
    return accumulation_steps * world_size / torch.as_tensor(global_weight, dtype=torch.float32).clamp_min(1e-12)


def summarize(stats: torch.Tensor) -> dict[str, float]:
    """Readable metrics from summed statistics (possibly summed over micro-batches and ranks)."""
    s = dict(zip(STAT_NAMES, stats.tolist()))
    return {
        "loss": s["weighted"] / max(s["weight"], 1e-12),
        "pad_loss": s["pad_ce"] / max(s["pad_count"], 1.0),
        "text_loss": s["text_ce"] / max(s["text_count"], 1.0),
        "text_accuracy": s["text_correct"] / max(s["text_count"], 1.0),
        "text_predicted_as_pad": s["text_as_pad"] / max(s["text_count"], 1.0),
        "target_tokens": s["pad_count"] + s["text_count"],
    }

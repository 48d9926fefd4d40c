"""The streaming loss: teacher-forced cross-entropy over every scored position of the 80 ms stream.

Two kinds of targets, weighted separately: `[STREAMING_PAD]` ("nothing new yet", most of the stream) and text
(`[STREAMING_WORD]`, word pieces, EOS). The logits are computed in chunks of scored positions from the final hidden
states through the (tied) lm_head, so the full [B, P, vocab] fp32 logits never exist (131072 x 4 bytes = 0.5 MB
per position on the real model) - neither forward nor backward. Training makes each chunk's logit gradient in the
forward (`_FusedLinearCE`, no lm_head recompute); where the lm_head's weight cannot be read directly (ZeRO-3) each
chunk runs under activation checkpointing instead.

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


class _FusedLinearCE(torch.autograd.Function):
    """The chunked loss with each chunk's logit gradient made in the forward, while its logits exist.

    Per chunk: logits = h W^T (in the matmul's dtype, then fp32), CE and z-loss sums, the statistics, and at once
    d(weighted)/d(logits) = w (1 + 2 z lse) softmax - w onehot, turned into d/dh = g W (and g^T h, accumulated in
    fp32, when W trains). Backward only scales the stored gradients by the incoming one: no second lm_head forward
    (the checkpointed path recomputes it) and no [n, V] logits kept between forward and backward.
    Returns the five sums of `_chunk_sums` as one vector; only its first entry (the weighted loss) has a gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                pad_id: int, z_loss: float, chunk_positions: int) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        sums = hidden.new_zeros(5, dtype=torch.float32)
        for start in range(0, labels.numel(), chunk_positions):
            h, y, w = (t[start : start + chunk_positions] for t in (hidden, labels, weights))
            low = torch.nn.functional.linear(h, weight)  # [n, V] in the matmul's dtype (bf16 under autocast)
            matmul_dtype, logits = low.dtype, low.float()
            del low
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(-1, y[:, None]).squeeze(-1)
            ce = lse - target
            is_pad = y == pad_id
            predicted = logits.argmax(dim=-1)
            sums += torch.stack([(w * (ce + z_loss * lse.square())).sum(), (ce * is_pad).sum(),
                                 (ce * ~is_pad).sum(), (~is_pad & (predicted == y)).sum().float(),
                                 (~is_pad & (predicted == pad_id)).sum().float()])
            # logits -> d(weighted)/d(logits), in place: one [n, V] fp32 buffer per chunk
            grad = logits.sub_(lse[:, None]).exp_().mul_((w * (1 + 2 * z_loss * lse))[:, None])
            grad.scatter_add_(-1, y[:, None], -w[:, None])
            grad = grad.to(matmul_dtype)  # what autograd would hand the linear layer's backward
            grad_hidden[start : start + chunk_positions] = grad @ weight  # autocast, if on, picks the matmul dtype
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return sums

    @staticmethod
    def backward(ctx, grad_sums: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_sums[0]  # the statistics carry no gradient
        grad_w = None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype)
        return grad_hidden * scale.to(grad_hidden.dtype), grad_w, None, None, None, None, None


def fusable(project: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """The fused loss needs the projection's weight itself: a bias-free Linear whose weight is whole (ZeRO-3
    partitions it and gathers it only inside the module's own forward)."""
    return (isinstance(project, torch.nn.Linear) and project.bias is None
            and not hasattr(project.weight, "ds_id"))


def streaming_loss_sums(hidden: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                        pad_id: int, *, pad_weight: float, text_weight: float, z_loss: float = 0.0,
                        chunk_positions: int = 1024, min_chunks: int = 0, fused: bool = True) -> LossSums:
    """Loss sums of a micro-batch from the final hidden states [B, P, D] and labels [B, P] (already shifted:
    position p is scored against labels[p]). `project` maps [n, D] -> [n, V] (the tied lm_head).
    `min_chunks` pads with empty chunks: under ZeRO-3 every rank must call `project` equally often.
    `fused`: when training and `project` allows it (`fusable`), `_FusedLinearCE` (the same sums, no lm_head
    recompute in backward); otherwise each chunk runs under activation checkpointing."""
    weights = target_weights(labels, pad_id, pad_weight, text_weight)
    scored = labels != IGNORE_INDEX
    flat_hidden = hidden[scored]  # [n, D]: only positions that are scored ever meet the vocabulary
    flat_labels = labels[scored]
    flat_weights = weights[scored]
    if fused and torch.is_grad_enabled() and fusable(project) and not min_chunks:
        weighted, pad_ce, text_ce, correct, as_pad = _FusedLinearCE.apply(
            flat_hidden, project.weight, flat_labels, flat_weights, pad_id, z_loss, chunk_positions)
    else:
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

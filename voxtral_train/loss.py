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

Optional backends (`train.loss_backend`, `LOSS_BACKENDS`): a training step's loss can instead run a fused
lm_head + CE Triton kernel from a library that is never a dependency (CUDA only, whole lm_head weight, imported
only when chosen). Both give the same weighted sums; what each gives up is said at `_liger_sums` / `_cce_sums`.
Without gradients (eval, the anchor probe) the chunked path always runs: it is cheap there and its statistics exact.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
from packaging.version import Version
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


CHUNKED = "chunked"  # the built-in loss above: any device, any ZeRO stage, exact statistics


@dataclass(frozen=True)
class LossBackend:
    """An optional library computing CE from hidden states and the lm_head weight without [n, V] logits."""

    package: str  # its pip distribution
    min_version: str | None  # the oldest release with every argument used here (None: all of them)
    module: str  # imported when the backend is chosen, never otherwise


LOSS_BACKENDS = {  # the values of train.loss_backend besides CHUNKED
    # 0.8.0: return_predicted_tokens, the argmax the text statistics need
    "liger": LossBackend("liger-kernel", "0.8.0", "liger_kernel.transformers.functional"),
    "cut_cross_entropy": LossBackend("cut-cross-entropy", None, "cut_cross_entropy"),
}


def backend_problems(backend: str) -> list[str]:
    """Why `train.loss_backend=<backend>` cannot run here, one line each (empty: it can). `StreamingLM` checks at
    construction, so a missing package or GPU stops the run before its first step."""
    if backend == CHUNKED:
        return []
    spec = LOSS_BACKENDS[backend]
    requirement = spec.package + (f">={spec.min_version}" if spec.min_version else "")
    key = f"train.loss_backend={backend}"
    fallback = f"train.loss_backend={CHUNKED} (the built-in loss, no extra package)"
    problems = []
    try:
        installed = importlib.metadata.version(spec.package)
    except importlib.metadata.PackageNotFoundError:
        problems.append(f"{key}: the optional package {spec.package} is not installed: "
                        f"pip install '{requirement}', or run {fallback}")
    else:
        if spec.min_version and Version(installed) < Version(spec.min_version):
            problems.append(f"{key}: {spec.package} {installed} is too old: pip install '{requirement}', "
                            f"or run {fallback}")
        else:
            try:
                importlib.import_module(spec.module)
            except Exception as err:  # a broken install (triton missing or mismatched) fails in many ways
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                problems.append(f"{key}: {spec.package} {installed} is installed but `import {spec.module}` "
                                f"failed ({reason}): reinstall '{requirement}', or run {fallback}")
    if not torch.cuda.is_available():
        problems.append(f"{key}: {spec.package} runs Triton kernels on a CUDA GPU and none is visible: run {fallback}")
    return problems


def _liger_sums(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, pad_id: int, pad_weight: float,
                text_weight: float, z_loss: float) -> tuple[torch.Tensor, ...]:
    """The five sums of `_chunk_sums` from Liger Kernel's fused linear CE, exact statistics included.

    One reduction="sum" call per target kind, scaled by that kind's weight: every target of a kind weighs the same,
    so this is the weighted sum. Per-token losses (reduction="none") would need the logits recomputed in backward,
    and before liger-kernel 0.8.2 their gradient is silently wrong (a per-token upstream gradient read as one
    scalar); a "sum" call makes its gradient in the forward, like `_FusedLinearCE`. Its loss includes the z-loss
    (lse_square_scale), which `return_z_loss` hands back to subtract for the CE statistics."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def kind_sums(kind: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss sum with its z-loss and gradient, detached CE sum, argmax per target) over the targets `kind`."""
        targets = labels[kind]
        if not targets.numel():  # known on the host: indexing by a mask already synchronised
            zero = hidden.new_zeros((), dtype=torch.float32)
            return zero, zero, targets
        out = liger_fused_linear_cross_entropy(
            hidden[kind], weight, targets, lse_square_scale=z_loss, reduction="sum", return_z_loss=bool(z_loss),
            accum_dtype=torch.float32, return_predicted_tokens=True)  # fp32 lm_head gradient, as the chunked path
        return out.loss, out.loss.detach() - (out.z_loss.float() if z_loss else 0.0), out.predicted_tokens

    is_pad = labels == pad_id
    pad_loss, pad_ce, _ = kind_sums(is_pad)
    text_loss, text_ce, predicted = kind_sums(~is_pad)
    return (pad_weight * pad_loss + text_weight * text_loss, pad_ce, text_ce,
            (predicted == labels[~is_pad]).sum().float(), (predicted == pad_id).sum().float())


def _cce_sums(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
              pad_id: int) -> tuple[torch.Tensor, ...]:
    """The five sums of `_chunk_sums` from Apple's cut-cross-entropy (per-token CE, reduction="none", weighted here).

    It gives up: z-loss (no such term in the PyPI release; the settings refuse z_loss > 0 with it), text_correct
    and text_as_pad (it computes no argmax: NaN, so training logs text_accuracy / text_predicted_as_pad as nan;
    eval runs the chunked path and measures them), and exact gradients (it skips softmax entries below its
    filter_eps threshold in backward, the library's default trade of precision for speed)."""
    from cut_cross_entropy import linear_cross_entropy

    if torch.is_autocast_enabled(hidden.device.type):  # its kernels do not autocast: the matmul dtype F.linear uses
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    ce = linear_cross_entropy(hidden, weight, labels, reduction="none").float()
    is_pad = labels == pad_id
    unmeasured = ce.new_full((), math.nan)
    with torch.no_grad():
        pad_ce, text_ce = (ce * is_pad).sum(), (ce * ~is_pad).sum()
    return (weights * ce).sum(), pad_ce, text_ce, unmeasured, unmeasured


def streaming_loss_sums(hidden: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                        pad_id: int, *, pad_weight: float, text_weight: float, z_loss: float = 0.0,
                        chunk_positions: int = 1024, min_chunks: int = 0, fused: bool = True,
                        backend: str = CHUNKED) -> LossSums:
    """Loss sums of a micro-batch from the final hidden states [B, P, D] and labels [B, P] (already shifted:
    position p is scored against labels[p]). `project` maps [n, D] -> [n, V] (the tied lm_head).
    `min_chunks` pads with empty chunks: under ZeRO-3 every rank must call `project` equally often.
    `fused`: when training and `project` allows it (`fusable`), `_FusedLinearCE` (the same sums, no lm_head
    recompute in backward); otherwise each chunk runs under activation checkpointing.
    `backend`: when training, one of `LOSS_BACKENDS` instead (`project` must be `fusable`, `min_chunks` 0)."""
    weights = target_weights(labels, pad_id, pad_weight, text_weight)
    scored = labels != IGNORE_INDEX
    flat_hidden = hidden[scored]  # [n, D]: only positions that are scored ever meet the vocabulary
    flat_labels = labels[scored]
    flat_weights = weights[scored]
    if backend != CHUNKED and torch.is_grad_enabled():
        if not fusable(project) or min_chunks:
            raise ValueError(f"train.loss_backend={backend} needs the lm_head as one bias-free nn.Linear whose "
                             f"weight is whole (not ZeRO-3 partitioned): use train.loss_backend={CHUNKED}")
        if backend == "cut_cross_entropy" and z_loss:  # `config.value_problems` refuses this combination first
            raise ValueError(f"train.loss_backend={backend} has no z-loss term: train.z_loss must be 0")
        if backend == "liger":
            weighted, pad_ce, text_ce, correct, as_pad = _liger_sums(
                flat_hidden, project.weight, flat_labels, pad_id, pad_weight, text_weight, z_loss)
        else:
            weighted, pad_ce, text_ce, correct, as_pad = _cce_sums(
                flat_hidden, project.weight, flat_labels, flat_weights, pad_id)
    elif fused and torch.is_grad_enabled() and fusable(project) and not min_chunks:
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

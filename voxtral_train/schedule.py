"""The optimizer and its learning-rate schedule: AdamW over the trainable parameters; linear warmup, then cosine or
linear decay to `min_lr_ratio`, or constant."""

from __future__ import annotations

import math

import torch

from voxtral_train.config import OptimSettings


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, kind: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based: the lr the step-th update uses)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"train.schedule={kind!r}: expected cosine, linear or constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, kind: str,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind, min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(optim: OptimSettings, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (not norms or biases)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def restart_schedule(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                     optim: OptimSettings, step: int, lr_scale: float = 1.0) -> None:
    """After a checkpoint's optimizer and scheduler states were loaded: this run's optim settings and schedule, at
    optimizer step `step`. The loaded states bring back the checkpoint's peak lr (the scheduler's base_lrs, from the
    second step on), its lr for the next step, and its betas and eps (the optimizer's param_groups); the schedule's
    shape and length are this run's already (the scheduler's lambda is not saved). `lr_scale`: a rollback's lower lr."""
    lambda_lr = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the LambdaLR
    peak = optim.lr * lr_scale
    lambda_lr.base_lrs = [peak] * len(lambda_lr.base_lrs)
    lrs = [peak * factor(step) for factor in lambda_lr.lr_lambdas]
    for group, lr in zip(optimizer.param_groups, lrs):
        group.update(lr=lr, initial_lr=peak, betas=tuple(optim.betas), eps=optim.eps)
    lambda_lr.last_epoch = step
    lambda_lr._last_lr = lrs

"""Everything that knows the run has several processes: the accelerator, the launch check, and the collectives the
loop needs (a flag raised on any rank, gathered ZeRO-3 parameters, per-rank checksums, equal loss-chunk counts).

One `Accelerator` covers one CPU process, DDP on N GPUs, and DeepSpeed ZeRO-2/3. Two launch traps are refused here,
before any model loads: `accelerate launch --cpu --num_processes 2` silently starts independent processes that
never synchronise, and `ACCELERATE_USE_CPU` / `--cpu` switch DeepSpeed off while the config asks for it.
"""

from __future__ import annotations

import contextlib
import math
import os
from datetime import timedelta
from typing import Any, Callable, ContextManager, Sequence, TypeVar

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, broadcast_object_list

from voxtral_train.config import Settings
from voxtral_train.protocol import IGNORE_INDEX

MODEL_INPUTS = ("input_features", "input_ids", "labels", "num_delay_tokens")
T = TypeVar("T")


class LaunchError(RuntimeError):
    """The processes were started in a way that cannot train correctly; the message says how to launch."""


def build_accelerator(settings: Settings) -> Accelerator:
    """One Accelerator for CPU, DDP and DeepSpeed. Gradient accumulation windows are ours (sync_with_dataloader off:
    the DataLoader is never prepared, the bucket sampler shards by rank itself); the scheduler steps once per
    optimizer step (accelerate would otherwise step it once per process)."""
    t, ds = settings.train, settings.deepspeed
    handlers = process_group_kwargs(settings, int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.is_available())
    plugin = None
    if ds.zero_stage:
        zero: dict[str, Any] = {"stage": ds.zero_stage, "stage3_gather_16bit_weights_on_model_save": True}
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        plugin = DeepSpeedPlugin(hf_ds_config={
            "train_micro_batch_size_per_gpu": 1,  # nominal: batches are bucketed by positions, not by count
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "gradient_clipping": t.max_grad_norm,
            "zero_optimization": zero,
            "bf16": {"enabled": t.mixed_precision == "bf16"},
            "zero_allow_untested_optimizer": True,
        })
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.gradient_accumulation_steps,
                                                                sync_with_dataloader=False),
        step_scheduler_with_optimizer=False,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
    )
    check_launch(accelerator, settings)
    return accelerator


def process_group_kwargs(settings: Settings, world_size: int, cuda: bool) -> list[InitProcessGroupKwargs]:
    """Process-group options of a multi-process run (none for one process: DeepSpeed must not get them then).
    gloo on CPU (DeepSpeed multi-process needs it named); the timeout: a hung rank ends the run after
    train.collective_timeout_s instead of the backend's default (30 min for gloo)."""
    if world_size <= 1:
        return []
    return [InitProcessGroupKwargs(backend="nccl" if cuda else "gloo",
                                   timeout=timedelta(seconds=settings.train.collective_timeout_s))]


def check_launch(accelerator: Accelerator, settings: Settings) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    kind = accelerator.distributed_type.value
    if launched != accelerator.num_processes or (launched > 1 and kind == "NO"):
        raise LaunchError(f"{launched} processes were launched but accelerate does not distribute them ({kind}); "
                          f"on CPU launch with ACCELERATE_USE_CPU=1 and --multi_gpu (launch/cpu_2proc.yaml), "
                          f"never --cpu (it starts unsynchronised processes)")
    if settings.deepspeed.zero_stage and kind != "DEEPSPEED":
        raise LaunchError(f"deepspeed.zero_stage={settings.deepspeed.zero_stage} but accelerate runs {kind}: "
                          f"ACCELERATE_USE_CPU / --cpu turn DeepSpeed off; on a CPU-only machine DeepSpeed picks "
                          f"its CPU backend by itself")


def any_rank(accelerator: Accelerator, flag: bool | torch.Tensor) -> bool:
    """True on every rank when `flag` is true on any rank (all ranks must take the same branch)."""
    local = torch.as_tensor(flag, dtype=torch.float32, device=accelerator.device).reshape(())
    return accelerator.reduce(local, "sum").item() > 0


def on_main(accelerator: Accelerator, work: Callable[[], T], refusals: tuple[type[Exception], ...]) -> T:
    """`work()` on the main process only (taking the run lock, hashing a checkpoint), its result on every rank. An
    exception of `refusals` is raised on every rank: the others would otherwise wait in the next collective."""
    box: list[Any] = [(None, None)]
    if accelerator.is_main_process:
        try:
            box = [(work(), None)]
        except refusals as err:
            box = [(None, err)]
    broadcast_object_list(box)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def parameters_finite(accelerator: Accelerator, module: torch.nn.Module) -> bool:
    """Every parameter finite, on every rank (each checks what it holds: its ZeRO-3 partition, or the whole)."""
    local = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in module.parameters())
    return not any_rank(accelerator, not local)


def gathered_parameters(module: torch.nn.Module, zero_stage: int, trainable_only: bool) -> ContextManager:
    """Whole parameters, readable on every rank, inside the context (ZeRO-3 shards them); a no-op otherwise."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad or not trainable_only]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def rank_checksums(accelerator: Accelerator, model: torch.nn.Module, zero_stage: int) -> list[float]:
    """Each rank's sum of all its (whole) parameters: equal on every rank after a correctly distributed run."""
    with gathered_parameters(model, zero_stage, trainable_only=False):
        local = sum(p.detach().double().sum() for p in model.parameters()).to(accelerator.device)
    return accelerator.gather(local.reshape(1)).tolist()


def model_inputs(accelerator: Accelerator, batches: Sequence[dict], chunk_positions: int,
                 zero_stage: int) -> list[dict]:
    """The model inputs of `batches` on the device. Under ZeRO-3 every rank must call the same modules equally
    often (parameters are gathered collectively, in a recorded order), but the number of loss chunks depends on the
    batch: each micro-batch is told the largest number of loss chunks across ranks."""
    inputs = [{key: b[key].to(accelerator.device, non_blocking=True) for key in MODEL_INPUTS} for b in batches]
    if zero_stage != 3:
        return inputs
    local = torch.tensor([math.ceil((b["labels"] != IGNORE_INDEX).sum().item() / chunk_positions) for b in inputs],
                         device=accelerator.device)
    common = accelerator.gather(local[None]).amax(dim=0).tolist()  # [n_batches]: max over ranks
    for item, chunks in zip(inputs, common):
        item["min_chunks"] = chunks
    return inputs

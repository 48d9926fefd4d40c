"""Train Voxtral Realtime: `accelerate launch -m voxtral_train.train [hydra overrides]`, or `voxtral-train [...]`.

With no overrides this trains the tiny model on the bundled speech set on CPU in a few minutes and decodes the
training sentences at the end (configs/train.yaml). `train()` reads top to bottom in numbered steps; the loop is a
plain accelerate loop (no HF Trainer): the same code runs one CPU process, N GPUs with DDP, or DeepSpeed ZeRO-2/3.

Hydra composes the config; it must not fight accelerate: `hydra.run.dir` is the run folder (not a timestamp, so all
ranks agree), `version_base=None`, `hydra.job.chdir=false`, and only the main process prints or writes.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import hydra
import torch
import yaml
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from voxtral_train.checkpoint import (
    CheckpointError,
    TrainerState,
    complete_checkpoints,
    resolve_resume,
    resume_mismatches,
    save_checkpoint,
)
from voxtral_train.config import ConfigError, OptimSettings, Settings, settings_from_dict, settings_to_dict
from voxtral_train.batching import LengthBucketSampler
from voxtral_train.dataset import StreamingDataset, collate
from voxtral_train.delays import DelaySampler
from voxtral_train.embedding_cache import AudioEmbeddingCache
from voxtral_train.evaluate import evaluate_model
from voxtral_train.loss import STAT_NAMES, backward_scale, streaming_loss_sums, summarize, target_weights
from voxtral_train.manifest import read_manifest
from voxtral_train.run_log import MetricsLogger
from voxtral_train.model import compile_layers, load_model
from voxtral_train.schedule import build_scheduler
from voxtral_train.tokenizer import StreamingTokenizer
from voxtral_train.trainable import apply_trainable_policy, enable_gradient_checkpointing, parameter_table, save_trainable

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MODEL_INPUTS = ("input_features", "input_ids", "labels", "num_delay_tokens")


class TrainingStopped(RuntimeError):
    """A run that cannot go on (non-finite loss, failed save, bad resume); the message says what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Pieces the steps use
# ----------------------------------------------------------------------------------------------------------------
class StreamingLM(torch.nn.Module):
    """The model and its loss as one module: what accelerate / DeepSpeed wrap, so ZeRO-3 gathers the lm_head
    inside a forward. Returns (weighted loss sum, detached statistics vector)."""

    def __init__(self, model: torch.nn.Module, pad_id: int, settings: Settings):
        super().__init__()
        self.model = model  # the PEFT-wrapped or plain HF model
        self.pad_id = pad_id
        self.train_settings = settings.train

    def forward(self, input_ids, labels, num_delay_tokens, input_features=None, audio_embeds=None,
                min_chunks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        embeddings = base.get_input_embeddings()
        if audio_embeds is not None:  # frozen-encoder cache (voxtral_train.embedding_cache): skip the encoder
            audio = {"inputs_embeds": embeddings(input_ids) + audio_embeds.to(embeddings.weight.dtype)}
        else:
            audio = {"input_ids": input_ids, "input_features": input_features.to(embeddings.weight.dtype)}
        hidden = base.model(  # final hidden states [B, P, D]; the logits are made in chunks by the loss
            **audio, num_delay_tokens=num_delay_tokens, use_cache=False,
        ).last_hidden_state
        t = self.train_settings
        sums = streaming_loss_sums(hidden, base.lm_head, labels, self.pad_id, pad_weight=t.pad_loss_weight,
                                   text_weight=t.text_loss_weight, z_loss=t.z_loss,
                                   chunk_positions=t.loss_chunk_positions, min_chunks=min_chunks)
        return sums.weighted, sums.stats()


def build_accelerator(settings: Settings) -> Accelerator:
    """One Accelerator for CPU, DDP and DeepSpeed. Gradient accumulation windows are ours (sync_with_dataloader off:
    the DataLoader is never prepared, the bucket sampler shards by rank itself); the scheduler steps once per
    optimizer step (accelerate would otherwise step it once per process)."""
    t, ds = settings.train, settings.deepspeed
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # ENV_NOTES: DeepSpeed on CPU needs it multi-process
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
    return Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.gradient_accumulation_steps,
                                                                sync_with_dataloader=False),
        step_scheduler_with_optimizer=False,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
    )


def build_optimizer(optim: OptimSettings, model: torch.nn.Module) -> torch.optim.Optimizer:
    """`optim._target_` over the trainable parameters; weight decay on matrices only (not norms or biases)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    kwargs = {"_target_": optim._target_, "_convert_": "all", "lr": optim.lr, "betas": tuple(optim.betas),
              "eps": optim.eps}
    return instantiate(kwargs, [g for g in groups if g["params"]])


def micro_batches(loader: DataLoader, sampler: LengthBucketSampler, dataset: StreamingDataset, epoch: int,
                  consumed: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, batches consumed in that epoch, batch), endlessly, starting after `consumed` batches of `epoch`."""
    while True:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        sampler.skip_batches(consumed)
        for batch in loader:
            consumed += 1
            yield epoch, consumed, batch
        epoch, consumed = epoch + 1, 0


def to_device(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {key: batch[key].to(device) for key in MODEL_INPUTS}


def zero3_inputs(accelerator: Accelerator, batches: list[dict], chunk_positions: int, zero_stage: int) -> list[dict]:
    """Model inputs of `batches`. Under ZeRO-3 every rank must call the same modules equally often (parameters are
    gathered collectively, in a recorded order), but the number of loss chunks depends on the batch: each micro-batch
    is told the largest number of loss chunks across ranks."""
    inputs = [to_device(b, accelerator.device) for b in batches]
    if zero_stage != 3:
        return inputs
    local = torch.tensor([math.ceil((b["labels"] != -100).sum().item() / chunk_positions) for b in inputs],
                         device=accelerator.device)
    common = accelerator.gather(local[None]).amax(dim=0).tolist()  # [n_batches]: max over ranks
    for item, chunks in zip(inputs, common):
        item["min_chunks"] = chunks
    return inputs


def eval_batches(dataset: StreamingDataset, max_positions: int) -> list[list[int]]:
    """The held-out set's batches (index lists), in a fixed order: the same on every rank and every eval."""
    return LengthBucketSampler(dataset.lengths_in_positions(), max_positions, shuffle=False).epoch_batches(0)


def teacher_forced_eval(model: torch.nn.Module, accelerator: Accelerator, dataset: StreamingDataset,
                        batches: list[list[int]], chunk_positions: int, zero_stage: int) -> dict[str, float]:
    """Loss statistics over `batches`, sharded over ranks. Every rank runs the same number of forwards (ZeRO-3
    gathers parameters collectively): a rank short of batches repeats the first one and does not count it."""
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = batches[rank::world]
    total = torch.zeros(len(STAT_NAMES), device=accelerator.device)
    model.eval()
    with torch.no_grad():
        for i in range(math.ceil(len(batches) / world)):
            counted = i < len(mine)
            batch = collate([dataset[j] for j in (mine[i] if counted else batches[0])])
            (inputs,) = zero3_inputs(accelerator, [batch], chunk_positions, zero_stage)
            _, stats = model(**inputs)
            total += stats * float(counted)
    model.train()
    return summarize(accelerator.reduce(total, "sum").cpu())


def base_model(wrapped: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """The HF model inside accelerate's / DeepSpeed's / PEFT's wrappers (LoRA layers stay injected)."""
    model = accelerator.unwrap_model(wrapped).model
    return model.get_base_model() if isinstance(model, PeftModel) else model


def gathered_parameters(module: torch.nn.Module, zero_stage: int, trainable_only: bool):
    """Whole parameters, readable on every rank, inside the context (ZeRO-3 shards them); a no-op otherwise."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad or not trainable_only]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def write_checkpoint(folder: Path, accelerator: Accelerator, wrapped: torch.nn.Module, tokenizer: StreamingTokenizer,
                     settings: Settings, run_dir: Path) -> None:
    """Everything of a checkpoint but trainer_state.json (checkpoint.save_checkpoint writes that last)."""
    accelerator.save_state(str(folder), safe_serialization=True)  # weights, optimizer, scheduler, RNG (per rank)
    model = accelerator.unwrap_model(wrapped).model
    if isinstance(model, PeftModel):
        with gathered_parameters(model, settings.deepspeed.zero_stage, trainable_only=True):
            if accelerator.is_main_process:
                save_trainable(model, folder / "adapter")
    if accelerator.is_main_process:
        shutil.copyfile(run_dir / "config.yaml", folder / "config.yaml")
        shutil.copyfile(tokenizer.tekken_path, folder / "tekken.json")


def export_final(accelerator: Accelerator, wrapped: torch.nn.Module, tokenizer: StreamingTokenizer,
                 settings: Settings, run_dir: Path) -> Path:
    """`<run>/final/`: the adapter (LoRA modes) or the whole HF model (full) + tekken.json, ready for
    `load_model(folder)` / `voxtral-export`."""
    out = run_dir / "final"
    model = accelerator.unwrap_model(wrapped).model
    with gathered_parameters(model, settings.deepspeed.zero_stage, trainable_only=isinstance(model, PeftModel)):
        if accelerator.is_main_process:
            save_trainable(model, out)
            shutil.copyfile(tokenizer.tekken_path, out / "tekken.json")
            shutil.copyfile(run_dir / "config.yaml", out / "train_config.yaml")
    accelerator.wait_for_everyone()
    return out


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    run_dir: Path
    final_step: int
    losses: list[float]  # each step's training loss, summed over ranks (every rank holds the same list)
    final_wer: float | None  # normalised WER of the final evaluation
    stopped: str | None  # why the run stopped early, if it did


def train(settings: Settings) -> RunResult:
    t = settings.train
    # 1. Accelerator, seed, run folder (every rank derives the same folder from the config) -----------------------
    accelerator = build_accelerator(settings)
    is_main, say, device = accelerator.is_main_process, accelerator.print, accelerator.device
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes or (launched > 1 and accelerator.distributed_type.value == "NO"):
        raise TrainingStopped(f"{launched} processes were launched but accelerate does not distribute them "
                              f"({accelerator.distributed_type.value}); on CPU launch with ACCELERATE_USE_CPU=1 and "
                              f"--multi_gpu (launch/cpu_2proc.yaml), never --cpu (ENV_NOTES.md)")
    if settings.deepspeed.zero_stage and accelerator.distributed_type.value != "DEEPSPEED":
        raise TrainingStopped(f"deepspeed.zero_stage={settings.deepspeed.zero_stage} but accelerate runs "
                              f"{accelerator.distributed_type.value}: ACCELERATE_USE_CPU / --cpu turn DeepSpeed off; "
                              f"on a CPU-only machine DeepSpeed picks its CPU backend by itself")
    run_dir = Path(t.output_root) / t.name
    ckpt_root = run_dir / "checkpoints"
    resume_from = resolve_resume(t.resume, ckpt_root)
    if t.resume == "latest" and resume_from is None:
        say(f"train.resume=latest: no complete checkpoint in {ckpt_root} yet, starting from scratch")
    if resume_from is None and complete_checkpoints(ckpt_root):
        raise TrainingStopped(f"{run_dir} already holds checkpoints: pass train.resume=latest to continue that run, "
                              f"or train.name=<new name> to start another")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(settings_to_dict(settings), sort_keys=False))
    set_seed(t.seed)

    # 2. Model, tokenizer, trainable parameters -----------------------------------------------------------------
    model, tokenizer = load_model(settings.model.path, dtype=settings.model.dtype,
                                  attn_implementation=settings.model.attn_implementation, seed=t.seed)
    model = apply_trainable_policy(model, settings.peft)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if t.compile:
        compile_layers(model)
    say(parameter_table(model))

    # 3. Data: bucketed micro-batches sharded by rank (the DataLoader stays on CPU), a fixed held-out list --------
    def dataset(spec: str, delays: DelaySampler) -> StreamingDataset:
        return StreamingDataset(read_manifest(spec), tokenizer, delays, anchor=settings.data.anchor,
                                max_seconds=settings.data.max_seconds, seed=t.seed)

    delays = DelaySampler.choices(settings.data.delays_ms, settings.data.delay_weights)
    train_set = dataset(settings.data.train_manifest, delays)
    # Lengths per epoch (each item's delay is redrawn every epoch), so buckets hold items of the same real length.
    sampler = LengthBucketSampler(train_set.lengths_in_positions, settings.data.max_positions_per_batch,
                                  seed=t.seed, num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    # Its own generator: each new DataLoader iterator draws a seed, which must not move the global RNG (dropout),
    # or a resumed run (a new iterator mid-epoch) would diverge from an unbroken one.
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=settings.data.num_workers,
                        generator=torch.Generator().manual_seed(t.seed))
    fixed_delay = DelaySampler.fixed(settings.data.delays_ms[0])  # evaluation uses one delay
    held_out = dataset(settings.data.eval_manifest, fixed_delay) if settings.data.eval_manifest else None
    held_out_batches = eval_batches(held_out, settings.data.max_positions_per_batch) if held_out else []
    audio_cache = None
    if settings.data.audio_embedding_cache:  # refuses by itself when the encoder or adapter trains
        cache_dir = settings.data.audio_embedding_cache_dir or str(Path(t.output_root) / "audio_embedding_cache")
        audio_cache = AudioEmbeddingCache(cache_dir, model, train_set.delay_sampler.max_tokens)
    say(f"data: {len(train_set)} training items, {len(sampler)} micro-batches per epoch per process, "
        f"{len(held_out) if held_out else 0} held-out items")

    # 4. Optimizer, schedule, distribution (accelerate wraps DDP or the DeepSpeed engine) -------------------------
    optimizer = build_optimizer(settings.optim, model)
    scheduler = build_scheduler(optimizer, warmup_steps=t.warmup_steps, total_steps=t.max_steps, kind=t.schedule,
                                min_lr_ratio=t.min_lr_ratio)
    wrapped, optimizer, scheduler = accelerator.prepare(StreamingLM(model, tokenizer.ids.streaming_pad, settings),
                                                        optimizer, scheduler)

    # 5. Resume: weights, optimizer, scheduler, RNG (accelerate) and the data position (trainer_state.json) -------
    state = TrainerState(step=0, epoch=0, batches_in_epoch=0, seed=t.seed, model=settings.model.path,
                         peft_mode=settings.peft.mode, world_size=accelerator.num_processes,
                         gradient_accumulation_steps=t.gradient_accumulation_steps,
                         max_positions_per_batch=settings.data.max_positions_per_batch,
                         train_manifest=settings.data.train_manifest)
    if resume_from is not None:
        saved = TrainerState.read(resume_from)
        for mismatch in resume_mismatches(saved, state):
            say(f"WARNING: resuming with a setting that differs from the checkpoint's - {mismatch}")
        accelerator.load_state(str(resume_from))
        state.step, state.epoch, state.batches_in_epoch = saved.step, saved.epoch, saved.batches_in_epoch
        state.audio_seconds_seen = saved.audio_seconds_seen
        say(f"resumed from {resume_from}: step {state.step}, epoch {state.epoch}, batch {state.batches_in_epoch}")
    logger = MetricsLogger(run_dir, settings.logging, settings_to_dict(settings), t.name, is_main,
                           resumed=resume_from is not None)

    def checkpoint() -> Path:
        def write(folder: Path) -> None:
            write_checkpoint(folder, accelerator, wrapped, tokenizer, settings, run_dir)

        try:
            return save_checkpoint(ckpt_root, state, write, is_main=is_main, barrier=accelerator.wait_for_everyone,
                                   keep_last=t.keep_last)
        except CheckpointError as err:
            logger.close()
            raise TrainingStopped(str(err)) from err

    def evaluate_now() -> None:
        """Periodic eval: teacher-forced loss on the held-out set, and a short WER on a few of its clips."""
        if held_out is None:
            return
        metrics = teacher_forced_eval(wrapped, accelerator, held_out, held_out_batches, t.loss_chunk_positions,
                                      settings.deepspeed.zero_stage)
        clips = held_out.utterances[: t.eval_wer_clips]
        report = evaluate_model(base_model(wrapped, accelerator), tokenizer, clips, settings.data.delays_ms[:1],
                                progress=False)
        metrics["wer"] = report["delays"][0]["wer_norm"]
        logger.log(state.step, metrics, split="eval")
        note = "  (no text yet: normal early in training)" if metrics["text_accuracy"] < 0.05 else ""
        say(f"\neval step {state.step}: loss {metrics['loss']:.3f}, text accuracy {metrics['text_accuracy']:.2f}, "
            f"WER {100 * metrics['wer']:.1f}% on {len(clips)} clips{note}")
        for row in report["utterances"][:2]:
            say(f"  ref: {row['reference']}\n  hyp: {row['hypothesis']}")

    # 6. The loop: one optimizer step per window of `gradient_accumulation_steps` micro-batches -------------------
    batches = micro_batches(loader, sampler, train_set, state.epoch, state.batches_in_epoch)
    progress = tqdm(total=t.max_steps, initial=state.step, disable=not (is_main and settings.logging.progress_bar),
                    desc="train", unit="step", dynamic_ncols=True)
    losses: list[float] = []
    stopped: str | None = None
    while state.step < t.max_steps:
        started = time.perf_counter()
        window = [next(batches) for _ in range(t.gradient_accumulation_steps)]
        # 6a. The loss normaliser: the target weight of the whole window on all ranks, counted before it runs.
        local_weight = sum(target_weights(b["labels"], tokenizer.ids.streaming_pad, t.pad_loss_weight,
                                          t.text_loss_weight).sum() for _, _, b in window)
        global_weight = accelerator.reduce(local_weight.to(device), "sum").item()
        scale = backward_scale(global_weight, t.gradient_accumulation_steps, accelerator.num_processes)
        # 6b. Forward + backward per micro-batch; a non-finite loss on any rank stops before it reaches the weights.
        totals = torch.zeros(len(STAT_NAMES) + 2, device=device)  # the loss statistics + audio seconds, positions
        inputs = zero3_inputs(accelerator, [b for _, _, b in window], t.loss_chunk_positions,
                              settings.deepspeed.zero_stage)
        for (_, _, batch), batch_inputs in zip(window, inputs):
            if audio_cache is not None:  # computed on the first epoch, read back on later ones
                batch_inputs["audio_embeds"] = audio_cache.embeddings_for(
                    batch["input_features"], batch["n_positions"], batch["num_delay_tokens"])
                del batch_inputs["input_features"]
            with accelerator.accumulate(wrapped):
                weighted, stats = wrapped(**batch_inputs)
                if any_rank(accelerator, not torch.isfinite(weighted).item()):
                    good = complete_checkpoints(ckpt_root)
                    stopped = (f"the loss became {weighted.item()} at step {state.step + 1}; stopped before the "
                               f"update. Last good checkpoint: {good[-1] if good else 'none'}. Lower optim.lr or "
                               f"raise train.warmup_steps, then resume with train.resume=latest.")
                    break
                accelerator.backward(weighted * scale)
            sizes = torch.tensor([batch["audio_seconds"].sum().item(), float(batch["input_ids"].numel())])
            totals += torch.cat([stats, sizes.to(device)])
        if stopped:
            break
        state.epoch, state.batches_in_epoch = window[-1][0], window[-1][1]
        # 6c. Clip, step, schedule (under DeepSpeed the engine clips and steps inside accelerator.backward).
        if not accelerator.sync_gradients:
            raise RuntimeError("the accumulation window and accelerate's gradient sync disagree")
        grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), t.max_grad_norm) if t.max_grad_norm else None
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        # 6d. Metrics summed over ranks, progress, periodic eval and checkpoints.
        totals = accelerator.reduce(totals, "sum").cpu()
        metrics = summarize(totals[: len(STAT_NAMES)])
        audio_seconds, positions = totals[-2].item(), totals[-1].item()
        seconds = time.perf_counter() - started
        state.audio_seconds_seen += audio_seconds
        state.last_loss = metrics["loss"]
        losses.append(metrics["loss"])
        metrics.update(lr=lr, grad_norm=None if grad_norm is None else float(grad_norm), epoch=state.epoch,
                       audio_seconds=audio_seconds, positions=positions, step_seconds=seconds,
                       audio_seconds_per_second=audio_seconds / seconds)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.3f}", text_acc=f"{metrics['text_accuracy']:.2f}",
                             audio_s_per_s=f"{audio_seconds / seconds:.1f}")
        if state.step % t.log_every == 0 or state.step == 1:
            logger.log(state.step, metrics)
        if t.eval_every and state.step % t.eval_every == 0 and state.step < t.max_steps:
            evaluate_now()
        if t.save_every and state.step % t.save_every == 0 and state.step < t.max_steps:
            checkpoint()
    progress.close()

    # 7. Final checkpoint, exported weights, final evaluation, summary ------------------------------------------
    final_wer = None
    if stopped:
        say(f"STOPPED: {stopped}")
    else:
        checksums = rank_checksums(accelerator, wrapped, settings.deepspeed.zero_stage)
        logger.log(state.step, {"world_size": accelerator.num_processes, "parameter_checksums": checksums},
                   split="ranks")
        if len(set(checksums)) > 1:
            raise TrainingStopped(f"the {len(checksums)} processes ended with different weights (checksums "
                                  f"{checksums}): the launch did not synchronise them (see ENV_NOTES.md)")
        last = checkpoint()
        final = export_final(accelerator, wrapped, tokenizer, settings, run_dir)
        say(f"trained {state.step} steps; checkpoint {last}; weights for export {final}")
        if settings.data.final_eval_split != "none":
            final_wer = final_eval(base_model(wrapped, accelerator), accelerator, tokenizer, settings, run_dir,
                                   state.step, logger)
    if is_main:
        write_summary(run_dir, settings, state, losses, final_wer, stopped)
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(run_dir, state.step, losses, final_wer, stopped)


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (all ranks must take the same branch)."""
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum").item() > 0


def rank_checksums(accelerator: Accelerator, model: torch.nn.Module, zero_stage: int) -> list[float]:
    """Each rank's sum of all its (whole) parameters: equal on every rank after a correctly distributed run."""
    with gathered_parameters(model, zero_stage, trainable_only=False):
        local = sum(p.detach().double().sum() for p in model.parameters()).to(accelerator.device)
    return accelerator.gather(local.reshape(1)).tolist()


def final_eval(model: torch.nn.Module, accelerator: Accelerator, tokenizer: StreamingTokenizer, settings: Settings,
               run_dir: Path, step: int, logger: MetricsLogger) -> float:
    """Decode the whole train manifest (the demo's memorisation check) or the held-out one at the configured delays,
    with the same evaluation and report as `voxtral-eval` (`<run>/eval/`: report.json/md, errors.jsonl, plots).
    Every rank decodes (ZeRO-3 gathers parameters collectively); the main process writes."""
    split = settings.data.final_eval_split
    spec = settings.data.train_manifest if split == "train" else settings.data.eval_manifest
    report = evaluate_model(model, tokenizer, read_manifest(spec), settings.data.delays_ms,
                            out_dir=run_dir / "eval" if accelerator.is_main_process else None,
                            name=settings.train.name, progress=accelerator.is_main_process, manifest=spec)
    first = report["delays"][0]
    logger.log(step, {key: value for key, value in first.items() if isinstance(value, (int, float))},
               split=f"final_{split}")
    accelerator.print(f"final evaluation, {split} manifest ({report['n_utterances']} clips) at {first['delay_ms']} ms: "
                      f"WER {100 * first['wer_norm']:.1f}% (normalised), {100 * first['wer_raw']:.1f}% (raw); "
                      f"report in {run_dir / 'eval'}")
    for row in report["utterances"][:3]:
        accelerator.print(f"  ref: {row['reference']}\n  hyp: {row['hypothesis']}")
    return first["wer_norm"]


def write_summary(run_dir: Path, settings: Settings, state: TrainerState, losses: list[float],
                  final_wer: float | None, stopped: str | None) -> None:
    t = settings.train
    lines = [
        f"# Run `{t.name}`",
        "",
        f"- model: `{settings.model.path}`, parameters: `{settings.peft.mode}`, DeepSpeed ZeRO stage "
        f"{settings.deepspeed.zero_stage or 'off'}",
        f"- steps: {state.step} / {t.max_steps}, audio seen: {state.audio_seconds_seen / 3600:.3f} h",
    ]
    if losses:
        lines.append(f"- training loss: {losses[0]:.4f} (first step) -> {losses[-1]:.4f} (last step)")
    if final_wer is not None:
        lines.append(f"- final WER on the {settings.data.final_eval_split} manifest: {100 * final_wer:.1f}% "
                     f"([report](eval/report.md), [per utterance](eval/errors.jsonl))")
    if stopped:
        lines.append(f"- **stopped early**: {stopped}")
    if final_wer is not None:
        lines += ["", "![WER vs delay](eval/wer_vs_delay.png) ![latency](eval/latency_hist.png)"]
    lines += ["", "Training curves: `voxtral-train plot " + str(run_dir) + "` draws [loss](plots/loss.png), "
              "[learning rate](plots/lr.png) and [eval WER](plots/wer.png).",
              "", "Files: `config.yaml` (resolved settings), `metrics.jsonl`, `checkpoints/step_NNNNNN/`, "
              "`final/` (weights to export), `tensorboard/`.", ""]
    (run_dir / "summary.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def compose_settings(overrides: list[str]) -> Settings:
    """The settings `voxtral-train <overrides>` would run with (for tests and other subcommands)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("train", overrides=overrides)
    return settings_from_dict(OmegaConf.to_container(cfg, resolve=True))


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
def _hydra_train(cfg: DictConfig) -> None:
    raw = OmegaConf.to_container(cfg, resolve=True)
    try:
        result = train(settings_from_dict(raw))
    except (ConfigError, TrainingStopped) as err:
        print(f"voxtral-train: {err}", file=sys.stderr)
        sys.exit(2)
    if result.stopped:
        sys.exit(3)


def train_command(overrides: list[str]) -> int:
    """`voxtral-train [train] key=value ...`: Hydra reads sys.argv, so hand it the overrides there."""
    sys.argv = [sys.argv[0], *overrides]
    _hydra_train()
    return 0


# Subcommands of `voxtral-train`; without one, the arguments are training overrides.
def plan_command(overrides: list[str]) -> int:
    """`voxtral-train plan [overrides]`: estimated per-GPU memory of the configured run (voxtral_train.memory_plan)."""
    from voxtral_train.memory_plan import main_plan

    try:
        main_plan(overrides)
    except (ConfigError, ValueError) as err:
        print(f"voxtral-train plan: {err}", file=sys.stderr)
        return 2
    return 0


def plot_command(argv: list[str]) -> int:
    from voxtral_train.plots import plot_command as plot

    return plot(argv)


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {"train": train_command, "plan": plan_command,
                                                      "plot": plot_command}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    return train_command(argv)


if __name__ == "__main__":
    sys.exit(main())

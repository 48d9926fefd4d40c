"""Train Voxtral Realtime: `accelerate launch -m voxtral_train.train [hydra overrides]`, or `voxtral-train [...]`.

With no overrides this adapts the embedded mini base with LoRA to the bundled medical set on CPU in a few minutes
and reports its held-out WER (configs/train.yaml). `train()` reads top to bottom in numbered steps; the loop is a
plain accelerate loop (no HF Trainer): the same code runs one CPU process, N GPUs with DDP, or DeepSpeed ZeRO-2/3.
The pieces it calls live where their concept does: the accelerator and collectives in `distributed`, model + loss
in `streaming_lm`, checkpoint folders in `checkpoint` / `checkpoint_writer`, evaluation in `evaluate`, the command
line in `cli`.

Faults: the run folder is locked for the run (`run_lock`); SIGTERM / SIGINT / SIGUSR1 or the launcher's death stop
after the current step with a checkpoint (`stop_signals`); a resume verifies the checkpoint and says what changed
(`checkpoint`, `resume_diff`); a non-finite loss stops or rolls back to the last good checkpoint.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from voxtral_train.batching import LengthBucketSampler, micro_batches
from voxtral_train.checkpoint import (
    CheckpointError,
    TrainerState,
    checkpoint_name,
    complete_checkpoints,
    last_good_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from voxtral_train.checkpoint_writer import RunWriter, write_run_config
from voxtral_train.compiled import compile_layers
from voxtral_train.config import Settings, TrainSettings, settings_to_dict
from voxtral_train.dataset import StreamingDataset, auto_num_workers, collate
from voxtral_train.delays import DelaySampler
from voxtral_train.distributed import (
    any_rank,
    build_accelerator,
    model_inputs,
    on_main,
    parameters_finite,
    rank_checksums,
)
from voxtral_train.embedding_cache import AudioEmbeddingCache
from voxtral_train.eval_report import write_run_summary
from voxtral_train.evaluate import RunEvaluator
from voxtral_train.loss import STAT_NAMES, backward_scale, summarize, target_weights
from voxtral_train.model import load_model
from voxtral_train.preflight import CheckedRun, check_run
from voxtral_train.resume_diff import check_resume, lr_note
from voxtral_train.run_lock import RunLock, RunLocked
from voxtral_train.run_log import MetricsLogger, first_row
from voxtral_train.schedule import build_optimizer, build_scheduler, restart_schedule
from voxtral_train.shard_stream import ShardStream, as_is
from voxtral_train.shards import ShardIndex
from voxtral_train.stop_signals import StopRequest, launched_by_a_launcher
from voxtral_train.streaming_lm import StreamingLM
from voxtral_train.tokenizer import StreamingTokenizer
from voxtral_train.trainable import apply_trainable_policy, enable_gradient_checkpointing, parameter_table
from voxtral_train.window_attention import use_window_blocks


class TrainingStopped(RuntimeError):
    """A run that cannot start or finish as asked (a used run folder, ranks that diverged); the message says why."""


@dataclass
class RunResult:
    run_dir: Path
    final_step: int
    losses: list[float]  # each step's training loss, summed over ranks (every rank holds the same list)
    final_wer: float | None  # normalised WER of the final evaluation
    stopped: str | None  # why the run stopped early, if it did
    interrupted: bool = False  # stopped by a signal or the launcher's death, after saving a checkpoint


def train(settings: Settings) -> RunResult:
    """The run, holding its folder's lock and catching stop signals from start to end."""
    checked = check_run(settings)  # every manifest row and audio header, before anything loads or is created
    accelerator = build_accelerator(settings)
    run_dir = Path(settings.train.output_root) / settings.train.name
    lock = RunLock(run_dir)
    took_over = on_main(accelerator, lambda: lock.acquire().took_over, (RunLocked,))
    if took_over:
        accelerator.print(f"{run_dir}: {took_over}")
    try:
        with StopRequest(watch_parent=launched_by_a_launcher()) as stop:
            return _train(settings, checked, accelerator, run_dir, stop)
    finally:
        lock.release()


def _train(settings: Settings, checked: CheckedRun, accelerator: Accelerator, run_dir: Path,
           stop: StopRequest) -> RunResult:
    t, data = settings.train, settings.data
    # 1. The checkpoint to resume (verified by the main process before anything loads), its changed settings -----
    is_main, say = accelerator.is_main_process, accelerator.print
    ckpt_root = run_dir / "checkpoints"
    resume_from = on_main(accelerator, lambda: resolve_resume(t.resume, ckpt_root, say), (CheckpointError,))
    if t.resume == "latest" and resume_from is None:
        say(f"train.resume=latest: no complete checkpoint in {ckpt_root} yet, starting from scratch")
    if resume_from is None and complete_checkpoints(ckpt_root):
        raise TrainingStopped(f"{run_dir} already holds checkpoints: pass train.resume=latest to continue that run, "
                              f"or train.name=<new name> to start another")
    saved_config = None if resume_from is None else check_resume(
        resume_from, settings_to_dict(settings), accelerator.num_processes, t.allow_inexact_resume, say)
    if is_main:
        write_run_config(run_dir, settings)
    set_seed(t.seed)

    # 2. Model, tokenizer, trainable parameters -----------------------------------------------------------------
    model, tokenizer = load_model(settings.model.path, dtype=settings.model.dtype,
                                  attn_implementation=settings.model.attn_implementation, seed=t.seed)
    if settings.model.encoder_attention == "window_blocks":
        use_window_blocks(model)
    model = apply_trainable_policy(model, settings.peft)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    compile_stats = compile_layers(model) if t.compile else None
    say(parameter_table(model))

    # 3. Data: bucketed micro-batches sharded by rank (the DataLoader stays on CPU), a fixed held-out list --------
    for note in checked.notes:
        say(note)
    # A shard stream's order depends on its DataLoader workers: a resume keeps the count the run started with.
    feed = build_data(settings, checked, tokenizer, model, accelerator,
                      None if resume_from is None else TrainerState.read(resume_from).shard_workers)
    say(feed.describe())

    # 4. Optimizer, schedule, distribution (accelerate wraps DDP or the DeepSpeed engine) -------------------------
    optimizer = build_optimizer(settings.optim, model)
    scheduler = build_scheduler(optimizer, warmup_steps=t.warmup_steps, total_steps=t.max_steps, kind=t.schedule,
                                min_lr_ratio=t.min_lr_ratio)
    lm = StreamingLM(model, tokenizer.ids.streaming_pad, pad_weight=t.pad_loss_weight, text_weight=t.text_loss_weight,
                     z_loss=t.z_loss, chunk_positions=t.loss_chunk_positions, loss_backend=t.loss_backend)
    wrapped, optimizer, scheduler = accelerator.prepare(lm, optimizer, scheduler)
    writer = RunWriter(accelerator, wrapped, tokenizer, settings, run_dir)

    # 5. Resume: weights, optimizer, scheduler, RNG (accelerate) and the data position (trainer_state.json) -------
    state = TrainerState(step=0, epoch=0, batches_in_epoch=0, seed=t.seed, model=settings.model.path,
                         peft_mode=settings.peft.mode, world_size=accelerator.num_processes,
                         gradient_accumulation_steps=t.gradient_accumulation_steps,
                         max_positions_per_batch=data.max_positions_per_batch, train_manifest=data.train_manifest,
                         shard_workers=feed.sampler.num_workers if isinstance(feed.sampler, ShardStream) else None)
    if resume_from is not None:
        restore(resume_from, accelerator, state, optimizer, scheduler, settings, saved_config)
    logger = MetricsLogger(run_dir, settings.logging, settings_to_dict(settings), t.name, is_main,
                           resume_step=None if resume_from is None else state.step)
    evaluator = RunEvaluator(accelerator, wrapped, tokenizer, settings, feed.held_out, logger.log)

    # 6. The loop: one optimizer step per window of `gradient_accumulation_steps` micro-batches -------------------
    batches = micro_batches(feed.loader, feed.sampler, state.epoch, state.batches_in_epoch)
    progress = tqdm(total=t.max_steps, initial=state.step, disable=not (is_main and settings.logging.progress_bar),
                    desc="train", unit="step", dynamic_ncols=True)
    if t.eval_every and state.step == 0:
        evaluator.periodic(0)  # the starting point: a pretrained base's held-out WER before adaptation
    losses: dict[int, float] = {}  # step -> training loss of the steps this process ran (a rollback drops some)
    stopped: str | None = None
    interrupted: str | None = None
    while state.step < t.max_steps:
        started = time.perf_counter()
        window = [next(batches) for _ in range(t.gradient_accumulation_steps)]
        state.skipped_items += report_skipped(accelerator, [item for _, _, b in window for item in b["skipped"]])
        # 6a. Forward + backward of the window; a non-finite loss on any rank stops before it reaches the weights.
        totals = forward_backward(accelerator, wrapped, [b for _, _, b in window], settings,
                                  tokenizer.ids.streaming_pad, feed.audio_cache)
        state.epoch, state.batches_in_epoch = window[-1][0], window[-1][1]  # past this window, even if skipped
        if totals is None:  # stop, or roll back to the last good checkpoint and skip this window
            stopped = recover_from_nonfinite(accelerator, state, optimizer, scheduler, settings, ckpt_root, logger)
            if stopped:
                break
            losses = {step: loss for step, loss in losses.items() if step <= state.step}
            progress.reset(total=t.max_steps)
            progress.update(state.step)
            continue
        # 6b. Clip, step, schedule (under DeepSpeed the engine clips and steps inside accelerator.backward).
        if not accelerator.sync_gradients:
            raise RuntimeError("the accumulation window and accelerate's gradient sync disagree")
        grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), t.max_grad_norm) if t.max_grad_norm else None
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        # 6c. Metrics summed over ranks, progress, periodic eval and checkpoints.
        totals = accelerator.reduce(totals, "sum").cpu()
        metrics = summarize(totals[: len(STAT_NAMES)])
        audio_seconds, positions, seconds = totals[-2].item(), totals[-1].item(), time.perf_counter() - started
        state.audio_seconds_seen += audio_seconds
        state.last_loss = metrics["loss"]
        losses[state.step] = metrics["loss"]
        metrics.update(lr=lr, grad_norm=None if grad_norm is None else float(grad_norm), epoch=state.epoch,
                       audio_seconds=audio_seconds, positions=positions, step_seconds=seconds,
                       audio_seconds_per_second=audio_seconds / seconds, skipped_items=state.skipped_items,
                       **(compile_stats.metrics() if compile_stats else {}))
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.3f}", text_acc=f"{metrics['text_accuracy']:.2f}",
                             audio_s_per_s=f"{audio_seconds / seconds:.1f}")
        if state.step % t.log_every == 0 or state.step == 1:
            logger.log(state.step, metrics)
        if t.eval_every and state.step % t.eval_every == 0 and state.step < t.max_steps:
            evaluator.periodic(state.step)
        if t.save_every and state.step % t.save_every == 0 and state.step < t.max_steps:
            save(writer, ckpt_root, state, logger)
        # 6d. A stop request (signal, launcher gone) on any rank: every rank stops after this same step.
        if state.step < t.max_steps and any_rank(accelerator, stop.reason is not None):
            interrupted = stop.reason or "a stop request to another process"
            break
    progress.close()

    # 7. Final checkpoint, exported weights, final evaluation, summary ------------------------------------------
    final_wer = None
    if interrupted:
        done = ckpt_root / checkpoint_name(state.step)
        last = done if done in complete_checkpoints(ckpt_root) else save(writer, ckpt_root, state, logger)
        stopped = f"stopped on {interrupted} at step {state.step}; checkpoint {last}; resume with train.resume=latest"
        say(stopped)
    elif stopped:
        say(f"STOPPED: {stopped}")
    else:
        final_wer = complete_run(writer, evaluator, logger, state, ckpt_root)
    if is_main:
        first = first_row(logger.path, "train")  # the run's first step, also after a resume
        write_run_summary(run_dir, name=t.name, model=settings.model.path, peft_mode=settings.peft.mode,
                          zero_stage=settings.deepspeed.zero_stage, step=state.step, max_steps=t.max_steps,
                          audio_seconds_seen=state.audio_seconds_seen, first_loss=first["loss"] if first else None,
                          last_loss=state.last_loss, final_wer=final_wer,
                          final_eval_split=data.final_eval_split, stopped=stopped)
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(run_dir, state.step, list(losses.values()), final_wer, stopped, interrupted is not None)


@dataclass
class TrainData:
    """What step 3 builds: the datasets, the bucketed batches of this rank, and the optional embedding cache."""

    train_set: StreamingDataset | ShardStream
    held_out: StreamingDataset | None
    sampler: LengthBucketSampler | ShardStream  # a shard stream orders its own batches
    loader: DataLoader
    audio_cache: AudioEmbeddingCache | None

    def describe(self) -> str:
        items = self.sampler.n_items if isinstance(self.sampler, LengthBucketSampler) else len(self.train_set.index)
        return (f"data: {items} training items, {len(self.sampler)} micro-batches per epoch per process, "
                f"{len(self.held_out) if self.held_out else 0} held-out items")


def build_data(settings: Settings, checked: CheckedRun, tokenizer: StreamingTokenizer, model: torch.nn.Module,
               accelerator: Accelerator, shard_workers: int | None = None) -> TrainData:
    """Datasets over the pre-flight-checked rows, bucketed micro-batches sharded by rank, the embedding cache.
    A manifest is read by index (length buckets over the whole epoch); a shard corpus is streamed (`ShardStream`:
    buckets within windows of shards) by `shard_workers` DataLoader workers when a resumed run says so (its plan
    depends on them), else by data.num_workers."""
    t, data = settings.train, settings.data
    delays = DelaySampler.choices(data.delays_ms, data.delay_weights)
    held_out = None if checked.eval is None else StreamingDataset(
        checked.eval, tokenizer, DelaySampler.fixed(data.delays_ms[0]), anchor=data.anchor,
        max_seconds=data.max_seconds, seed=t.seed, pcm16=data.pcm16)  # evaluation uses one delay
    workers = auto_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if data.num_workers is None \
        else data.num_workers
    # Pinned batches let model_inputs copy to the GPU without blocking.
    pin = torch.cuda.is_available()
    if isinstance(checked.train, ShardIndex):
        if shard_workers is not None and shard_workers != workers:
            accelerator.print(f"data: {shard_workers} DataLoader workers per process, as when this run started (the "
                              f"shard stream's order depends on them), not {workers}")
            workers = shard_workers
        train_set = sampler = ShardStream(
            checked.train, tokenizer, delays, max_positions=data.max_positions_per_batch, seed=t.seed,
            num_replicas=accelerator.num_processes, rank=accelerator.process_index, num_workers=workers,
            shards_per_window=data.shards_per_window, anchor=data.anchor)
        # Workers start each epoch (not persistent): they take the epoch and the resume position with them. Its own
        # generator, as below: a new iterator must not draw from the global RNG (dropout) on a resume.
        loader = DataLoader(train_set, batch_size=None, collate_fn=as_is, num_workers=workers, pin_memory=pin,
                            generator=torch.Generator().manual_seed(t.seed))
    else:
        train_set = StreamingDataset(checked.train, tokenizer, delays, anchor=data.anchor,
                                     max_seconds=data.max_seconds, seed=t.seed, pcm16=data.pcm16,
                                     stream_seconds=data.stream_seconds)
        # Lengths per epoch (each item's delay is redrawn every epoch), so buckets hold items of the same real length.
        sampler = LengthBucketSampler(train_set.lengths_in_positions, data.max_positions_per_batch, seed=t.seed,
                                      num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                                      tag_epoch=True)
        # Its own generator: each new DataLoader iterator draws a seed, which must not move the global RNG
        # (dropout), or a resumed run (a new iterator mid-epoch) would diverge from an unbroken one.
        # Persistent workers: the sampler tags each index with its epoch (tag_epoch), so they need no set_epoch.
        loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                            generator=torch.Generator().manual_seed(t.seed), pin_memory=pin,
                            persistent_workers=workers > 0)
    audio_cache = None
    if data.audio_embedding_cache:  # refuses by itself when the encoder or adapter trains
        cache_dir = data.audio_embedding_cache_dir or str(Path(t.output_root) / "audio_embedding_cache")
        audio_cache = AudioEmbeddingCache(cache_dir, model, delays.max_tokens)
    return TrainData(train_set, held_out, sampler, loader, audio_cache)


def restore(resume_from: Path, accelerator: Accelerator, state: TrainerState, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, settings: Settings, saved_config: dict | None) -> None:
    """Step 5 of a resume: weights, optimizer, scheduler and RNG (accelerate), the data position and counters
    (trainer_state.json); the lr schedule is re-derived at the restored step, so this run's settings win."""
    say = accelerator.print
    saved = TrainerState.read(resume_from)
    accelerator.load_state(str(resume_from))
    state.step, state.epoch, state.batches_in_epoch = saved.step, saved.epoch, saved.batches_in_epoch
    state.audio_seconds_seen, state.last_loss = saved.audio_seconds_seen, saved.last_loss
    state.nonfinite_events, state.lr_scale = saved.nonfinite_events, saved.lr_scale
    state.skipped_items = saved.skipped_items
    restart_schedule(optimizer, scheduler, settings.optim, state.step, state.lr_scale)  # this run's lr wins
    say(f"resumed from {resume_from}: step {state.step}, epoch {state.epoch}, batch {state.batches_in_epoch}")
    if note := lr_note(saved_config, settings_to_dict(settings), state.step, state.lr_scale):
        say(note)


def recover_from_nonfinite(accelerator: Accelerator, state: TrainerState, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler, settings: Settings, ckpt_root: Path,
                           logger: MetricsLogger) -> str | None:
    """A non-finite loss in the window after `state.step`: why the run stops, or None after rolling back to the last
    good checkpoint (train.on_nonfinite=rollback), with metrics.jsonl rewound to it."""
    t = settings.train
    failed, good = state.step + 1, last_good_checkpoint(ckpt_root, state.step + 1)
    stopped = nonfinite_stop(failed, good, state.nonfinite_events, t)
    if stopped:
        return stopped
    roll_back(accelerator, good, state, optimizer, scheduler, settings, ckpt_root)
    logger.rewind(state.step)
    accelerator.print(f"\nnon-finite loss at step {failed}: rolled back to {good}, skipped that batch, lr now x"
                      f"{state.lr_scale:g} of the schedule (event {state.nonfinite_events} of at most "
                      f"{t.max_nonfinite_events}, train.max_nonfinite_events)")
    return None


def complete_run(writer: RunWriter, evaluator: RunEvaluator, logger: MetricsLogger, state: TrainerState,
                 ckpt_root: Path) -> float | None:
    """Step 7 of a run that reached train.max_steps: every rank holds the same weights (else the launch did not
    synchronise them), the final checkpoint, `final/` weights, and the final evaluation's WER."""
    accelerator, settings = writer.accelerator, writer.settings
    checksums = rank_checksums(accelerator, writer.wrapped, settings.deepspeed.zero_stage)
    logger.log(state.step, {"world_size": accelerator.num_processes, "parameter_checksums": checksums},
               split="ranks")
    if len(set(checksums)) > 1:
        raise TrainingStopped(f"the {len(checksums)} processes ended with different weights (checksums "
                              f"{checksums}): the launch did not synchronise them")
    last = save(writer, ckpt_root, state, logger)
    final = writer.final_weights()
    accelerator.print(f"trained {state.step} steps; checkpoint {last}; weights for export {final}")
    return evaluator.final(state.step, writer.run_dir)


def forward_backward(accelerator: Accelerator, wrapped: torch.nn.Module, window: list[dict], settings: Settings,
                     pad_id: int, audio_cache: AudioEmbeddingCache | None) -> torch.Tensor | None:
    """Forward and backward of one accumulation window. Returns the summed loss statistics plus audio seconds and
    positions (a local vector, `STAT_NAMES` + 2), or None when the loss is non-finite on any rank (the caller must
    not step, and must clear the gradients the window's earlier micro-batches left).

    No host sync per micro-batch: the normaliser and the statistics stay on the device, and the non-finite flag is
    reduced once per window, before its last backward (under DeepSpeed the engine steps inside that one)."""
    t = settings.train
    # The loss normaliser: the target weight of the whole window on all ranks, counted before it runs.
    local_weight = sum(target_weights(b["labels"], pad_id, t.pad_loss_weight, t.text_loss_weight).sum()
                       for b in window)
    global_weight = accelerator.reduce(local_weight.to(accelerator.device), "sum")
    scale = backward_scale(global_weight, t.gradient_accumulation_steps, accelerator.num_processes)
    totals = torch.zeros(len(STAT_NAMES) + 2, device=accelerator.device)
    non_finite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    inputs_of = model_inputs(accelerator, window, t.loss_chunk_positions, settings.deepspeed.zero_stage)
    for index, (batch, inputs) in enumerate(zip(window, inputs_of)):
        if audio_cache is not None:  # computed on the first epoch, read back on later ones
            del inputs["input_features"]
            inputs["audio_embeds"] = audio_cache.embeddings_for(batch["input_features"], batch["n_positions"],
                                                                batch["num_delay_tokens"])
        with accelerator.accumulate(wrapped):
            weighted, stats = wrapped(**inputs)
            non_finite |= ~torch.isfinite(weighted)
            if index == len(window) - 1 and any_rank(accelerator, non_finite):
                return None
            accelerator.backward(weighted * scale)
        sizes = torch.stack([batch["audio_seconds"].sum(), torch.tensor(float(batch["input_ids"].numel()))])
        totals += torch.cat([stats, sizes.to(accelerator.device, non_blocking=True)])
    return totals


def report_skipped(accelerator: Accelerator, skipped: list[tuple[str, str]]) -> int:
    """Say each item this rank skipped (its audio no longer reads: a file changed after the pre-flight check), with
    its id; returns how many were skipped on all ranks. Every rank calls it every step (it is a collective)."""
    for uid, why in skipped:
        print(f"voxtral-train: skipped item {uid} (rank {accelerator.process_index}): {why}", file=sys.stderr)
    return int(accelerator.reduce(torch.tensor(float(len(skipped)), device=accelerator.device), "sum").item())


def save(writer: RunWriter, ckpt_root: Path, state: TrainerState, logger: MetricsLogger) -> Path:
    """A complete checkpoint of `state.step` that records whether it is good (finite loss and parameters), or
    `CheckpointWriteError` naming the failure and the last checkpoint."""
    accelerator = writer.accelerator
    state.finite = (state.last_loss is None or math.isfinite(state.last_loss)) and parameters_finite(
        accelerator, writer.wrapped)
    try:
        return save_checkpoint(ckpt_root, state, writer.checkpoint_contents, is_main=accelerator.is_main_process,
                               barrier=accelerator.wait_for_everyone, keep_last=writer.settings.train.keep_last,
                               any_rank=lambda flag: any_rank(accelerator, flag))
    except CheckpointError:
        logger.close()
        raise


def nonfinite_stop(failed: int, good: Path | None, events: int, t: TrainSettings) -> str | None:
    """Why a non-finite loss at step `failed` stops the run, or None when train.on_nonfinite=rollback goes back."""
    if t.on_nonfinite == "rollback" and good is not None and events < t.max_nonfinite_events:
        return None
    advice = (f"resume from it with lower optim.lr or longer train.warmup_steps: train.resume={good}" if good
              else "start again with lower optim.lr or longer train.warmup_steps")
    why = ""
    if t.on_nonfinite == "rollback":
        why = (f" after {events} rollbacks (train.max_nonfinite_events={t.max_nonfinite_events})" if good
               else " with no good checkpoint to roll back to")
    return (f"the loss became non-finite at step {failed}; stopped before the update{why}. Last good checkpoint "
            f"(finite loss and weights, older than the weights that gave this loss): {good or 'none'}; {advice}.")


def roll_back(accelerator: Accelerator, good: Path, state: TrainerState, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, settings: Settings, ckpt_root: Path) -> None:
    """train.on_nonfinite=rollback: weights, optimizer and RNG of `good` (verified first), its step; the data
    position stays past the offending window (skipped, not replayed); the lr is scaled down once more."""
    optimizer.zero_grad(set_to_none=True)  # what the window's earlier micro-batches accumulated
    on_main(accelerator, lambda: resolve_resume(str(good), ckpt_root), (CheckpointError,))
    accelerator.load_state(str(good))
    saved = TrainerState.read(good)
    state.step, state.audio_seconds_seen, state.last_loss = saved.step, saved.audio_seconds_seen, saved.last_loss
    state.nonfinite_events += 1
    state.lr_scale *= settings.train.nonfinite_lr_scale
    restart_schedule(optimizer, scheduler, settings.optim, state.step, state.lr_scale)


if __name__ == "__main__":  # `accelerate launch -m voxtral_train.train ...`
    from voxtral_train.cli import main

    sys.exit(main())

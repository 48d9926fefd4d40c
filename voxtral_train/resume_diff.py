"""What a resume changes: the checkpoint's resolved config (its config.yaml) against this run's, as a table.

Each changed key gets one of three outcomes:
- the schedule (optim.lr, train.max_steps / warmup_steps / schedule / min_lr_ratio): the new value wins, and the
  trainer re-derives the lr schedule at the restored step (the optimizer and scheduler states would otherwise bring
  the checkpoint's lr back from the second step on), saying what the lr was and is at that step; optim.betas and
  optim.eps are re-applied the same way (`schedule.restart_schedule`);
- what makes the continuation differ from any unbroken run (world size x batch, the model, the parameter mode, the
  seed and the training manifest, which decide the data order): refused unless `train.allow_inexact_resume=true`;
- anything else (eval, logging, loss weights, ...): the new value applies from the restored step on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from voxtral_train.checkpoint import TrainerState
from voxtral_train.schedule import lr_factor

SCHEDULE_KEYS = ("optim.lr", "train.max_steps", "train.warmup_steps", "train.schedule", "train.min_lr_ratio")
# optim.weight_decay too: the saved parameter groups (flattened under ZeRO) no longer say which one is decayed.
INEXACT_PREFIXES = ("model.path", "model.dtype", "peft.", "train.seed", "train.gradient_accumulation_steps",
                    "data.max_positions_per_batch", "data.train_manifest", "data.shards_per_window", "world_size",
                    "optim.weight_decay")
# Keys that name the resume itself (they differ on every resume and change nothing).
IGNORED = ("train.resume", "train.allow_inexact_resume")



class ResumeRefused(RuntimeError):
    """The new settings cannot continue the checkpoint exactly; the message shows the table and the override."""


SCHEDULE, INEXACT, APPLIES = "new value; lr schedule re-derived", "REFUSED: not an exact continuation", "new value"


@dataclass
class ResumeDiff:
    rows: list[tuple[str, Any, Any, str]]  # (key, checkpoint's value, this run's value, outcome)

    @property
    def inexact(self) -> list[str]:
        return [key for key, _, _, outcome in self.rows if outcome == INEXACT]

    @property
    def schedule_changed(self) -> bool:
        return any(outcome == SCHEDULE for *_, outcome in self.rows)

    def table(self) -> str:
        header = ("setting", "checkpoint", "now", "outcome")
        cells = [header, *[(key, repr(old), repr(new), outcome) for key, old, new, outcome in self.rows]]
        widths = [max(len(row[i]) for row in cells) for i in range(4)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def resume_diff(saved: dict[str, Any], now: dict[str, Any], saved_world_size: int, world_size: int) -> ResumeDiff:
    """`saved` / `now`: resolved configs (nested, as config.yaml holds them); world sizes from the trainer state and
    this launch (config.yaml does not hold it)."""
    old, new = flatten(saved), flatten(now)
    old["world_size"], new["world_size"] = saved_world_size, world_size
    rows = []
    for key in sorted(set(old) | set(new)):
        if key in IGNORED or old.get(key) == new.get(key):
            continue
        if key in SCHEDULE_KEYS:
            outcome = SCHEDULE
        elif any(key == p or (p.endswith(".") and key.startswith(p)) for p in INEXACT_PREFIXES):
            outcome = INEXACT
        else:
            outcome = APPLIES
        rows.append((key, old.get(key), new.get(key), outcome))
    return ResumeDiff(rows)


def lr_at(config: dict[str, Any], step: int, lr_scale: float = 1.0) -> float:
    """The lr `config`'s schedule gives optimizer step `step` (times a rollback's `lr_scale`)."""
    t = config["train"]
    factor = lr_factor(step, warmup_steps=t["warmup_steps"], total_steps=t["max_steps"], kind=t["schedule"],
                       min_lr_ratio=t["min_lr_ratio"])
    return config["optim"]["lr"] * lr_scale * factor


def check_resume(folder: Path, now: dict[str, Any], world_size: int, allow_inexact: bool,
                 say: Callable[[str], None]) -> dict[str, Any]:
    """Say what differs between `folder`'s config and `now`; refuse an inexact continuation unless allowed.
    Returns the checkpoint's config."""
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    diff = resume_diff(saved, now, TrainerState.read(folder).world_size, world_size)
    if not diff.rows:
        return saved
    if diff.inexact and not allow_inexact:
        raise ResumeRefused(f"train.resume: {folder} cannot be continued exactly with these settings:\n"
                            f"{diff.table()}\nRestore the checkpoint's values of {', '.join(diff.inexact)}, or pass "
                            f"train.allow_inexact_resume=true to continue anyway (the run will differ from an "
                            f"unbroken one).")
    say(f"resuming {folder} with changed settings:\n{diff.table()}")
    if diff.inexact:
        say("WARNING: train.allow_inexact_resume=true: this continuation differs from any unbroken run")
    return saved


def lr_note(saved: dict[str, Any], now: dict[str, Any], step: int, lr_scale: float) -> str:
    """"lr at step 50: 0.001 -> 0.0005" when the re-derived schedule gives step `step` another lr than the
    checkpoint's schedule would have (a new optim.lr, warmup, length or shape); empty when it does not."""
    before, after = lr_at(saved, step, lr_scale), lr_at(now, step, lr_scale)
    if before == after:
        return ""
    return (f"lr at step {step}: {before:.3g} -> {after:.3g} (the schedule of this run's optim.lr and train.* "
            f"settings, re-derived at the restored step)")

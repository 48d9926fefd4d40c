"""What a resume changes: the checkpoint's resolved config (its config.yaml) against this run's, as a table.

Each changed key gets one of three outcomes:
- the schedule (optim.lr, train.max_steps / warmup_steps / schedule / min_lr_ratio): the new value wins, and the
  trainer re-derives the lr schedule at the restored step (the optimizer and scheduler states would otherwise bring
  the checkpoint's lr back from the second step on), saying what the lr was and is at that step;
- what makes the continuation differ from any unbroken run (world size x batch, the model, the parameter mode, the
  seed and the training manifest, which decide the data order): refused unless `train.allow_inexact_resume=true`;
- anything else (eval, logging, loss weights, ...): the new value applies from the restored step on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from voxtral_train.schedule import lr_factor

SCHEDULE_KEYS = ("optim.lr", "train.max_steps", "train.warmup_steps", "train.schedule", "train.min_lr_ratio")
INEXACT_PREFIXES = ("model.path", "model.dtype", "peft.", "train.seed", "train.gradient_accumulation_steps",
                    "data.max_positions_per_batch", "data.train_manifest", "world_size")
# Keys that name the resume itself (they differ on every resume and change nothing).
IGNORED = ("train.resume", "train.allow_inexact_resume")

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
    return config["optim"]["lr"] * lr_scale * lr_factor(step, warmup_steps=t["warmup_steps"], total_steps=t["max_steps"],
                                                        kind=t["schedule"], min_lr_ratio=t["min_lr_ratio"])

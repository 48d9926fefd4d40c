"""Self-describing checkpoint folders: `<run>/checkpoints/step_000050/`, written whole or not at all.

A checkpoint is written into `step_000050.tmp/` and renamed once complete (after its files are fsynced), so an
interrupted save never becomes "latest": only folders named `step_NNNNNN` holding `trainer_state.json` count.
The last `keep_last` complete checkpoints are kept. A failed write (a full disk is an OSError) removes the partial
folder, leaves the earlier checkpoints as they were, and raises `CheckpointError` naming the good one.

Inside (what `voxtral_train.train` writes through `write`): accelerate's `save_state` files (safetensors weights or
DeepSpeed shards, optimizer, scheduler, RNG), `adapter/` for LoRA runs, `config.yaml`, `tekken.json`, and
`trainer_state.json` (where the data stood, and what must match on resume).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainerState:
    step: int  # optimizer steps done
    epoch: int  # epoch the next batch comes from
    batches_in_epoch: int  # micro-batches of that epoch this rank has consumed
    # What must match on resume (said out loud when it does not):
    seed: int
    model: str
    peft_mode: str
    world_size: int
    gradient_accumulation_steps: int
    max_positions_per_batch: int
    train_manifest: str
    # For the record:
    audio_seconds_seen: float = 0.0
    last_loss: float | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def read(cls, folder: Path) -> "TrainerState":
        path = folder / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, TypeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: unreadable trainer state ({err})") from err


RESUME_KEYS = ("seed", "model", "peft_mode", "world_size", "gradient_accumulation_steps", "max_positions_per_batch",
               "train_manifest")


def resume_mismatches(saved: TrainerState, current: TrainerState) -> list[str]:
    """Settings that differ between the checkpoint and this run ("seed: saved 0, now 1")."""
    return [f"{key}: saved {getattr(saved, key)!r}, now {getattr(current, key)!r}"
            for key in RESUME_KEYS if getattr(saved, key) != getattr(current, key)]


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (`.tmp` folders and folders without a state file skipped)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(value: str | None, root: Path) -> Path | None:
    """`train.resume`: None -> None; "latest" -> newest complete checkpoint (None if there is none); else a folder."""
    if value is None:
        return None
    if value == "latest":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    folder = Path(value)
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"train.resume={value}: not a complete checkpoint folder (no {STATE_FILE})")
    return folder


def _fsync_tree(folder: Path) -> None:
    """Flush every file and the folder entries to disk, so the rename publishes finished data."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    for directory in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(root: Path, state: TrainerState, write: Callable[[Path], None], *, is_main: bool,
                    barrier: Callable[[], None], keep_last: int) -> Path:
    """Write a checkpoint of `state.step` through `write(tmp_folder)` (called on every rank: accelerate's save_state
    is collective), then publish it and prune old ones (main process). Returns the final folder."""
    final = root / checkpoint_name(state.step)
    tmp = root / f"{final.name}.tmp"
    previous = complete_checkpoints(root)
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover from an interrupted save
            tmp.mkdir(parents=True)
        barrier()
        write(tmp)
        barrier()
        if is_main:
            (tmp / STATE_FILE).write_text(state.to_json())  # last: its presence marks a complete checkpoint
            _fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except OSError as err:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        good = previous[-1] if previous else None
        raise CheckpointError(
            f"saving checkpoint {final} failed ({err.strerror or err}); the partial folder was removed. "
            + (f"The last good checkpoint is {good} (resume with train.resume=latest)." if good
               else "There is no earlier checkpoint.")
            + " Free disk space (or lower train.keep_last) and resume."
        ) from err
    barrier()
    if is_main:
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    return final

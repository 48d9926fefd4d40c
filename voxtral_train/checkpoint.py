"""Self-describing, verified checkpoint folders: `<run>/checkpoints/step_000050/`, written whole or not at all.

A checkpoint is written into `step_000050.tmp/`; once every rank has written its files, the main process writes
`trainer_state.json`, then `manifest.json` (every file's size and sha256) last, fsyncs the folder and renames it.
The manifest decides completeness: a folder without one (a save or a pruning that was killed) never counts, and
`verify_checkpoint` names every file that is missing, changed or unexpected. Resume verifies before anything is
loaded: accelerate silently skips a missing RNG file (the resume looks fine and is not exact), and DeepSpeed and
torch optimizer files are pickles (an altered file would run code), so only the bytes this run wrote are loaded.
`train.resume=latest` falls back to the previous verified checkpoint, and says so, when the newest one fails.

The last `keep_last` checkpoints are kept; pruning removes a folder's manifest before its files. Any write failure
(OSError such as a full disk, torch's RuntimeError "file write failed", SafetensorError) becomes one
`CheckpointError`: the path, the bytes needed vs free, the partial folder removed, the previous checkpoint named.

Inside (what `voxtral_train.train` writes through `write`): accelerate's `save_state` files (safetensors weights or
DeepSpeed shards, optimizer, scheduler, RNG), `adapter/` for LoRA runs, `config.yaml`, `tekken.json`,
`trainer_state.json` (where the data stood, what must match on resume) and `manifest.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
_NAME = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, damaged, altered); the message names the files."""


class CheckpointWriteError(CheckpointError):
    """A save that failed (full disk, ...): the partial folder is gone, the previous checkpoint is named."""


@dataclass
class TrainerState:
    step: int  # optimizer steps done
    epoch: int  # epoch the next batch comes from
    batches_in_epoch: int  # micro-batches of that epoch this rank has consumed
    # For the record (a resume compares the checkpoint's config.yaml and world size: voxtral_train.resume_diff):
    seed: int
    model: str
    peft_mode: str
    world_size: int
    gradient_accumulation_steps: int
    max_positions_per_batch: int
    train_manifest: str
    audio_seconds_seen: float = 0.0
    last_loss: float | None = None
    # The last step's loss and every parameter were finite when this was saved (the first test of "good").
    finite: bool = True
    # train.on_nonfinite=rollback: events so far and the lr multiplier they left (a resume continues with both).
    nonfinite_events: int = 0
    lr_scale: float = 1.0
    skipped_items: int = 0  # items whose audio stopped reading during the run, all ranks, since step 0
    shard_workers: int | None = None  # a shard corpus's DataLoader workers per process (its order depends on them)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def read(cls, folder: Path) -> "TrainerState":
        path = folder / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, TypeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: unreadable trainer state ({err})") from err


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_step(folder: Path) -> int:
    match = _NAME.match(folder.name)
    if not match:
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected step_NNNNNN)")
    return int(match.group(1))


def _step_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=checkpoint_step)


def complete_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints under `root` (a manifest present), oldest first. Listing only: `verify_checkpoint`
    checks the bytes."""
    return [p for p in _step_folders(root) if (p / MANIFEST_FILE).is_file()]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def _hashes(folder: Path, names: list[str]) -> dict[str, str]:
    # hashlib releases the GIL: a few threads hash a multi-GB checkpoint's files side by side.
    with ThreadPoolExecutor(max_workers=min(8, len(names) or 1)) as pool:
        return dict(zip(names, pool.map(lambda name: _sha256(folder / name), names)))


def write_manifest(folder: Path, step: int) -> None:
    """`manifest.json`: every other file's size and sha256. Written last (its presence publishes the folder)."""
    names = _files(folder)
    hashes = _hashes(folder, names)
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": hashes[name]} for name in names}
    (folder / MANIFEST_FILE).write_text(json.dumps({"step": step, "files": files}, indent=1))


def manifest_bytes(folder: Path) -> int:
    """Total size of a checkpoint's files, from its manifest (0 when it has none)."""
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    except (OSError, KeyError, json.JSONDecodeError):
        return 0
    return sum(entry["bytes"] for entry in files.values())


def verify_checkpoint(folder: Path) -> list[str]:
    """What is wrong with `folder` against its manifest (empty: every file is there, unchanged, nothing added)."""
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return [f"{MANIFEST_FILE}: missing (the save or the pruning of this folder did not finish)"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
        return [f"{MANIFEST_FILE}: unreadable ({err})"]
    present = set(_files(folder))
    problems = [f"{name}: missing" for name in sorted(set(files) - present)]
    problems += [f"{name}: not written by the run (not in {MANIFEST_FILE})" for name in sorted(present - set(files))]
    sizes = {name: (folder / name).stat().st_size for name in sorted(present & set(files))}
    same_size = [name for name, size in sizes.items() if size == files[name]["bytes"]]
    problems += [f"{name}: {size} bytes, the run wrote {files[name]['bytes']}" for name, size in sizes.items()
                 if name not in same_size]
    hashes = _hashes(folder, same_size)
    problems += [f"{name}: changed since the run wrote it (sha256 differs)" for name in same_size
                 if hashes[name] != files[name]["sha256"]]
    return problems


def last_good_checkpoint(root: Path, failed_step: int) -> Path | None:
    """The newest checkpoint a run that failed at optimizer step `failed_step` can go back to: saved with a finite
    loss and finite parameters, and older than step `failed_step - 1` (that one holds the very weights whose loss
    was non-finite; finite but diverged weights look fine by every other test)."""
    for folder in reversed(complete_checkpoints(root)):
        if checkpoint_step(folder) < failed_step - 1 and TrainerState.read(folder).finite:
            return folder
    return None


def resolve_resume(value: str | None, root: Path, say: Callable[[str], None] = print) -> Path | None:
    """`train.resume`: None -> None; "latest" -> the newest checkpoint that verifies (None if there is none at all),
    saying which newer ones were skipped and why; else that folder, which must verify."""
    if value is None:
        return None
    if value == "latest":
        refused: list[str] = []
        for folder in reversed(complete_checkpoints(root)):
            problems = verify_checkpoint(folder)
            if not problems:
                if refused:
                    say(f"train.resume=latest: falling back to {folder}, the newest checkpoint that verifies")
                return folder
            refused.append(f"{folder}: " + "; ".join(problems))
            say(f"train.resume=latest: skipping {folder}: " + "; ".join(problems))
        if refused:
            raise CheckpointError("train.resume=latest: no checkpoint in " + str(root) + " verifies:\n  "
                                  + "\n  ".join(refused))
        return None
    folder = Path(value)
    if not folder.is_dir():
        raise CheckpointError(f"train.resume={value}: no such checkpoint folder")
    problems = verify_checkpoint(folder)
    if problems:
        raise CheckpointError(f"train.resume={value}: refused, the folder is not what the run wrote:\n  "
                              + "\n  ".join(problems))
    return folder


def _fsync_tree(folder: Path) -> None:
    """Flush every file and the folder entries to disk, so the rename publishes finished data."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    for directory in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_checkpoint(folder: Path) -> None:
    """Unpublish first (manifest removed and flushed), then delete: a kill half-way leaves a folder that never
    counts."""
    (folder / MANIFEST_FILE).unlink(missing_ok=True)
    _fsync_dir(folder)
    shutil.rmtree(folder)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _is_write_failure(err: BaseException) -> bool:
    """Errors a failed write raises: OSError (full disk, permissions), SafetensorError, and torch's RuntimeError from
    its zip writer. A collective error (a rank that died) is also a RuntimeError and must stay what it is."""
    import torch.distributed

    if isinstance(err, torch.distributed.DistError):
        return False
    return isinstance(err, (OSError, RuntimeError, SafetensorError)) and not isinstance(err, CheckpointError)


def _gib(n: int) -> str:
    if n < 2**20:
        return f"{n} bytes"
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def save_checkpoint(root: Path, state: TrainerState, write: Callable[[Path], None], *, is_main: bool,
                    barrier: Callable[[], None], keep_last: int,
                    any_rank: Callable[[bool], bool] = lambda flag: flag) -> Path:
    """Write a checkpoint of `state.step` through `write(tmp_folder)` (called on every rank: accelerate's save_state
    is collective), then publish it and prune old ones (main process). `any_rank(flag)` is true on every rank when
    it is true on one, so a write that fails on any rank fails the save everywhere (no rank waits forever).
    Returns the final folder."""
    final = root / checkpoint_name(state.step)
    tmp = root / f"{final.name}.tmp"
    previous = complete_checkpoints(root)
    failure: BaseException | None = None
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover from an interrupted save
            tmp.mkdir(parents=True)
        barrier()
        write(tmp)
    except Exception as err:  # sorted here: write failures become one CheckpointError, anything else stays
        if not _is_write_failure(err):
            raise
        failure = err
    if any_rank(failure is not None):
        raise _save_failed(final, tmp, previous, failure, is_main) from failure
    barrier()
    try:
        if is_main:
            (tmp / STATE_FILE).write_text(state.to_json())
            write_manifest(tmp, state.step)  # last: its presence marks a complete checkpoint
            _fsync_tree(tmp)
            if final.exists():  # the same step saved before (a resume that fell back past it)
                remove_checkpoint(final)
            os.replace(tmp, final)
            _fsync_dir(root)
    except Exception as err:
        if not _is_write_failure(err):
            raise
        failure = err
    if any_rank(failure is not None):
        raise _save_failed(final, tmp, previous, failure, is_main) from failure
    if is_main:
        prune(root, keep_last)
    barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints; also clear what killed saves and prunes left (unpublished folders)."""
    published = complete_checkpoints(root)
    for old in published[:-keep_last]:
        remove_checkpoint(old)
    for leftover in [p for p in _step_folders(root) if not (p / MANIFEST_FILE).is_file()]:
        shutil.rmtree(leftover)
    for leftover in root.glob("step_*.tmp"):
        shutil.rmtree(leftover)


def _save_failed(final: Path, tmp: Path, previous: list[Path], failure: BaseException | None,
                 is_main: bool) -> CheckpointWriteError:
    """The one message of a failed save; the main process removes the partial folder first."""
    written = _folder_bytes(tmp) if is_main else 0
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if failure is None:
        return CheckpointWriteError(f"saving checkpoint {final} failed on another process (its message says why)")
    where = getattr(failure, "filename", None) or tmp
    what = (failure.strerror if isinstance(failure, OSError) and failure.strerror else str(failure)).strip()
    needed = manifest_bytes(previous[-1]) if previous else 0
    free = shutil.disk_usage(final.parent).free if final.parent.exists() else 0
    size = (f"it needs about {_gib(needed)} (the size of the previous checkpoint)" if needed
            else f"it had written {_gib(written)} when it failed")
    lines = [f"saving checkpoint {final} failed: {what} (writing {where}).",
             f"Space: {size}; {_gib(free)} free on {final.parent} now.",
             f"The partial folder {tmp} was removed."]
    if previous:
        problems = verify_checkpoint(previous[-1])
        lines.append(f"The last checkpoint {previous[-1]} is " + (
            "intact (verified): resume with train.resume=latest." if not problems
            else "damaged too: " + "; ".join(problems)))
    else:
        lines.append("There is no earlier checkpoint.")
    lines.append("Free disk space (or lower train.keep_last, or save elsewhere with train.output_root) and resume.")
    return CheckpointWriteError("\n  ".join(lines))

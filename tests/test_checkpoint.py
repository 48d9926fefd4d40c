import errno
from dataclasses import replace

import pytest

from voxtral_train.checkpoint import (
    STATE_FILE,
    CheckpointError,
    TrainerState,
    complete_checkpoints,
    resolve_resume,
    resume_mismatches,
    save_checkpoint,
)

STATE = TrainerState(step=0, epoch=0, batches_in_epoch=0, seed=0, model="tiny", peft_mode="full", world_size=1,
                     gradient_accumulation_steps=1, max_positions_per_batch=768, train_manifest="bundled:train")


def _save(root, step, write=None, keep_last=2):
    def default_write(folder):
        (folder / "weights.bin").write_bytes(bytes([step % 256]) * 10)

    return save_checkpoint(root, replace(STATE, step=step), write or default_write, is_main=True,
                           barrier=lambda: None, keep_last=keep_last)


def test_save_publishes_complete_folders_and_keeps_the_last_k(tmp_path):
    for step in (5, 10, 15):
        _save(tmp_path, step)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000010", "step_000015"]
    assert not list(tmp_path.glob("*.tmp"))
    assert TrainerState.read(tmp_path / "step_000015") == replace(STATE, step=15)
    assert (tmp_path / "step_000015" / "weights.bin").read_bytes() == bytes([15]) * 10


def test_interrupted_save_never_becomes_latest(tmp_path):
    _save(tmp_path, 5)
    (tmp_path / "step_000010.tmp").mkdir()  # a save killed mid-way
    (tmp_path / "step_000010.tmp" / "weights.bin").write_bytes(b"partial")
    (tmp_path / "step_000020").mkdir()  # a folder without trainer_state.json
    assert resolve_resume("latest", tmp_path) == tmp_path / "step_000005"


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    good = _save(tmp_path, 5)

    def fails(folder):
        (folder / "weights.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError) as err:
        _save(tmp_path, 10, write=fails, keep_last=1)
    message = str(err.value)
    assert "No space left on device" in message and str(good) in message
    assert complete_checkpoints(tmp_path) == [good]
    assert (good / "weights.bin").read_bytes() == bytes([5]) * 10
    assert not (tmp_path / "step_000010.tmp").exists() and not (tmp_path / "step_000010").exists()


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path / "none_yet") is None
    folder = _save(tmp_path, 7)
    assert resolve_resume(str(folder), tmp_path) == folder
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "step_000099"), tmp_path)


def test_unreadable_state_is_named(tmp_path):
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=STATE_FILE):
        TrainerState.read(tmp_path)


def test_resume_mismatches_name_each_setting():
    now = replace(STATE, seed=1, world_size=2)
    assert resume_mismatches(STATE, now) == ["seed: saved 0, now 1", "world_size: saved 1, now 2"]
    assert resume_mismatches(STATE, replace(STATE, step=9)) == []

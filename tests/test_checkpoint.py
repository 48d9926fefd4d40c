import errno
from dataclasses import replace

import pytest

from safetensors import SafetensorError

from voxtral_train.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointError,
    TrainerState,
    complete_checkpoints,
    prune,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
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
    assert "No space left on device" in message and f"{good} is intact (verified)" in message
    assert "free on" in message and "removed" in message
    assert complete_checkpoints(tmp_path) == [good]
    assert (good / "weights.bin").read_bytes() == bytes([5]) * 10
    assert not (tmp_path / "step_000010.tmp").exists() and not (tmp_path / "step_000010").exists()


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path / "none_yet") is None
    folder = _save(tmp_path, 7)
    assert resolve_resume(str(folder), tmp_path) == folder
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "step_000099"), tmp_path)


def test_unreadable_state_is_named(tmp_path):
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=STATE_FILE):
        TrainerState.read(tmp_path)


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64"),
                                   SafetensorError("Error while serializing: IoError(No space left on device)")])
def test_torch_and_safetensors_write_errors_are_one_message(tmp_path, error):
    good = _save(tmp_path, 5)

    def fails(folder):
        (folder / "weights.bin").write_bytes(b"half")
        raise error

    with pytest.raises(CheckpointError, match="saving checkpoint .*step_000010 failed") as err:
        _save(tmp_path, 10, write=fails)
    size = sum(f.stat().st_size for f in good.iterdir() if f.name != MANIFEST_FILE)  # what the previous one holds
    assert str(error) in str(err.value) and f"needs about {size} bytes" in str(err.value)
    assert complete_checkpoints(tmp_path) == [good] and not list(tmp_path.glob("*.tmp"))


def test_a_failure_on_another_rank_fails_the_save_here(tmp_path):
    _save(tmp_path, 5)
    with pytest.raises(CheckpointError, match="another process"):
        save_checkpoint(tmp_path, replace(STATE, step=10), lambda folder: None, is_main=True, barrier=lambda: None,
                        keep_last=2, any_rank=lambda flag: True)
    assert not (tmp_path / "step_000010.tmp").exists() and not (tmp_path / "step_000010").exists()


def test_the_manifest_names_missing_changed_and_added_files(tmp_path):
    folder = _save(tmp_path, 5, write=lambda f: [(f / "optimizer.bin").write_bytes(b"x" * 8),
                                                 (f / "random_states_0.pkl").write_bytes(b"r")])
    assert verify_checkpoint(folder) == []
    (folder / "optimizer.bin").write_bytes(b"y" * 8)  # same size, other bytes (an altered pickle)
    (folder / "random_states_0.pkl").unlink()
    (folder / "extra.pkl").write_bytes(b"e")
    assert verify_checkpoint(folder) == ["random_states_0.pkl: missing",
                                         "extra.pkl: not written by the run (not in manifest.json)",
                                         "optimizer.bin: changed since the run wrote it (sha256 differs)"]
    with pytest.raises(CheckpointError, match="optimizer.bin: changed") as err:
        resolve_resume(str(folder), tmp_path)
    assert "random_states_0.pkl: missing" in str(err.value)


def test_latest_falls_back_to_the_newest_verified_checkpoint_and_says_so(tmp_path):
    older, newer = _save(tmp_path, 5), _save(tmp_path, 10)
    (newer / "weights.bin").write_bytes(b"truncated")
    said = []
    assert resolve_resume("latest", tmp_path, say=said.append) == older
    assert "skipping" in said[0] and "weights.bin: 9 bytes, the run wrote 10" in said[0]
    assert said[1] == f"train.resume=latest: falling back to {older}, the newest checkpoint that verifies"
    (older / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="no checkpoint .* verifies"):
        resolve_resume("latest", tmp_path, say=said.append)


def test_a_pruning_killed_half_way_never_counts_and_is_cleared(tmp_path):
    old, kept = _save(tmp_path, 5), _save(tmp_path, 10)
    # What a kill during pruning leaves: the manifest is removed first, then some of the files.
    (old / MANIFEST_FILE).unlink()
    (old / STATE_FILE).unlink()
    assert complete_checkpoints(tmp_path) == [kept] and resolve_resume("latest", tmp_path) == kept
    (tmp_path / "step_000015.tmp").mkdir()
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000010"]


def test_saving_a_step_again_replaces_it(tmp_path):
    """A resume that fell back past a damaged step_N saves step_N again: the new folder replaces the old one."""
    _save(tmp_path, 5)
    damaged = _save(tmp_path, 10)
    (damaged / "weights.bin").write_bytes(b"bad")
    again = _save(tmp_path, 10)
    assert again == damaged and verify_checkpoint(again) == []

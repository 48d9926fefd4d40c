"""Whole-recipe runs of the tiny model on the bundled speech set, in this process (single CPU process)."""

import json
import shutil

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from voxtral_train.checkpoint import complete_checkpoints
from voxtral_train.config import compose_settings
from voxtral_train.train import train

# A few steps, small batches, no tensorboard: the shape of a run, not its quality.
FAST = ["+experiment=tiny_demo", "train.warmup_steps=2", "logging.progress_bar=false", "logging.tensorboard=false", "train.log_every=1",
        "data.max_positions_per_batch=300", "train.eval_every=0", "data.final_eval_split=none", "train.save_every=2"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each run builds its own Accelerator; accelerate keeps process-wide state between them otherwise."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def run(tmp_path, *overrides):
    return train(compose_settings([*FAST, f"train.output_root={tmp_path}", *overrides]))


def metrics(run_dir, split="train"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["split"] == split]


def test_run_folder_loss_falls_and_periodic_eval(tmp_path):
    result = run(tmp_path, "train.name=shape", "train.max_steps=6", "optim.lr=3e-3", "train.eval_every=3",
                 "train.eval_wer_clips=2", "data.final_eval_split=eval", "train.keep_last=2")
    run_dir = tmp_path / "shape"
    assert result.run_dir == run_dir and result.final_step == 6 and result.stopped is None
    assert len(result.losses) == 6 and result.losses[-1] < result.losses[0] - 0.3
    assert [row["step"] for row in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert [row["loss"] for row in metrics(run_dir)] == pytest.approx(result.losses)
    evals = metrics(run_dir, "eval")
    assert [row["step"] for row in evals] == [0, 3] and evals[1]["loss"] < evals[0]["loss"]  # step 0: before training
    assert all(0 <= row["wer"] and row["loss"] > 0 for row in evals)
    assert metrics(run_dir, "ranks")[0]["world_size"] == 1
    # Checkpoints: the last two, each self-describing.
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["step_000004", "step_000006"]
    last = run_dir / "checkpoints" / "step_000006"
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "config.yaml", "tekken.json",
                 "trainer_state.json"):
        assert (last / name).is_file(), name
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 6
    assert "train:" in (run_dir / "config.yaml").read_text()
    report = json.loads((run_dir / "eval" / "report.json").read_text())  # the voxtral-eval report
    assert report["settings"]["manifest"] == "bundled:eval" and report["models"][0]["n_utterances"] == 8
    assert result.final_wer == report["models"][0]["delays"][0]["wer_norm"]
    assert len((run_dir / "eval" / "errors.jsonl").read_text().splitlines()) == 8
    assert (run_dir / "eval" / "wer_vs_delay.png").is_file()
    assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "final" / "tekken.json").is_file()
    assert "training loss" in (run_dir / "summary.md").read_text()


def test_lora_run_writes_an_adapter_per_checkpoint(tmp_path, caplog):
    run(tmp_path, "train.name=lora", "peft=lora", "train.max_steps=2", "train.gradient_checkpointing=true")
    last = tmp_path / "lora" / "checkpoints" / "step_000002"
    assert (last / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "lora" / "final" / "adapter_config.json").is_file()
    # the tied lm_head is stored once by design: accelerate's "check by verifying" warning about it is dropped
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]


def test_exact_resume_matches_an_unbroken_run(tmp_path):
    """4 unbroken steps vs. the same run cut at its step-2 checkpoint and resumed: same losses, same weights."""
    unbroken = run(tmp_path, "train.name=unbroken", "train.max_steps=4", "train.gradient_accumulation_steps=2",
                   "peft=lora", "peft.dropout=0.1")  # dropout: the RNG state must come back too
    shutil.copytree(tmp_path / "unbroken", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_000004")
    resumed = run(tmp_path, "train.name=resumed", "train.max_steps=4", "train.gradient_accumulation_steps=2",
                  "peft=lora", "peft.dropout=0.1", "train.resume=latest")
    assert resumed.final_step == 4 and len(resumed.losses) == 2
    assert resumed.losses == pytest.approx(unbroken.losses[2:], abs=1e-6, rel=0)
    a = load_file(tmp_path / "unbroken" / "checkpoints" / "step_000004" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step_000004" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    run(tmp_path, "train.name=once", "train.max_steps=2")
    with pytest.raises(RuntimeError, match="train.resume=latest"):
        run(tmp_path, "train.name=once", "train.max_steps=2")


def test_non_finite_loss_stops_and_keeps_the_previous_checkpoint(tmp_path):
    # lr 1e30 turns every weight into +-1e30 in one Adam step: the next forward overflows.
    result = run(tmp_path, "train.name=blowup", "train.max_steps=5", "optim.lr=1e30", "train.warmup_steps=0",
                 "train.save_every=1", "train.keep_last=3")
    # step_000001 holds the +-1e30 weights (finite, but they gave the non-finite loss): not a good checkpoint.
    assert result.stopped and "non-finite at step 2" in result.stopped and "gave this loss): none" in result.stopped
    assert result.final_step == 1
    assert [p.name for p in complete_checkpoints(tmp_path / "blowup" / "checkpoints")] == ["step_000001"]
    assert not (tmp_path / "blowup" / "final").exists()
    assert "stopped early" in (tmp_path / "blowup" / "summary.md").read_text()


def test_audio_embedding_cache_trains_identically(tmp_path):
    """Plain LoRA over two epochs of the 8 eval clips: the cached run reads the encoder's output back from disk in
    the second epoch and gives the same losses as the uncached run."""
    common = ["peft=lora", "peft.dropout=0.0", "data.train_manifest=bundled:eval", "data.eval_manifest=null",
              "train.max_steps=6", "optim.lr=3e-3", "train.save_every=0", "data.delays_ms=[240,480,960]"]
    plain = run(tmp_path, "train.name=plain", *common)
    cached = run(tmp_path, "train.name=cached", *common, "data.audio_embedding_cache=true")
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6)
    data_files = list((tmp_path / "audio_embedding_cache").rglob("data-*.bin"))
    assert len(data_files) == 1, "the cache wrote nothing, or a file per batch"


def test_audio_embedding_cache_refuses_a_trained_encoder(tmp_path):
    from voxtral_train.embedding_cache import EmbeddingCacheError

    with pytest.raises(EmbeddingCacheError):
        run(tmp_path, "train.name=bad", "peft=lora_unfreeze_encoder", "data.audio_embedding_cache=true",
            "train.max_steps=1")


def test_bf16_mixed_precision_runs_and_tracks_fp32(tmp_path):
    fp32 = run(tmp_path, "train.name=fp32", "train.max_steps=2", "train.save_every=0")
    AcceleratorState._reset_state(True)  # the mixed-precision setting is process-wide state in accelerate
    bf16 = run(tmp_path, "train.name=bf16", "train.max_steps=2", "train.save_every=0", "train.mixed_precision=bf16")
    # same data and init: the first loss differs only by bf16 rounding (relative 1e-2), and it trains
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], rel=1e-2) and bf16.losses[0] != fp32.losses[0]
    assert bf16.losses[1] < bf16.losses[0]


def test_a_lora_run_folder_serves_as_the_adapter(tmp_path):
    from tiny_inputs import tiny_logits

    from voxtral_train import load_model
    from voxtral_train.evaluate import load_for_eval
    from voxtral_train.trainable import find_adapter_dir

    result = run(tmp_path, "train.name=lora", "peft=lora_unfreeze_adapter", "peft.dropout=0.0", "train.max_steps=2")
    checkpoint = complete_checkpoints(result.run_dir / "checkpoints")[-1]
    assert find_adapter_dir(result.run_dir) == result.run_dir / "final"
    assert find_adapter_dir(checkpoint) == checkpoint / "adapter"
    from_run, _ = load_for_eval("tiny", str(result.run_dir))
    from_checkpoint, _ = load_for_eval("tiny", str(checkpoint))
    assert torch.equal(tiny_logits(from_run), tiny_logits(from_checkpoint))  # both hold step 2
    base, _ = load_model("tiny")  # the run's starting weights (same seed)
    projector = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(from_run.state_dict()[projector], base.state_dict()[projector])  # the unfrozen part came
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        find_adapter_dir(tmp_path)

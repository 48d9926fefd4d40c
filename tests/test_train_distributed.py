"""Two CPU processes through `accelerate launch` (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3 on the tiny model.

Each run must (a) really start two synchronised processes (the trainer gathers every rank's parameter checksum and
stops if they differ; we also check world_size), (b) lower the loss, and (c) match a single-process run with the
same global batch: two ranks with one micro-batch each see the batches one process sees as a window of two
accumulation steps, and the loss is normalised by the global target weight, so the losses agree up to float
summation order (tolerance 1e-4 absolute on losses around 7, three steps).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from voxtral_train.config import compose_settings
from voxtral_train.train import train

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["+experiment=tiny_demo", "train.max_steps=3", "train.warmup_steps=1", "optim.lr=3e-3", "data.max_positions_per_batch=300",
          "train.eval_every=0", "data.final_eval_split=none", "train.save_every=0", "train.log_every=1",
          "logging.tensorboard=false", "logging.progress_bar=false"]
TOLERANCE = 1e-4

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["split"] == "train"]


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory) -> list[float]:
    AcceleratorState._reset_state(True)
    out = tmp_path_factory.mktemp("single")
    result = train(compose_settings([*COMMON, f"train.output_root={out}", "train.name=single",
                                     "train.gradient_accumulation_steps=2"]))
    AcceleratorState._reset_state(True)
    return result.losses


def launch_two(tmp_path: Path, deepspeed: str, *overrides: str) -> None:
    """`accelerate launch` of two CPU processes (gloo) running `voxtral_train.train` with COMMON + overrides."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           # DeepSpeed compiles a small C++ op on its first multi-process run (~80 s): keep it in a cache.
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache" / "voxtral-train" / "torch_extensions"))}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "cpu_2proc.yaml"),
               "--main_process_port", str(_free_port()), "-m", "voxtral_train.train", *COMMON,
               f"train.output_root={tmp_path}", f"deepspeed={deepspeed}", *overrides]
    if deepspeed == "none":
        env["ACCELERATE_USE_CPU"] = "1"  # DDP on CPU; with DeepSpeed it must stay unset (it turns DeepSpeed off)
    else:
        env.pop("ACCELERATE_USE_CPU", None)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.mark.parametrize("deepspeed", ["none", "zero2", "zero3"])
def test_two_processes_match_one(tmp_path, deepspeed, single_process_losses):
    launch_two(tmp_path, deepspeed, "train.name=run")
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (ranks,) = [row for row in rows if row["split"] == "ranks"]
    assert ranks["world_size"] == 2 and len(set(ranks["parameter_checksums"])) == 1, ranks
    losses = _train_losses(run_dir)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert losses == pytest.approx(single_process_losses, abs=TOLERANCE, rel=0)
    state = json.loads((run_dir / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    shards = sorted(p.name for p in (run_dir / "checkpoints" / "step_000003").rglob("*zero_pp_rank_*"))
    if deepspeed == "none":
        assert not shards
    else:  # DeepSpeed really ran: one ZeRO shard of the optimizer (and of the parameters) per rank
        assert any("rank_0" in name for name in shards) and any("rank_1" in name for name in shards), shards


def test_zero3_resume_matches_an_unbroken_run(tmp_path):
    """ZeRO-3 over two processes: 4 unbroken steps vs. the same run cut at its step-2 checkpoint (sharded weights and
    optimizer) and resumed; the resumed steps give the same losses."""
    launch_two(tmp_path, "zero3", "train.name=unbroken", "train.max_steps=4", "train.save_every=2")
    shutil.copytree(tmp_path / "unbroken", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_000004")
    metrics = tmp_path / "resumed" / "metrics.jsonl"  # keep the first two steps' rows, as an interrupted run would
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["split"] == "train" and json.loads(line)["step"] <= 2))
    launch_two(tmp_path, "zero3", "train.name=resumed", "train.max_steps=4", "train.save_every=2",
               "train.resume=latest")
    unbroken, resumed = _train_losses(tmp_path / "unbroken"), _train_losses(tmp_path / "resumed")
    assert len(unbroken) == len(resumed) == 4
    assert resumed == pytest.approx(unbroken, abs=1e-5, rel=0)


def test_two_processes_stream_their_own_shards(tmp_path):
    """DDP over a shard corpus of an odd number of shards: each rank reads floor(7 / 2) = 3 shards an epoch, both
    serve the same number of batches, and 10 steps run through several epochs to equal weights on both ranks."""
    from voxtral_train.manifest import read_manifest
    from voxtral_train.shard_stream import plan_epoch
    from voxtral_train.shards import ShardIndex, write_shards

    write_shards(read_manifest("bundled:train")[:25], tmp_path / "corpus", shard_bytes=100_000, seed=0)
    index = ShardIndex.open(tmp_path / "corpus")
    assert len(index.names) % 2 == 1
    lengths = index.samples // 1280 + 20
    plans = [plan_epoch(index, lengths, 0, 0, 2, rank, 1, 2, 300) for rank in (0, 1)]
    assert len(plans[0].served) == len(plans[1].served) < 10  # several epochs in 10 steps
    launch_two(tmp_path, "none", "train.name=run", f"data.train_manifest={tmp_path / 'corpus'}", "train.max_steps=10",
               "data.num_workers=1")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (ranks,) = [row for row in rows if row["split"] == "ranks"]
    assert ranks["world_size"] == 2 and len(set(ranks["parameter_checksums"])) == 1, ranks
    losses = _train_losses(tmp_path / "run")
    assert len(losses) == 10 and losses[-1] < losses[0]

"""Fault storm: one tiny-model run interrupted over and over, then compared with the same run unbroken.

Every restart is `voxtral-train ... train.resume=latest` in a fresh process. Faults, in a seeded random order:
SIGTERM (graceful stop: exit 75 and a checkpoint), SIGKILL at a random moment (inside a step or inside a save),
and between restarts an altered byte in the newest checkpoint's optimizer file or a removed RNG file (the resume
must skip that checkpoint and fall back to the previous one). At the end: one metrics row per step, every step's
loss and lr against the unbroken run, and the final weights.

    python benchmarks/fault_storm.py --steps 30 --faults 16 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from voxtral_train.checkpoint import complete_checkpoints

BASE = ["train.warmup_steps=3", "logging.progress_bar=false", "logging.tensorboard=false", "train.log_every=1",
        "data.max_positions_per_batch=300", "train.eval_every=0", "data.final_eval_split=none", "train.save_every=2",
        "train.keep_last=3", "optim.lr=3e-3", "data.num_workers=0"]


def launch(root: Path, name: str, steps: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "voxtral_train.train", *BASE, f"train.max_steps={steps}",
                             f"train.output_root={root}", f"train.name={name}", "train.resume=latest"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a row half-written when the process was killed
            continue
        if row["split"] == "train":
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--faults", type=int, default=16, help="signals to send (damaged checkpoints come on top)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="fault_storm_"))
    started = time.time()

    reference = launch(root, "unbroken", args.steps)
    out, _ = reference.communicate()
    assert reference.returncode == 0, out[-3000:]

    run_dir = root / "storm"
    counts: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    where: Counter[str] = Counter()
    fallbacks = signals = 0
    while True:
        process, launched = launch(root, "storm", args.steps), time.time()
        fault = rng.choice(["SIGTERM", "SIGKILL", "SIGKILL"]) if signals < args.faults else None
        if fault:
            before = len(train_rows(run_dir))
            while len(train_rows(run_dir)) <= before and process.poll() is None:  # the restart is training again
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.0))  # somewhere in a step or a save (one every 2 steps)
            if process.poll() is None:
                process.send_signal(getattr(signal, fault))
                counts[fault] += 1
                signals += 1
        out, _ = process.communicate()
        fallbacks += out.count("falling back to")
        code = process.returncode
        outcomes[{0: "finished", 75: "stopped gracefully (75)", -9: "killed (-9)"}.get(code, f"exit {code}")] += 1
        if code == 0:
            break
        assert code in (75, -9), out[-3000:]
        # Where the kill landed, from what this process left (folders it touched: mtime after its start).
        ckpts = run_dir / "checkpoints"
        touched = [p for p in ckpts.iterdir() if p.stat().st_mtime >= launched] if ckpts.is_dir() else []
        if code == -9 and any(p.name.endswith(".tmp") for p in touched):
            where["SIGKILL inside a save (a .tmp folder left)"] += 1
        if code == -9 and any(not p.name.endswith(".tmp") and not (p / "manifest.json").exists() for p in touched):
            where["SIGKILL inside a pruning (an unpublished folder left)"] += 1
        if code == 75:
            assert "to continue: voxtral-train" in out, out[-2000:]
        published = complete_checkpoints(run_dir / "checkpoints")
        if len(published) >= 2 and rng.random() < 0.3:  # damage the newest checkpoint: the next start falls back
            newest = published[-1]
            if rng.random() < 0.5:
                with (newest / "optimizer.bin").open("r+b") as f:
                    f.seek(100)
                    byte = f.read(1)
                    f.seek(100)
                    f.write(bytes([byte[0] ^ 0xFF]))
                counts["altered optimizer.bin"] += 1
            else:
                (newest / "random_states_0.pkl").unlink()
                counts["removed random_states_0.pkl"] += 1

    got, want = train_rows(run_dir), train_rows(root / "unbroken")
    assert [r["step"] for r in got] == list(range(1, args.steps + 1)), [r["step"] for r in got]
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want))
    lr_diff = max(abs(a["lr"] - b["lr"]) for a, b in zip(got, want))
    a = load_file(run_dir / "final" / "model.safetensors")
    b = load_file(root / "unbroken" / "final" / "model.safetensors")
    weight_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(json.dumps({"faults": dict(counts), "landed": dict(where), "processes": dict(outcomes),
                      "fallbacks_said": fallbacks,
                      "rows": len(got), "max_loss_diff": loss_diff, "max_lr_diff": lr_diff,
                      "max_weight_diff": weight_diff, "torch": torch.__version__,
                      "minutes": round((time.time() - started) / 60, 1)}, indent=1))
    shutil.rmtree(root)


if __name__ == "__main__":
    main()

import json
from pathlib import Path

import yaml

from voxtral_train.config import LoggingSettings
from voxtral_train.run_log import MetricsLogger, wandb_mode

ROOT = Path(__file__).resolve().parent.parent


def test_wandb_mode_never_needs_a_key(tmp_path):
    no_netrc = {"NETRC": str(tmp_path / "absent")}
    assert wandb_mode({**no_netrc, "WANDB_MODE": "disabled"}) == ("disabled", None)
    assert wandb_mode({**no_netrc, "WANDB_API_KEY": "k"}) == ("online", None)
    mode, warning = wandb_mode(no_netrc)
    assert mode == "offline" and "no API key" in warning


def test_jsonl_and_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(tmp_path, LoggingSettings(tensorboard=True, wandb=True), {"a": 1}, "run", is_main=True)
    logger.log(1, {"loss": 2.5, "note": "x"})
    logger.log(2, {"loss": float("nan")}, split="eval")
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1, "split": "train", "loss": 2.5, "note": "x"} and rows[1]["split"] == "eval"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_non_main_process_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, LoggingSettings(), {}, "run", is_main=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not list(tmp_path.iterdir())


def test_launch_configs_parse():
    sizes = {}
    for path in sorted((ROOT / "launch").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        assert config["use_cpu"] is False, path  # use_cpu: true: accelerate skips distribution (docs/ENVIRONMENT.md)
        sizes[path.stem] = (config["num_machines"], config["num_processes"])
    assert sizes == {"1gpu": (1, 1), "2node_8gpu": (2, 16), "8gpu_zero2": (1, 8), "8gpu_zero3": (1, 8),
                     "cpu_2proc": (1, 2)}


def _steps(path):
    return [(row["step"], row["split"]) for row in map(json.loads, path.read_text().splitlines())]


def test_resume_and_rollback_keep_one_row_per_step(tmp_path):
    logger = MetricsLogger(tmp_path, LoggingSettings(tensorboard=False), {}, "run", is_main=True)
    for step in (1, 2, 3, 4):
        logger.log(step, {"loss": 1.0})
    logger.log(4, {"loss": 0.5}, split="eval")
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "spl')  # torn by a kill mid-write
    resumed = MetricsLogger(tmp_path, LoggingSettings(tensorboard=False), {}, "run", is_main=True, resume_step=2)
    resumed.log(3, {"loss": 0.9})
    resumed.rewind(2)  # a rollback to the step-2 checkpoint
    resumed.log(3, {"loss": 0.8})
    resumed.close()
    assert _steps(tmp_path / "metrics.jsonl") == [(1, "train"), (2, "train"), (3, "train")]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == 0.8

"""`voxtral-train`: training (the default), `plan` (memory estimate) and `plot` (training curves).

    voxtral-train [train] key=value ...      # Hydra overrides of configs/train.yaml
    voxtral-train plan [overrides] [plan.n_gpus=8 plan.gpu_gb=80]
    voxtral-train plot runs/NAME

Hydra composes the config; it must not fight accelerate: `hydra.run.dir` is the run folder (not a timestamp, so all
ranks agree), `version_base=None`, `hydra.job.chdir=false`, and only the main process prints or writes.

Exit codes: 0 done; 2 the settings, data or launch cannot train (the message says what to change); 3 the run
stopped early on its own (e.g. a non-finite loss) after saving what it could.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from voxtral_train.checkpoint import CheckpointError
from voxtral_train.config import CONFIG_DIR, ConfigError, register_defaults, settings_from_dict
from voxtral_train.distributed import LaunchError
from voxtral_train.preflight import PreflightError, UnreadableData

USAGE_ERRORS = (ConfigError, LaunchError, CheckpointError, PreflightError, UnreadableData)


def _remove_if_empty(run_dir: Path) -> None:
    """Hydra creates the run folder before the config is checked: a refused run leaves no empty folder behind (nor
    an empty output root). A folder with anything in it (an earlier run's files) stays."""
    for folder in (run_dir, run_dir.parent):
        try:
            folder.rmdir()
        except OSError:
            return


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
def _hydra_train(cfg: DictConfig) -> None:
    from voxtral_train.train import TrainingStopped, train  # lazy: `voxtral-train plot` needs no torch

    raw = OmegaConf.to_container(cfg, resolve=True)
    try:
        result = train(settings_from_dict(raw))
    except (*USAGE_ERRORS, TrainingStopped) as err:
        _remove_if_empty(Path(HydraConfig.get().runtime.output_dir))
        print(f"voxtral-train: {err}", file=sys.stderr)
        sys.exit(2)
    if result.stopped:
        sys.exit(3)


def train_command(overrides: list[str]) -> int:
    """`voxtral-train [train] key=value ...`: Hydra reads sys.argv, so hand it the overrides there."""
    register_defaults()
    sys.argv = [sys.argv[0], *overrides]
    _hydra_train()
    return 0


def plan_command(overrides: list[str]) -> int:
    """`voxtral-train plan [overrides]`: estimated per-GPU memory of the configured run (voxtral_train.memory_plan)."""
    from voxtral_train.memory_plan import main_plan

    try:
        main_plan(overrides)
    except (ConfigError, ValueError) as err:
        print(f"voxtral-train plan: {err}", file=sys.stderr)
        return 2
    return 0


def plot_command(argv: list[str]) -> int:
    from voxtral_train.plots import plot_command as plot

    return plot(argv)


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {"train": train_command, "plan": plan_command,
                                                      "plot": plot_command}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    return train_command(argv)


if __name__ == "__main__":
    sys.exit(main())

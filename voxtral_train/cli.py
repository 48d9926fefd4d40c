"""`voxtral-train`: training (the default), `plan` (memory estimate) and `plot` (training curves).

    voxtral-train [train] key=value ...      # Hydra overrides of configs/train.yaml
    voxtral-train plan [overrides] [plan.n_gpus=8 plan.gpu_gb=80]
    voxtral-train plot runs/NAME

Hydra composes the config; it must not fight accelerate: `hydra.run.dir` is the run folder (not a timestamp, so all
ranks agree), `version_base=None`, `hydra.job.chdir=false`, and only the main process prints or writes.

Exit codes (every one but 0 comes with a one-paragraph message on stderr, never a traceback):
  0   done
  2   refused to start: settings, data or launch cannot train, the run folder is in use by another run, or the
      checkpoint to resume is damaged / cannot be continued exactly (the message says what to change)
  3   stopped early on its own: a non-finite loss (after train.max_nonfinite_events rollbacks, with rollback)
  4   a checkpoint could not be written (full disk, ...): the partial folder is removed, the last one is named
  5   a collective between processes failed or timed out (train.collective_timeout_s): a rank hung or died
  75  stopped on SIGTERM / SIGINT / SIGUSR1 or because the launcher died, after saving a checkpoint: run the
      printed command (the same overrides + train.resume=latest) to continue
  130 aborted by a second Ctrl-C, without saving
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from voxtral_train.checkpoint import CheckpointError, CheckpointWriteError
from voxtral_train.config import CONFIG_DIR, ConfigError, register_defaults, settings_from_dict
from voxtral_train.distributed import LaunchError
from voxtral_train.preflight import PreflightError, UnreadableData
from voxtral_train.resume_diff import ResumeRefused
from voxtral_train.run_lock import RunLocked
from voxtral_train.shards import ShardError

EXIT_USAGE, EXIT_STOPPED, EXIT_SAVE_FAILED, EXIT_COLLECTIVE, EXIT_INTERRUPTED, EXIT_ABORTED = 2, 3, 4, 5, 75, 130
USAGE_ERRORS = (ConfigError, LaunchError, CheckpointError, RunLocked, ResumeRefused, PreflightError, UnreadableData,
                ShardError)


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

    import torch.distributed

    raw = OmegaConf.to_container(cfg, resolve=True)
    try:
        result = train(settings_from_dict(raw))
    except CheckpointWriteError as err:
        sys.exit(_fail(str(err), EXIT_SAVE_FAILED))
    except (*USAGE_ERRORS, TrainingStopped) as err:
        _remove_if_empty(Path(HydraConfig.get().runtime.output_dir))
        sys.exit(_fail(str(err), EXIT_USAGE))
    except torch.distributed.DistError as err:
        sys.exit(_fail(f"a collective operation between the processes failed or timed out "
                       f"(train.collective_timeout_s={raw['train']['collective_timeout_s']}): another process hung "
                       f"or died, see its output. ({str(err).splitlines()[0] if str(err) else type(err).__name__})",
                       EXIT_COLLECTIVE))
    except KeyboardInterrupt:
        sys.exit(_fail("aborted by a second Ctrl-C; nothing was saved since the last checkpoint", EXIT_ABORTED))
    if result.interrupted:
        sys.exit(_fail(f"{result.stopped}\n  to continue: {resume_command()}", EXIT_INTERRUPTED))
    if result.stopped:
        sys.exit(EXIT_STOPPED)


def _fail(message: str, code: int) -> int:
    if os.environ.get("RANK", "0") == "0":  # one message per run, not one per process
        print(f"voxtral-train: {message}", file=sys.stderr)
    return code


def resume_command() -> str:
    """This run's command line with train.resume=latest (what continues it after a stop)."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("train.resume=")]
    return shlex.join(["voxtral-train", *overrides, "train.resume=latest"])


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

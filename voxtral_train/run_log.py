"""Where training metrics go: `metrics.jsonl` always; tensorboard and wandb when enabled. Main process only.

wandb: `WANDB_MODE=offline` (or `disabled`) is honoured. With no mode set and no API key, wandb would stop the run
("No API key configured"); we switch to offline mode with a warning instead, so a run never dies for logging.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import warnings
from pathlib import Path
from typing import Any

from voxtral_train.config import LoggingSettings


def wandb_mode(environ: dict[str, str] | os._Environ = os.environ) -> tuple[str, str | None]:
    """(mode, warning): the mode wandb should run in, and a warning when we had to choose offline."""
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"], None
    if environ.get("WANDB_API_KEY") or _netrc_has_wandb_key(environ):
        return "online", None
    return "offline", ("wandb: no WANDB_MODE and no API key (WANDB_API_KEY or `wandb login`): logging offline; "
                       "upload later with `wandb sync`")


def _netrc_has_wandb_key(environ) -> bool:
    path = Path(environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class MetricsLogger:
    """`log(step, metrics)` to every enabled sink; a no-op on non-main processes."""

    def __init__(self, run_dir: Path, settings: LoggingSettings, config: dict[str, Any], run_name: str,
                 is_main: bool, resumed: bool):
        self.is_main = is_main
        self.jsonl = self.tensorboard = self.wandb_run = None
        if not is_main:
            return
        self.jsonl = (run_dir / "metrics.jsonl").open("a" if resumed else "w", encoding="utf-8")
        if settings.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        if settings.wandb:
            import wandb

            mode, warning = wandb_mode()
            if warning:
                warnings.warn(warning, stacklevel=2)
            self.wandb_run = wandb.init(project=settings.wandb_project, name=run_name, dir=str(run_dir), mode=mode,
                                        config=config, id=run_name, resume="allow")  # one wandb run per run folder

    def log(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
        if not self.is_main:
            return
        row = {"step": step, "split": split, **metrics}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        numbers = {f"{split}/{k}": v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

"""Where training metrics go: `metrics.jsonl` always; tensorboard and wandb when enabled. Main process only.

One row per step and split, whatever happened: a resume from step N (and a rollback to N after a non-finite loss)
first drops the rows past N, which the interrupted run wrote after its last checkpoint and the continuation writes
again; tensorboard purges its events past N the same way. Otherwise the lr plot would draw a chord back to step N
and summary.md's "first step" would be the first resumed one. (wandb cannot rewind a run: it ignores the repeated
steps with a warning.)

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
                 is_main: bool, resume_step: int | None = None):
        """`resume_step`: the step a resumed run continues from (rows past it are dropped); None for a new run."""
        self.is_main = is_main
        self.path = run_dir / "metrics.jsonl"
        self.settings = settings
        self.jsonl = self.tensorboard = self.wandb_run = None
        if not is_main:
            return
        if resume_step is None:
            self.path.write_text("")
        else:
            keep_rows_up_to(self.path, resume_step)
        self.jsonl = self.path.open("a", encoding="utf-8")
        self._open_tensorboard(purge_after=resume_step)
        if settings.wandb:
            import wandb

            mode, warning = wandb_mode()
            if warning:
                warnings.warn(warning, stacklevel=2)
            self.wandb_run = wandb.init(project=settings.wandb_project, name=run_name, dir=str(run_dir), mode=mode,
                                        config=config, id=run_name, resume="allow")  # one wandb run per run folder

    def _open_tensorboard(self, purge_after: int | None) -> None:
        if self.settings.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if purge_after is None else purge_after + 1
            self.tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=purge)

    def rewind(self, step: int) -> None:
        """Forget everything logged past `step` (a rollback to the checkpoint of `step`)."""
        if not self.is_main:
            return
        self.jsonl.close()
        keep_rows_up_to(self.path, step)
        self.jsonl = self.path.open("a", encoding="utf-8")
        if self.tensorboard is not None:
            self.tensorboard.close()
            self._open_tensorboard(purge_after=step)

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


def keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the rows of `path` (metrics.jsonl) logged past `step`; replaced atomically, so a kill keeps one version."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and _row_step(line) <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line if line.endswith("\n") else line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _row_step(line: str) -> float:
    """A row's step; a torn last line (the process was killed mid-write) counts as past any step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def first_row(path: Path, split: str) -> dict | None:
    """The first row of `split` in metrics.jsonl (summary.md's "first step"), None when there is none."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if _row_step(line) != math.inf and json.loads(line)["split"] == split:
            return json.loads(line)
    return None

"""Graceful stop: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 ask the training loop to stop after the current step.

The handler only sets a flag; the loop checks it between steps (on every rank together, so all ranks stop at the
same step), saves a checkpoint, writes the summary and exits with EXIT_INTERRUPTED. A second Ctrl-C raises
KeyboardInterrupt at once (for when the save itself is what you want to skip). SIGUSR1 is what SLURM sends ahead of a
time limit (`#SBATCH --signal`, launch/slurm_multinode.sbatch).

The launcher dying also stops the run the same way: a trainer started by `accelerate launch` / torchrun whose
launcher was killed would otherwise run on as an orphan, still writing checkpoints. We notice it by the parent pid
changing. Only for launched processes: a trainer started from a shell outlives that shell on purpose (nohup).
"""

from __future__ import annotations

import os
import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """Installs the handlers on enter and restores the previous ones on exit. `reason` is None until asked to stop."""

    def __init__(self, watch_parent: bool):
        self.watch_parent = watch_parent
        self.parent = os.getppid()
        self._reason: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._reason is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now, without the checkpoint
        self._reason = self._reason or signal.Signals(signum).name

    @property
    def reason(self) -> str | None:
        """Why the run should stop ("SIGTERM", "the launcher (pid 123) exited"), or None."""
        if self._reason is None and self.watch_parent and os.getppid() != self.parent:
            self._reason = f"the launcher (pid {self.parent}) exited"
        return self._reason


def launched_by_a_launcher(environ: os._Environ | dict[str, str] = os.environ) -> bool:
    """torchrun (accelerate launch with several processes, the deepspeed launcher) sets LOCAL_RANK; accelerate's
    single-process launcher sets ACCELERATE_MIXED_PRECISION. A plain `voxtral-train` / `python -m` sets neither."""
    return "LOCAL_RANK" in environ or "ACCELERATE_MIXED_PRECISION" in environ

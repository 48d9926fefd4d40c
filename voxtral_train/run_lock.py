"""One live run per run folder: `runs/NAME/run.lock`, held (flock) by the main process for the run's whole life.

Two runs with the same `train.name` would otherwise both write into one folder (one run's config, the other's
weights, interleaved metrics). The lock file records who holds it (pid, host, start time) so a refused start can say
which run to look at. The kernel releases a flock when its process dies, however it dies, so a lock left by a killed
run is free: the next start takes it over and says whose it was. The file is never deleted (unlinking a lock file
races with a start that has it open); release empties it instead.

Linux NFS clients map flock onto NFS byte-range locks, so the lock also holds between nodes that share `runs/`
(Lustre needs its `flock` mount option).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "run.lock"


class RunLocked(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None
        self.took_over: str | None = None  # whose stale lock this one replaced, said once the run starts

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunLocked(f"{self.path.parent} is in use by another run ({holder}). Wait for it to finish or stop "
                            f"it, or pass train.name=<another name> to start a separate run.") from None
        previous = _read(fd)
        if previous:  # written by a holder that died without releasing: the flock we just got proves it is gone
            self.took_over = (f"took over the lock of a run that is no longer running ({_describe(previous)}); "
                              f"its checkpoints are verified before any is used")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # empty = released cleanly (no "took over" note for the next run)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict:
    raw = os.pread(fd, 4096, 0)
    try:
        return json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        return {"unreadable": raw[:80].decode(errors="replace")}


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return "holder unknown"
    return f"pid {holder['pid']} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"

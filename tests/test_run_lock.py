"""The run-folder lock against real processes: a live holder refuses, a SIGKILLed one is taken over."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from voxtral_train.run_lock import LOCK_FILE, RunLock, RunLocked

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from voxtral_train.run_lock import RunLock
    RunLock(Path(sys.argv[1])).acquire()
    print("held", flush=True)
    time.sleep(60)
""")


def _holder(run_dir):
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_live_holder_refuses_a_second_start_naming_it(tmp_path):
    child = _holder(tmp_path)
    try:
        with pytest.raises(RunLocked) as err:
            RunLock(tmp_path).acquire()
        assert f"pid {child.pid} on host {os.uname().nodename}, started 20" in str(err.value)
        assert "train.name=" in str(err.value)
    finally:
        child.kill()
        child.wait()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_note(tmp_path):
    child = _holder(tmp_path)
    child.send_signal(signal.SIGKILL)
    child.wait()
    lock = RunLock(tmp_path).acquire()
    assert f"no longer running (pid {child.pid} on host" in lock.took_over
    with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):  # flock: a second open in this process conflicts too
        RunLock(tmp_path).acquire()
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released cleanly: the next run takes it without a note
    with RunLock(tmp_path) as again:
        assert again.took_over is None

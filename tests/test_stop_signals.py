"""Graceful-stop flags from real signals, and the launcher's death seen from a grandchild."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from voxtral_train.stop_signals import StopRequest, launched_by_a_launcher


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_sets_the_flag_and_the_handlers_come_back(sig):
    before = signal.getsignal(sig)
    with StopRequest(watch_parent=False) as stop:
        assert stop.reason is None
        os.kill(os.getpid(), sig)
        assert stop.reason == sig.name
    assert signal.getsignal(sig) is before


def test_a_second_ctrl_c_aborts_at_once():
    with StopRequest(watch_parent=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


# A "launcher" that starts a trainer-like grandchild and is then SIGKILLed: the grandchild must notice.
LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
    time.sleep(60)
""")
TRAINER = textwrap.dedent("""
    import time
    from voxtral_train.stop_signals import StopRequest
    with StopRequest(watch_parent=True) as stop:
        print("ready", flush=True)
        for _ in range(200):
            if stop.reason:
                print(stop.reason, flush=True)
                break
            time.sleep(0.05)
""")


def test_the_launcher_dying_stops_the_trainer():
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, TRAINER], stdout=subprocess.PIPE, text=True)
    # The grandchild writes to the launcher's stdout pipe, which outlives the launcher.
    assert launcher.stdout.readline().strip() == "ready"
    launcher.kill()
    launcher.wait()
    assert launcher.stdout.readline().strip() == f"the launcher (pid {launcher.pid}) exited"
    assert launcher.stdout.readline() == ""  # the pipe closes: the grandchild has ended by itself


def test_only_launched_processes_watch_their_parent():
    assert launched_by_a_launcher({"LOCAL_RANK": "0"}) and launched_by_a_launcher({"ACCELERATE_MIXED_PRECISION": "no"})
    assert not launched_by_a_launcher({})

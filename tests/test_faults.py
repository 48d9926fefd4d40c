"""Runs that survive faults, with real processes and real signals (tiny model, a few steps each).

A fault is injected into a `voxtral-train` process (SIGTERM, SIGKILL at an exact point of a save or of a pruning,
a full tmpfs, a second start, an altered or missing checkpoint file, a NaN loss); the run must end with a message
rather than a traceback, and the continuation must match an unbroken run where that is possible (losses and lr of
every step, tolerance 1e-6 as in tests/test_train.py's resume test).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from voxtral_train.checkpoint import MANIFEST_FILE, TrainerState, complete_checkpoints, verify_checkpoint
from voxtral_train.cli import EXIT_INTERRUPTED, EXIT_SAVE_FAILED, EXIT_USAGE
from voxtral_train.config import compose_settings, settings_to_dict
from voxtral_train.resume_diff import lr_at
from voxtral_train.run_lock import LOCK_FILE
from voxtral_train.train import train

pytestmark = pytest.mark.slow

FAST = ["+experiment=tiny_demo", "train.warmup_steps=2", "logging.progress_bar=false", "logging.tensorboard=false", "train.log_every=1",
        "data.max_positions_per_batch=300", "train.eval_every=0", "data.final_eval_split=none"]
RUN = [*FAST, "train.max_steps=6", "train.save_every=2", "optim.lr=3e-3"]  # the run every fault is compared with
TOLERANCE = 1e-6


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def rows(run_dir: Path, split: str = "train") -> list[dict]:
    return [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if row["split"] == split]


def run_here(root: Path, *overrides: str):
    return train(compose_settings([*RUN, f"train.output_root={root}", *overrides]))


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> Path:
    AcceleratorState._reset_state(True)
    root = tmp_path_factory.mktemp("unbroken")
    run_here(root, "train.name=run")
    AcceleratorState._reset_state(True)
    return root / "run"


def assert_same_history(run_dir: Path, reference: Path) -> None:
    """One row per step, and every step's loss and lr equal to the unbroken run's."""
    got, want = rows(run_dir), rows(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=TOLERANCE, rel=0)
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in want], rel=1e-12)


# A trainer process; `inject` is Python run before the CLI (it patches a function to SIGKILL the process itself at an
# exact point, so the kill lands where the test says, every time).
TRAINER = textwrap.dedent("""
    import os, signal, sys
    {inject}
    from voxtral_train.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def start(root: Path, *overrides: str, inject: str = "", base: list[str] = RUN) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", TRAINER.format(inject=textwrap.dedent(inject)), *base,
                             f"train.output_root={root}", *overrides], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def logged_steps(run_dir: Path) -> int:
    try:
        return len(rows(run_dir))
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half-written
        return 0


def start_launched(root: Path, *overrides: str) -> subprocess.Popen:
    """The trainer under `accelerate launch` (one process): the launcher is the trainer's parent."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "-m", "voxtral_train.train", *RUN, f"train.output_root={root}", *overrides],
                            cwd=root, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("target", ["trainer", "launcher"])
def test_sigterm_saves_and_the_resume_is_exact(tmp_path, unbroken, target):
    """SIGTERM to the trainer, or to its launcher (which dies of it, leaving the trainer orphaned: the trainer
    notices and stops the same way, instead of training on)."""
    process = (start if target == "trainer" else start_launched)(tmp_path, "train.name=run", "train.save_every=0")
    run_dir = tmp_path / "run"
    wait_for(lambda: logged_steps(run_dir) >= 2, "two training steps")
    process.send_signal(signal.SIGTERM)
    code, output = finish(process)  # returns once the trainer has closed the output pipes: it has ended
    assert "Traceback" not in output and "train.resume=latest" in output, output
    if target == "trainer":
        assert code == EXIT_INTERRUPTED and "stopped on SIGTERM" in output, output
    else:
        assert code == -signal.SIGTERM and f"stopped on the launcher (pid {process.pid}) exited" in output, output
    (saved,) = complete_checkpoints(run_dir / "checkpoints")
    stopped_at = TrainerState.read(saved).step
    assert 2 <= stopped_at < 6 and verify_checkpoint(saved) == []
    assert "stopped early" in (run_dir / "summary.md").read_text()
    result = run_here(tmp_path, "train.name=run", "train.save_every=0", "train.resume=latest")
    assert result.final_step == 6 and result.stopped is None
    assert_same_history(run_dir, unbroken)


SIGKILL_IN_SAVE = """
    import voxtral_train.checkpoint as checkpoint
    original = checkpoint.write_manifest
    def write_manifest(folder, step):  # every file of the step-4 checkpoint written, not yet published
        if step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        original(folder, step)
    checkpoint.write_manifest = write_manifest
"""
SIGKILL_IN_PRUNE = """
    import voxtral_train.checkpoint as checkpoint
    original = checkpoint.shutil.rmtree
    def rmtree(path, *args, **kwargs):  # pruning step 2: the manifest is gone, one more file goes, then the kill
        if path.name == "step_000002" and not path.name.endswith(".tmp"):
            next(p for p in sorted(path.iterdir()) if p.name == "model.safetensors").unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        original(path, *args, **kwargs)
    checkpoint.shutil.rmtree = rmtree
"""


@pytest.mark.parametrize("inject, resumes_from", [(SIGKILL_IN_SAVE, "step_000002"), (SIGKILL_IN_PRUNE, "step_000004")],
                         ids=["during-save", "during-pruning"])
def test_sigkill_resumes_from_the_newest_verified_checkpoint(tmp_path, unbroken, capsys, inject, resumes_from):
    code, output = finish(start(tmp_path, "train.name=run", "train.keep_last=1", inject=inject))
    assert code == -signal.SIGKILL, output
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in complete_checkpoints(ckpts)] == [resumes_from]
    leftovers = sorted(p.name for p in ckpts.iterdir() if p.name != resumes_from)
    assert leftovers == (["step_000004.tmp"] if resumes_from == "step_000002" else ["step_000002"])
    if resumes_from == "step_000004":  # what the kill left: unpublished first, then half deleted
        assert not (ckpts / "step_000002" / MANIFEST_FILE).exists()
        assert not (ckpts / "step_000002" / "model.safetensors").exists()
    capsys.readouterr()
    run_here(tmp_path, "train.name=run", "train.keep_last=1", "train.resume=latest")
    assert f"resumed from {ckpts / resumes_from}" in capsys.readouterr().out
    assert_same_history(tmp_path / "run", unbroken)
    assert [p.name for p in ckpts.iterdir()] == ["step_000006"]  # leftovers cleared by the next pruning


def test_an_altered_optimizer_file_is_refused_and_latest_falls_back(tmp_path, unbroken, capsys):
    """A pickled file changed after the run wrote it (here: bytes of a pickle that would call os.system)."""
    run_dir = tmp_path / "run"
    shutil.copytree(unbroken, run_dir)
    newest = run_dir / "checkpoints" / "step_000006"
    with (newest / "optimizer.bin").open("r+b") as f:
        f.write(b"\x80\x02cos\nsystem\n")
    capsys.readouterr()
    run_here(tmp_path, "train.name=run", "train.resume=latest")
    said = capsys.readouterr().out
    assert f"skipping {newest}: optimizer.bin: changed since the run wrote it (sha256 differs)" in said
    assert f"falling back to {run_dir / 'checkpoints' / 'step_000004'}" in said
    assert_same_history(run_dir, unbroken)  # steps 5 and 6 again, from the verified step-4 checkpoint


def test_a_removed_rng_file_is_refused(tmp_path, unbroken):
    """accelerate would skip the missing file silently (and the resume would not be exact)."""
    run_dir = tmp_path / "run"
    shutil.copytree(unbroken, run_dir)
    folder = run_dir / "checkpoints" / "step_000006"
    (folder / "random_states_0.pkl").unlink()
    with pytest.raises(Exception, match="random_states_0.pkl: missing"):  # before anything loads
        run_here(tmp_path, "train.name=run", f"train.resume={folder}")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_a_full_disk_gives_one_message_and_keeps_the_previous_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    # ~11 MB per checkpoint of the tiny model: step 2 fits in 16 MB, step 4 does not.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        code, output = finish(start(disk, "train.name=run"))
        ckpts = disk / "run" / "checkpoints"
        assert code == EXIT_SAVE_FAILED, output
        assert "Traceback" not in output
        assert f"saving checkpoint {ckpts / 'step_000004'} failed" in output
        assert "free on" in output and f"{ckpts / 'step_000004.tmp'} was removed" in output
        assert f"{ckpts / 'step_000002'} is intact (verified)" in output
        assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002"]
        assert verify_checkpoint(ckpts / "step_000002") == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_second_start_is_refused_and_the_first_is_unaffected(tmp_path, unbroken):
    first = start(tmp_path, "train.name=run")
    run_dir = tmp_path / "run"
    wait_for(lambda: logged_steps(run_dir) >= 1, "the first run's first step")
    first.send_signal(signal.SIGSTOP)  # holds it mid-run (with its lock) however long the second takes to start
    try:
        code, output = finish(start(tmp_path, "train.name=run", "optim.lr=1e-2"))
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == EXIT_USAGE and "Traceback" not in output, output
    assert f"is in use by another run (pid {first.pid} on host {os.uname().nodename}, started 20" in output
    code, output = finish(first)
    assert code == 0, output
    assert_same_history(run_dir, unbroken)
    assert "lr: 0.003" in (run_dir / "config.yaml").read_text()  # the first run's settings, not the second's
    assert (run_dir / LOCK_FILE).read_text() == ""  # released


def test_resume_with_a_new_lr_uses_it_and_says_so(tmp_path, unbroken, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(unbroken, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_000006")
    capsys.readouterr()
    run_here(tmp_path, "train.name=run", "optim.lr=1e-3", "train.max_steps=8", "train.resume=latest")
    said = capsys.readouterr().out
    table = said[said.index("with changed settings:"):]
    assert table.splitlines()[3].split() == ["optim.lr", "0.003", "0.001", "new", "value;", "lr", "schedule",
                                             "re-derived"]
    assert table.splitlines()[4].split()[:3] == ["train.max_steps", "6", "8"]
    old, config = settings_to_dict(compose_settings(RUN)), settings_to_dict(compose_settings(
        [*RUN, "optim.lr=1e-3", "train.max_steps=8"]))
    assert f"lr at step 4: {lr_at(old, 4):.3g} -> {lr_at(config, 4):.3g}" in said
    resumed = rows(run_dir)[4:]
    assert [r["step"] for r in resumed] == list(range(5, 9))
    assert [r["lr"] for r in resumed] == pytest.approx([lr_at(config, r["step"] - 1) for r in resumed], rel=1e-9)


def test_resume_that_cannot_be_exact_is_refused_unless_forced(tmp_path, unbroken):
    run_dir = tmp_path / "run"
    shutil.copytree(unbroken, run_dir)
    with pytest.raises(Exception, match="train.allow_inexact_resume=true") as err:
        run_here(tmp_path, "train.name=run", "data.max_positions_per_batch=200", "train.max_steps=8",
                 "train.resume=latest")
    assert "data.max_positions_per_batch" in str(err.value) and "300" in str(err.value)
    result = run_here(tmp_path, "train.name=run", "data.max_positions_per_batch=200", "train.max_steps=7",
                      "train.resume=latest", "train.allow_inexact_resume=true")
    assert result.final_step == 7 and len(result.losses) == 1


def test_a_nan_loss_with_rollback_continues(tmp_path, monkeypatch, capsys):
    from voxtral_train.streaming_lm import StreamingLM

    forward, calls = StreamingLM.forward, []

    def nan_at_the_fourth_step(self, *args, **kwargs):
        weighted, stats = forward(self, *args, **kwargs)
        calls.append(1)
        return (weighted * float("nan"), stats) if len(calls) == 4 else (weighted, stats)

    monkeypatch.setattr(StreamingLM, "forward", nan_at_the_fourth_step)
    result = run_here(tmp_path, "train.name=run", "train.save_every=1", "train.keep_last=3",
                      "train.on_nonfinite=rollback")
    said = capsys.readouterr().out
    # Step 4's loss is NaN; step 3's checkpoint holds the weights that gave it, so step 2's is the good one.
    assert "non-finite loss at step 4" in said and "rolled back to" in said and "step_000002" in said
    assert result.stopped is None and result.final_step == 6
    history = rows(result.run_dir)
    assert [r["step"] for r in history] == list(range(1, 7))
    state = TrainerState.read(complete_checkpoints(result.run_dir / "checkpoints")[-1])
    assert state.nonfinite_events == 1 and state.lr_scale == 0.5 and state.finite
    assert history[2]["lr"] == pytest.approx(0.5 * lr_at(settings_to_dict(compose_settings(RUN)), 2))


def test_repeated_nan_losses_stop_after_the_set_number_of_events(tmp_path, monkeypatch):
    from voxtral_train.streaming_lm import StreamingLM

    forward, calls = StreamingLM.forward, []

    def nan_from_the_fourth_step(self, *args, **kwargs):
        weighted, stats = forward(self, *args, **kwargs)
        calls.append(1)
        return (weighted * float("nan"), stats) if len(calls) >= 4 else (weighted, stats)

    monkeypatch.setattr(StreamingLM, "forward", nan_from_the_fourth_step)
    result = run_here(tmp_path, "train.name=run", "train.save_every=1", "train.keep_last=3",
                      "train.on_nonfinite=rollback", "train.max_nonfinite_events=1")
    # Step 4 rolls back to step 2 (event 1); the retried step 3 is non-finite too: stop, naming step 2's checkpoint.
    assert result.stopped and "after 1 rollbacks (train.max_nonfinite_events=1)" in result.stopped
    assert "train.resume=" + str(result.run_dir / "checkpoints" / "step_000001") in result.stopped
    assert not (result.run_dir / "final").exists()


def test_the_collective_timeout_reaches_the_process_group():
    """A hung rank: the others give up after train.collective_timeout_s (gloo's own default is 30 minutes)."""
    from datetime import timedelta

    from voxtral_train.distributed import process_group_kwargs

    settings = compose_settings(["train.collective_timeout_s=90"])
    assert process_group_kwargs(settings, world_size=1, cuda=False) == []
    (cpu,) = process_group_kwargs(settings, world_size=2, cuda=False)
    (gpu,) = process_group_kwargs(settings, world_size=8, cuda=True)
    assert (cpu.backend, cpu.timeout, gpu.backend) == ("gloo", timedelta(seconds=90), "nccl")
    assert compose_settings([]).train.collective_timeout_s == 600


FAKE_SLURM = {
    # scontrol: the node list, and the requeue the script must ask for.
    "scontrol": 'if [ "$1" = show ]; then echo node1; else echo "$*" >> "$LOG"; fi',
    # srun: the step in its own process group (as slurmstepd tracks a step), so scancel reaches all its processes.
    "srun": 'while [ "${1#--}" != "$1" ]; do shift; done; setsid "$@" & echo $! > "$STEP"; wait $!',
    "scancel": 'echo "scancel $*" >> "$LOG"; kill -USR1 -- -"$(cat "$STEP")"',
    # accelerate: a launcher that waits for its trainer and reports how it ended.
    "accelerate": '"$PYTHON" "$TRAINER" "$@"; c=$?; echo "launcher saw the trainer exit $c" >> "$LOG"; exit $c',
}
FAKE_TRAINER = textwrap.dedent("""
    import os, signal, sys, time
    signal.signal(signal.SIGUSR1, lambda *_: (open(os.environ["LOG"], "a").write("trainer got SIGUSR1\\n"),
                                              sys.exit(75)))
    open(os.environ["LOG"], "a").write("trainer args: " + " ".join(sys.argv[1:]) + "\\n")
    time.sleep(30)
""")


def test_the_slurm_script_forwards_the_warning_signal_and_requeues(tmp_path):
    """launch/slurm_multinode.sbatch under stand-in SLURM commands: SIGUSR1 to the batch shell (what
    `--signal=B:USR1@600` sends) must reach the trainer through srun and the launcher, the launcher must outlive
    it, and the job must be requeued."""
    sbatch = Path(__file__).resolve().parent.parent / "launch" / "slurm_multinode.sbatch"
    assert "#SBATCH --signal=B:USR1@" in sbatch.read_text()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    (tmp_path / "trainer.py").write_text(FAKE_TRAINER)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "STEP": str(tmp_path / "step"),
           "PYTHON": sys.executable, "TRAINER": str(tmp_path / "trainer.py"), "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_NODEID": "0"}
    job = subprocess.Popen(["bash", str(sbatch), "train.name=my_run"], env=env, cwd=tmp_path, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: log.is_file() and "trainer args" in log.read_text(), "the trainer to start", timeout=30)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=30)
    assert job.returncode == 0, out
    lines = log.read_text().splitlines()
    assert "train.resume=latest train.name=my_run" in lines[0]
    assert lines[1:] == ["scancel --signal=USR1 42.0", "trainer got SIGUSR1", "launcher saw the trainer exit 75",
                         "requeue 42"], lines
    assert "requeueing into train.resume=latest" in out

"""`voxtral-train plot RUN_DIR` and `voxtral-train plan`: the subcommands of the training CLI."""

import json

import pytest

from voxtral_train.plots import plot_run, series
from voxtral_train.cli import main


def _run_dir(tmp_path):
    rows = [{"step": s, "split": "train", "loss": 5.0 / s, "pad_loss": 1.0 / s, "text_loss": 9.0 / s, "lr": 1e-3 * s}
            for s in (1, 2, 3)]
    rows += [{"step": 3, "split": "eval", "loss": 2.0, "wer": 0.5, "text_accuracy": 0.4},
             {"step": 3, "split": "ranks", "world_size": 1, "parameter_checksums": [1.0]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_series_picks_the_split_and_key(tmp_path):
    rows = [json.loads(line) for line in (_run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert series(rows, "train", "lr") == ([1, 2, 3], [1e-3, 2e-3, 3e-3])
    assert series(rows, "eval", "wer") == ([3], [0.5])
    assert series(rows, "eval", "lr") == ([], [])


def test_plot_command_writes_pngs(tmp_path, capsys):
    run_dir = _run_dir(tmp_path)
    assert main(["plot", str(run_dir)]) == 0
    written = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert written == ["loss.png", "lr.png", "wer.png"]
    assert all((run_dir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in written)
    assert "loss.png" in capsys.readouterr().out


def test_plot_refuses_a_folder_without_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path)


def test_plan_subcommand_prints_the_memory_table(capsys):
    assert main(["plan", "peft=full", "deepspeed=zero3", "plan.n_gpus=8"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-3 x 8 GPU" in out and "optimizer states" in out and "fits in" in out
    assert main(["plan", "plan.zero=3"]) == 2  # an unknown key: a message, not a traceback

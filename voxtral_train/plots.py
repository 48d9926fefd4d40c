"""`voxtral-train plot RUN_DIR`: training curves from `metrics.jsonl` as PNGs in `RUN_DIR/plots/`.

loss.png (total, pad and text loss; train and eval), lr.png (learning rate), wer.png (periodic eval WER and text
accuracy). Files are written only for the curves the run has data for.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a voxtral-train run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the rows of `split`, skipping rows without a number for it."""
    points = [(r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def _figure(path: Path, title: str, curves: list[tuple[str, tuple[list[int], list[float]]]], ylabel: str,
            log_y: bool = False) -> Path | None:
    curves = [(label, xy) for label, xy in curves if xy[0]]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (steps, values) in curves:
        ax.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None)
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the PNGs of a run folder; returns the files written."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = [
        _figure(out / "loss.png", "streaming loss", [
            ("train loss", series(rows, "train", "loss")), ("train pad loss", series(rows, "train", "pad_loss")),
            ("train text loss", series(rows, "train", "text_loss")), ("eval loss", series(rows, "eval", "loss")),
        ], "cross-entropy", log_y=True),
        _figure(out / "lr.png", "learning rate", [("lr", series(rows, "train", "lr"))], "lr"),
        _figure(out / "wer.png", "held-out evaluation", [
            ("eval WER (normalised)", series(rows, "eval", "wer")),
            ("eval text accuracy", series(rows, "eval", "text_accuracy")),
        ], "rate"),
    ]
    return [path for path in written if path is not None]


def plot_command(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: voxtral-train plot RUN_DIR")
        return 2
    for path in plot_run(argv[0]):
        print(path)
    return 0

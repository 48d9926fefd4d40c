"""Copy a finished mini_base run into the package as the embedded base `load_model("mini")`.

    python recipes/mini_base/ship.py runs/mini_base_stage2 --earlier runs/mini_base   # -> voxtral_train/assets/mini/

Writes the weights in bf16 safetensors (half the size; `load_model` upcasts to the dtype asked for), config.json,
tekken.json, and what made them: the recipe, the run's resolved config, its metrics log, summary and final eval.
`--earlier` names the run whose final weights this run started from (`model.path`): its config and metrics log are
shipped too, as `stage1_train_config.yaml` and `stage1_metrics.jsonl`, so the whole history travels with the weights.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from voxtral_train.model import MINI_DIR, load_model

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "experiment" / "mini_base.yaml"
MAX_BYTES = 10 * 1024 * 1024  # the package stays small: the weights must fit in 10 MiB


def _copy_record(run_dir: Path, out: Path, prefix: str = "") -> None:
    """The run's resolved config, metrics log, summary and final eval report, where they exist (summary and eval
    exist once the run's final evaluation is done)."""
    for name, target in (("config.yaml", "train_config.yaml"), ("metrics.jsonl", "metrics.jsonl"),
                         ("summary.md", "summary.md"), ("eval/report.md", "eval_report.md")):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / f"{prefix}{target}")


def ship(run_dir: Path, out: Path = MINI_DIR, earlier: Path | None = None) -> None:
    model, tokenizer = load_model(run_dir / "final", dtype=torch.bfloat16)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)  # decoding is ours, not generate()'s
    shutil.copyfile(tokenizer.tekken_path, out / "tekken.json")
    shutil.copyfile(RECIPE, out / "recipe.yaml")
    _copy_record(run_dir, out)
    if earlier is not None:
        _copy_record(earlier, out, prefix="stage1_")
    for path in out.iterdir():
        path.chmod(0o644)  # package data: readable by every user (safetensors writes 0600)
    size = (out / "model.safetensors").stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{out / 'model.safetensors'} is {size / 2**20:.1f} MiB, over the 10 MiB budget")
    print(f"shipped {run_dir} -> {out} ({size / 2**20:.1f} MiB of weights)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--earlier", type=Path, help="the run whose final weights run_dir started from")
    args = parser.parse_args()
    ship(args.run_dir, earlier=args.earlier)
    sys.exit(0)

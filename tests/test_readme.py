"""The README's quickstart, run as written (console scripts in a scratch folder), so the README cannot rot.

The only change to the commands: the training run is shortened (fewer steps, periodic eval only at step 0) to keep
CI fast; the full 300-step adaptation is what `voxtral-train` runs with no overrides.
"""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAST_TRAIN = ["train.max_steps=30", "train.warmup_steps=5", "train.eval_every=1000", "logging.progress_bar=false"]


def quickstart_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split("  #")[0].rstrip() for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path):
    commands = quickstart_commands()
    assert [c[0] for c in commands] == ["voxtral-prep", "voxtral-train", "voxtral-train", "voxtral-eval", "voxtral-eval",
                                        *["voxtral-export"] * 5]
    for command in commands:
        command = [str(ROOT / arg) if arg.startswith("voxtral_train/assets/") else arg for arg in command]
        if command[:2] == ["voxtral-train", "train.name=demo"]:
            command += FAST_TRAIN
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (tmp_path / "data/demo/manifest.jsonl").is_file() and (tmp_path / "data/demo/rejects.jsonl").is_file()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "runs/demo/metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]
    assert losses[-1] < losses[0] - 1.0  # the loss falls
    assert (tmp_path / "runs/demo/plots/loss.png").is_file()
    rows = [json.loads(line) for line in (tmp_path / "runs/demo/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0]  # the base's WER, before adaptation
    assert [r["step"] for r in rows if r["split"] == "final_eval"] == [30]  # held-out sentences, not the training set
    for name in ("base", "demo"):
        report = json.loads((tmp_path / "eval" / name / "report.json").read_text())
        assert [d["delay_ms"] for d in report["models"][0]["delays"]] == [480, 960]
    for name in ("params.json", "consolidated.safetensors", "tekken.json"):
        assert (tmp_path / "exports/demo" / name).is_file()
    assert (tmp_path / "exports/demo_adapter/adapter_model.safetensors").is_file()

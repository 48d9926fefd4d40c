"""The embedded mini base (voxtral_train/assets/mini, recipes/mini_base): it loads, it transcribes sentences it never
trained on, and LoRA on a few clips of a domain it never heard moves that domain's WER the right way.

Clips are synthesised here with espeak-ng (deterministic by seed), the same way the benchmark does; WERs are
computed, nothing is timed. Thresholds leave a margin over the measured numbers (benchmarks/RESULTS.md, "Mini base").
"""

import importlib.util
import json
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from safetensors import safe_open

from voxtral_train import load_model
from voxtral_train.config import compose_settings
from voxtral_train.evaluate import evaluate_model
from voxtral_train.model import MINI_DIR
from voxtral_train.manifest import read_manifest
from voxtral_train.train import train

ROOT = Path(__file__).resolve().parent.parent
# Held-out WER of the shipped base at 480 ms on the first 8 held-out sentences of its corpus (measured BASE_MEASURED).
BASE_MEASURED, BASE_LIMIT = 0.362, 0.50  # an untrained model of this size: > 100 %; the 1,400-step base: 71 %
# The default run at CI size: the held-out loss falls by LOSS_DROP within CI_STEPS // 2 steps.
CI_STEPS, LOSS_DROP = 120, 1.5
MEASURED = "loss 6.45 -> 2.61 at step 60, WER 100.8 % -> 97.4 % (60 steps: 101.3 %, too few)"


def _benchmark():
    spec = importlib.util.spec_from_file_location("adaptation", ROOT / "benchmarks" / "adaptation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_base_is_small_bf16_and_comes_with_what_made_it():
    with safe_open(MINI_DIR / "model.safetensors", "pt") as f:
        dtypes = {str(f.get_slice(name).get_dtype()) for name in f.keys()}
    assert dtypes == {"BF16"}
    assert (MINI_DIR / "model.safetensors").stat().st_size <= 10 * 2**20
    for name in ("config.json", "tekken.json", "recipe.yaml", "train_config.yaml", "metrics.jsonl", "summary.md",
                 "stage1_train_config.yaml", "stage1_metrics.jsonl"):  # both pretraining stages
        assert (MINI_DIR / name).is_file(), name
    steps = [json.loads(line)["step"] for line in (MINI_DIR / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) >= 4000  # the log of the whole pretraining run, not of a smoke test


def test_shipped_base_transcribes_held_out_sentences(tmp_path):
    model, tokenizer = load_model("mini")
    assert 3e6 < sum(p.numel() for p in model.parameters()) < 4e6
    clips = _benchmark().base_test_set(tmp_path, 8, 30000, 400, workers=1)
    assert len(clips) >= 6
    report = evaluate_model(model, tokenizer, clips, [480], progress=False)
    wer = report["delays"][0]["wer_norm"]
    assert wer < BASE_LIMIT, f"held-out WER of the shipped base: {100 * wer:.1f}% (measured {100 * BASE_MEASURED:.1f}%)"


@pytest.mark.slow
def test_the_default_run_adapts_the_base_to_held_out_domain_sentences(tmp_path):
    """Plain `voxtral-train` (LoRA on the mini base, the bundled medical set) cut to CI_STEPS of its 300 steps moves
    the 48 held-out domain sentences the right way against the base on the same clips: the teacher-forced loss falls
    by more than LOSS_DROP (a computed, sensitive measure) and the WER falls. The WER moves little at this size: the
    base is near 100 % on a domain whose words it never heard (measured MEASURED; the full 300 steps: 83.0 %)."""
    test = read_manifest("bundled:medical_eval")
    model, tokenizer = load_model("mini")
    before = evaluate_model(model, tokenizer, test, [480], progress=False)["delays"][0]["wer_norm"]
    AcceleratorState._reset_state(True)
    try:
        result = train(compose_settings([f"train.output_root={tmp_path}", f"train.max_steps={CI_STEPS}",
                                         f"train.eval_every={CI_STEPS // 2}", "train.eval_wer_clips=1",
                                         "train.save_every=0", "logging.progress_bar=false",
                                         "logging.tensorboard=false"]))
    finally:
        AcceleratorState._reset_state(True)
    assert result.stopped is None and result.final_step == CI_STEPS
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if r["split"] == "eval"}  # held-out, teacher-forced
    assert list(losses) == [0, CI_STEPS // 2]
    assert losses[CI_STEPS // 2] < losses[0] - LOSS_DROP, f"held-out loss {losses} (measured {MEASURED})"
    assert result.final_wer < before, f"held-out WER {100 * before:.1f}% -> {100 * result.final_wer:.1f}%"

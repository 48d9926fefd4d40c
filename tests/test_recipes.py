"""Every recipe in configs/experiment/ composes, validates, and trains two steps at tiny scale on CPU."""

from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from voxtral_train.config import CONFIG_DIR, compose_settings
from voxtral_train.train import train

RECIPES = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# What each recipe is for, checked on the composed settings so an edit that breaks its intent fails here.
INTENT = {
    "domain_lora_1gpu": lambda s: s.peft.mode == "lora" and 480 in s.data.delays_ms and s.train.pad_loss_weight < 1,
    "new_language_full_8gpu": lambda s: s.peft.mode == "full" and s.deepspeed.zero_stage == 3,
    "low_latency_240ms": lambda s: s.data.delays_ms == [240] and s.peft.mode == "lora",
    # from scratch, every parameter, the card's whole delay range, the released model's word-end anchor
    "mini_base": lambda s: s.peft.mode == "full" and (min(s.data.delays_ms), max(s.data.delays_ms)) == (240, 2400)
    and s.data.anchor == "end",
    # random init, every parameter, judged on the sentences it trained on (a tiny model memorises)
    "tiny_demo": lambda s: s.peft.mode == "full" and s.data.final_eval_split == "train",
    # LoRA that keeps serving every delay, judged on held-out domain sentences
    "domain_adaptation": lambda s: s.peft.mode == "lora" and (min(s.data.delays_ms), max(s.data.delays_ms)) == (240, 2400)
    and s.data.final_eval_split == "eval",
}
# The tiny-scale stand-ins: the embedded model and data, CPU precision, one process.
TINY = ["model=tiny", "data=sentences", "deepspeed=none", "train.mixed_precision=no", "train.max_steps=2",
        "train.warmup_steps=1", "train.eval_every=0", "train.save_every=0", "data.final_eval_split=none",
        "data.max_positions_per_batch=400", "logging.progress_bar=false", "logging.tensorboard=false"]


def test_every_recipe_has_an_intent_check_and_a_readme():
    assert RECIPES and set(RECIPES) == set(INTENT)
    for name in RECIPES:
        readme = Path(__file__).resolve().parent.parent / "recipes" / name / "README.md"
        assert readme.is_file(), readme
        assert f"+experiment={name}" in readme.read_text()


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_with_its_intent(name):
    settings = compose_settings([f"+experiment={name}", "model.path=/models/voxtral",
                                 "data.train_manifest=/data/train.jsonl", "data.eval_manifest=/data/dev.jsonl"])
    assert settings.model.path == "/models/voxtral"
    assert INTENT[name](settings)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_at_tiny_scale(name, tmp_path):
    AcceleratorState._reset_state(True)
    try:
        result = train(compose_settings([f"+experiment={name}", *TINY, f"train.output_root={tmp_path}"]))
    finally:
        AcceleratorState._reset_state(True)
    assert result.stopped is None and result.final_step == 2
    assert all(loss == loss and loss > 0 for loss in result.losses)  # finite, positive
    assert (result.run_dir / "final").is_dir() and (result.run_dir / "config.yaml").is_file()
